"""Paged KV block bookkeeping with prefix caching.

Pure Python, no tensors: the manager decides *which* block ids a request
owns; the engine's ``KvPool`` holds the memory behind those ids.

- A block is *full* once ``block_size`` of its tokens have computed KV. Full
  blocks are registered under their chained hash (``dyn_actor.kv.block_hash``)
  and can be shared by any request whose prompt starts with the same tokens.
- A hit is confirmed by comparing tokens, so a hash collision never returns
  the wrong KV.
- Blocks are reference counted. A block nobody holds goes to the back of an
  LRU free queue; a cached free block keeps its content until it is taken for
  new data, at which point a ``BlockRemoved`` event is emitted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dyn_actor.kv.block_hash import hash_block
from dyn_actor.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent


@dataclass(eq=False, slots=True)
class KvBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` tokens each."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: Callable[[int | None, Sequence[int]], int] = hash_block,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = hash_fn
        self.blocks = [KvBlock(i) for i in range(num_blocks)]
        # LRU order: the first entry is the next one taken for new data.
        self._free: OrderedDict[int, KvBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KvBlock] = {}
        self._req_blocks: dict[str, list[KvBlock]] = {}
        self._req_ids: dict[str, list[int]] = {}  # the ids of _req_blocks' blocks, kept beside them
        self._req_hashes: dict[str, list[int]] = {}
        # the parent hash of a request's first block where it is not the root: a LoRA adapter's
        # (``lora.lora_root``), so KV computed with one adapter is only found by requests of that adapter
        self._req_roots: dict[str, int] = {}
        self._events: list[KvEvent] = []
        # the last prompt's chained block hashes: a decode worker looks a prompt up (local or
        # remote?) and then allocates it, the scheduler may look again; each block is hashed once
        self._memo_tokens: tuple[int, ...] = ()
        self._memo_hashes: list[int] = []
        self._memo_root: int | None = None

    def _chain(self, tokens: tuple[int, ...], root: int | None = None) -> list[int]:
        """Chained hashes of the full blocks of ``tokens`` after ``root`` (reusing the last call's common
        prefix)."""
        bs = self.block_size
        n = len(tokens) // bs
        memo, hashes = self._memo_tokens, self._memo_hashes
        keep = min(len(hashes), n) if root == self._memo_root else 0
        if keep and tokens[: keep * bs] != memo[: keep * bs]:
            keep = 0
        hashes = hashes[:keep]
        for i in range(keep, n):
            hashes.append(self._hash_fn(hashes[-1] if hashes else root, tokens[i * bs:(i + 1) * bs]))
        self._memo_tokens, self._memo_hashes, self._memo_root = tokens, hashes, root
        return hashes

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not): what an allocation can use."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live requests."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def cached_hashes(self) -> list[int]:
        """The hash of every cached block (what a KV-aware router's index should hold for us)."""
        return list(self._cached)

    def block_ids(self, request_id: str) -> list[int]:
        return list(self._req_ids.get(request_id, ()))

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order: the manager's own list, for a step's hot path, which
        only reads it (``block_ids`` is the copy for everyone else)."""
        return self._req_ids[request_id]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._req_blocks

    def find_cached_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None,
                           root: int | None = None) -> list[KvBlock]:
        """Leading full blocks of ``token_ids`` whose KV is cached (tokens verified).

        ``max_tokens`` caps the hit (the engine passes ``len - 1``: the last
        prompt token must be computed to produce logits). ``root``: the first block's parent hash
        (a LoRA adapter's; None for the base model).
        """
        if not self.enable_prefix_caching:
            return []
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        bs = self.block_size
        tokens = tuple(token_ids[: limit - limit % bs])
        hits: list[KvBlock] = []
        if not tokens or self._cached.get(self._hash_fn(root, tokens[:bs])) is None:
            return hits  # not even the first block: no need to hash the rest
        for i, h in enumerate(self._chain(tokens, root)):
            block = self._cached.get(h)
            if block is None or block.token_ids != tokens[i * bs:(i + 1) * bs]:
                break
            hits.append(block)
        return hits

    # -------------------------------------------------------------- allocation
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(
        self,
        request_id: str,
        num_tokens: int,
        computed_blocks: Sequence[KvBlock] = (),
        root: int | None = None,
    ) -> list[int] | None:
        """Make ``request_id`` own enough blocks for ``num_tokens`` tokens.

        ``computed_blocks`` (prefix-cache hits, only on a request's first
        allocation) are shared, not copied. ``root`` (first allocation): the parent hash of the
        request's first block, as in ``find_cached_prefix``. Returns the request's block ids,
        or ``None`` (and changes nothing) when there are not enough free blocks.
        """
        owned = self._req_blocks.get(request_id)
        if owned is None:
            owned = []
        elif computed_blocks:
            raise ValueError(f"request {request_id} already owns blocks; hits only apply to a new request")
        needed_total = -(-num_tokens // self.block_size)
        have = len(owned) + len(computed_blocks)
        new_needed = max(0, needed_total - have)
        # hit blocks sitting in the free queue stop being free when we take them
        hits_in_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if new_needed + hits_in_free > len(self._free):
            return None
        ids = self._req_ids.get(request_id)
        if ids is None:
            self._req_blocks[request_id] = owned
            self._req_ids[request_id] = ids = []
            self._req_hashes[request_id] = []
            if root is not None:
                self._req_roots[request_id] = root
        for b in computed_blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1
            owned.append(b)
            ids.append(b.block_id)
            self._req_hashes[request_id].append(b.block_hash)  # type: ignore[arg-type]
        for _ in range(new_needed):
            b = self._take_free_block()
            owned.append(b)
            ids.append(b.block_id)
        return list(ids)

    def extend(self, request_id: str, num_tokens: int) -> bool:
        """Make a request that owns blocks own enough for ``num_tokens`` tokens (a step's growth);
        False, with nothing changed, when there are not enough free blocks."""
        ids = self._req_ids.get(request_id)
        if ids is not None and len(ids) * self.block_size >= num_tokens:
            return True
        return self.allocate(request_id, num_tokens) is not None

    def _take_free_block(self) -> KvBlock:
        if not self._free:
            raise NoFreeBlocksError("no free KV blocks")
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                self._events.append(BlockRemoved([block.block_hash]))
            block.block_hash = None
            block.token_ids = None
        block.ref_cnt = 1
        return block

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that became full (all KV computed) in the prefix cache."""
        owned = self._req_blocks.get(request_id)
        if owned is None or not self.enable_prefix_caching:
            return
        hashes = self._req_hashes[request_id]
        bs = self.block_size
        num_full = min(num_computed_tokens // bs, len(owned))
        if num_full <= len(hashes):
            return
        first = len(hashes)
        parent = hashes[-1] if hashes else self._req_roots.get(request_id)
        stored_hashes: list[int] = []
        stored_tokens: list[int] = []
        stored_parent = parent
        for i in range(first, num_full):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self._hash_fn(parent, chunk)
            hashes.append(h)
            parent = h
            block = owned[i]
            if h in self._cached or block.block_hash is not None:
                # same content already cached elsewhere (or a collision): keep the
                # existing entry; this block stays private and is freed normally.
                if stored_hashes:
                    self._events.append(BlockStored(stored_hashes, stored_parent, stored_tokens, bs))
                stored_hashes, stored_tokens = [], []
                stored_parent = h
                continue
            block.block_hash = h
            block.token_ids = chunk
            self._cached[h] = block
            stored_hashes.append(h)
            stored_tokens.extend(chunk)
        if stored_hashes:
            self._events.append(BlockStored(stored_hashes, stored_parent, stored_tokens, bs))

    def import_cached_blocks(self, token_ids: Sequence[int], num_blocks: int,
                             root: int | None = None) -> list[tuple[int, int]]:
        """Make the first ``num_blocks`` full blocks of ``token_ids`` cached here, for KV that comes
        from elsewhere (another worker's pool).

        Blocks already cached are kept (and marked recently used); for each missing one a free block
        is registered under its hash, and ``(prompt block index, block id)`` is returned: the caller
        must write that block's KV before anything can use it (before the next allocation). Stops
        early when there is no free block left that is not part of this prefix.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        num_blocks = min(num_blocks, len(token_ids) // bs)
        to_write: list[tuple[int, int]] = []
        stored_hashes: list[int] = []
        stored_tokens: list[int] = []
        stored_parent: int | None = root
        parent: int | None = root
        prefix_free = 0  # blocks of this prefix now at the tail of the free queue
        for i in range(num_blocks):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self._hash_fn(parent, chunk)
            block = self._cached.get(h)
            if block is not None and block.token_ids != chunk:
                break  # a hash collision: leave the existing entry alone
            if block is not None:
                if block.ref_cnt == 0:
                    self._free.move_to_end(block.block_id)  # keep it from being evicted below
                    prefix_free += 1
                if stored_hashes:
                    self._events.append(BlockStored(stored_hashes, stored_parent, stored_tokens, bs))
                    stored_hashes, stored_tokens = [], []
                stored_parent = h
            else:
                # the blocks of this prefix seen so far sit at the LRU tail; take only from before them
                if len(self._free) <= prefix_free:
                    break
                block = self._take_free_block()
                block.block_hash, block.token_ids, block.ref_cnt = h, chunk, 0
                self._cached[h] = block
                self._free[block.block_id] = block
                prefix_free += 1
                to_write.append((i, block.block_id))
                stored_hashes.append(h)
                stored_tokens.extend(chunk)
            parent = h
        if stored_hashes:
            self._events.append(BlockStored(stored_hashes, stored_parent, stored_tokens, bs))
        return to_write

    def discard_cached(self, block_ids: Sequence[int]) -> None:
        """Drop free blocks from the prefix cache (their content is not what their hash says)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt == 0 and block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                    self._events.append(BlockRemoved([block.block_hash]))
                block.block_hash = None
                block.token_ids = None

    def transfer(self, request_id: str, new_owner: str) -> int:
        """Hand every block of ``request_id`` to ``new_owner`` (not yet an owner); returns the count."""
        if new_owner in self._req_blocks:
            raise ValueError(f"{new_owner!r} already owns blocks")
        owned = self._req_blocks.pop(request_id, None)
        hashes = self._req_hashes.pop(request_id, None)
        if owned is None:
            return 0
        self._req_blocks[new_owner] = owned
        self._req_ids[new_owner] = self._req_ids.pop(request_id)
        self._req_hashes[new_owner] = hashes or []
        root = self._req_roots.pop(request_id, None)
        if root is not None:
            self._req_roots[new_owner] = root
        return len(owned)

    def free(self, request_id: str) -> None:
        """Release every block the request holds (a no-op for an unknown request)."""
        owned = self._req_blocks.pop(request_id, None)
        self._req_ids.pop(request_id, None)
        self._req_hashes.pop(request_id, None)
        self._req_roots.pop(request_id, None)
        if not owned:
            return
        # tail blocks first: they are the least likely to be shared, so evict them first
        for block in reversed(owned):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible while no request holds blocks."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events
