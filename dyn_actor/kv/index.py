"""The KV-aware router's index: which workers hold which cached blocks.

It is a prefix tree over blocks, keyed by chained block hash
(``dyn_actor.kv.block_hash``, the engine's own function): a block's hash covers
its tokens and every block before it, so a node is identified by its hash alone
and the tree needs no explicit edges. Each node holds the set of workers that
have that block cached. Matching a prompt walks its block hashes from the root
and, per worker, counts how many leading blocks it holds: O(prompt blocks),
touching only the workers still matching.

Fed by the workers' ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``
events; a worker's entries are dropped when it leaves, and replaced wholesale
by a snapshot when its event stream had a gap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class KvIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> workers holding it
        self._by_worker: dict[str, set[int]] = {}  # worker -> block hashes it holds

    # ---------------------------------------------------------------- updates
    def store(self, worker: str, block_hashes: Iterable[int]) -> None:
        mine = self._by_worker.setdefault(worker, set())
        for h in block_hashes:
            self._holders.setdefault(h, set()).add(worker)
            mine.add(h)

    def remove(self, worker: str, block_hashes: Iterable[int]) -> None:
        mine = self._by_worker.get(worker)
        if mine is None:
            return
        for h in block_hashes:
            if h in mine:
                mine.discard(h)
                self._drop_holder(h, worker)

    def remove_worker(self, worker: str) -> int:
        """Forget everything a worker holds (it left, died, or is resynchronising). Returns the count."""
        mine = self._by_worker.pop(worker, set())
        for h in mine:
            self._drop_holder(h, worker)
        return len(mine)

    def replace_worker(self, worker: str, block_hashes: Iterable[int]) -> None:
        """The worker holds exactly these blocks (a snapshot)."""
        self.remove_worker(worker)
        self.store(worker, block_hashes)
        self._by_worker.setdefault(worker, set())

    def _drop_holder(self, h: int, worker: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self._holders[h]

    # ---------------------------------------------------------------- queries
    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker holding the first block: how many leading blocks of the prompt it holds."""
        result: dict[str, int] = {}
        if not block_hashes:
            return result
        matching = set(self._holders.get(block_hashes[0], ()))
        depth = 0
        while matching:
            depth += 1
            if depth == len(block_hashes):
                for w in matching:
                    result[w] = depth
                break
            nxt = self._holders.get(block_hashes[depth], ())
            for w in matching - nxt if nxt else matching:
                result[w] = depth
            matching = matching & nxt if nxt else set()
        return result

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held by any worker."""
        return len(self._holders)

    def num_blocks_of(self, worker: str) -> int:
        return len(self._by_worker.get(worker, ()))

    def workers(self) -> list[str]:
        return sorted(self._by_worker)
