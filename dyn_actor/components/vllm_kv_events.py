"""vLLM's KV events as ours, so that ``--router kv`` works on ``--engine vllm`` workers.

vLLM's scheduler publishes what its prefix cache holds on a ZeroMQ PUB socket (``KVEventsConfig``
with the ``zmq`` publisher): multipart messages ``(topic, seq, payload)``, ``seq`` an 8-byte
big-endian counter from 0, ``payload`` a msgpack ``KVEventBatch`` (an array ``[ts, events,
data_parallel_rank]``; each event a map tagged by its class name in ``type``). A ROUTER socket
beside it replays the buffered batches from a given ``seq`` on, then an end marker (``seq`` -1).

The router keeps its own block hash (``dyn_actor.kv.block_hash``): vLLM's hash is another function
(and bytes or an int, by configuration), so ``KvEventTranslator`` recomputes ours from the token ids
each ``BlockStored`` carries, chained from our hash of its parent, and keeps vLLM hash -> our hash
to translate ``BlockRemoved``. It holds what vLLM's cache holds, so it also answers the router's
resync with a snapshot. The wire structs below mirror the fields of vLLM 0.32 that this needs
(others are ignored), so nothing here imports vLLM and it is unit-tested without it.
"""

from __future__ import annotations

import logging

import msgspec

from dyn_actor.kv.block_hash import hash_blocks, lora_root
from dyn_actor.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

log = logging.getLogger(__name__)

VllmHash = bytes | int

#: ``seq`` of the replay socket's end marker
END_SEQ = -1


class VllmBlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[VllmHash]
    parent_block_hash: VllmHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    group_idx: int | None = None
    lora_name: str | None = None  # the adapter the blocks were computed with (their hashes start from its root)


class VllmBlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[VllmHash]
    medium: str | None = None
    group_idx: int | None = None


class VllmAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class VllmEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(VllmEventBatch)

#: the cache tier that serves requests (vLLM names it GPU on the CPU backend too); CPU or storage
#: tiers of an offloading connector are not what the router matches against
_SERVING_MEDIA = (None, "GPU")


class KvEventTranslator:
    """vLLM's event batches in ``seq`` order -> our ``KvEvent`` lists."""

    def __init__(self) -> None:
        self.seq = -1  # the last vLLM batch applied
        self._ours: dict[VllmHash, int] = {}  # what vLLM's cache holds: its hash -> ours
        self.orphans = 0  # stored blocks whose parent we never saw (after a loss): not indexed

    def expects(self, seq: int) -> bool:
        """True when ``seq`` is the next batch; a later one means batches were lost (replay them)."""
        return seq == self.seq + 1

    def apply(self, seq: int, payload: bytes) -> list[KvEvent]:
        """Translate batch ``seq`` (the caller has checked ``expects``)."""
        batch = _decoder.decode(payload)
        self.seq = seq
        out: list[KvEvent] = []
        for ev in batch.events:
            if isinstance(ev, VllmBlockStored):
                stored = self._stored(ev)
                if stored is not None:
                    out.append(stored)
            elif isinstance(ev, VllmBlockRemoved):
                if ev.medium not in _SERVING_MEDIA or ev.group_idx not in (None, 0):
                    continue
                gone = [h for h in (self._ours.pop(v, None) for v in ev.block_hashes) if h is not None]
                if gone:
                    out.append(BlockRemoved(gone))
            else:
                self._ours.clear()
                out.append(AllBlocksCleared())
        return out

    def _stored(self, ev: VllmBlockStored) -> BlockStored | None:
        if ev.medium not in _SERVING_MEDIA or ev.group_idx not in (None, 0):
            return None
        parent = lora_root(ev.lora_name)
        if ev.parent_block_hash is not None:
            parent = self._ours.get(ev.parent_block_hash)
            if parent is None:
                self.orphans += 1
                return None
        n = len(ev.block_hashes)
        if n == 0 or len(ev.token_ids) != n * ev.block_size:
            return None
        ours = hash_blocks(ev.token_ids, ev.block_size, parent)
        for v, h in zip(ev.block_hashes, ours):
            self._ours[v] = h
        return BlockStored(ours, parent, list(ev.token_ids), ev.block_size)

    def lost(self, seq: int) -> list[KvEvent]:
        """Batches before ``seq`` are gone for good (the replay buffer no longer has them): forget
        everything (the router drops this worker's blocks and relearns them as they are stored)."""
        log.warning("vLLM KV events before seq %d were lost: the router forgets this worker's cache", seq)
        self.seq = seq - 1
        self._ours.clear()
        return [AllBlocksCleared()]

    def snapshot(self) -> list[int]:
        return list(dict.fromkeys(self._ours.values()))
