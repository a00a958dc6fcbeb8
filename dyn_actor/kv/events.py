"""KV events a block manager emits and the KV-aware router consumes.

Events are emitted for *full* blocks only. They are ``msgspec`` structs so a
worker can publish them as msgpack without any conversion.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Consecutive full blocks became cached; ``block_hashes[0]`` follows ``parent_hash``."""

    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Cached blocks were evicted and no longer hold their content."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag="cleared", frozen=True):
    """Every cached block was dropped (e.g. a prefix-cache reset)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared
