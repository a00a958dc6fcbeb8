"""The one definition of a KV block's hash.

A block's hash covers its parent's hash and its own token ids, so equal hashes
mean equal prefixes (up to a 64-bit collision, which the block manager guards
against by comparing tokens on a hit). The engine and the router both import
this module: they agree by construction, and the value is stable across
processes and machines (no Python ``hash()``, no per-process seed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

#: parent hash of a sequence's first block
ROOT_HASH = 0


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of one full block of ``token_ids`` following a block hashed ``parent_hash``.

    Returns an unsigned 64-bit integer (fits msgpack and Prometheus labels).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update((parent_hash or ROOT_HASH).to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def lora_root(name: str | None) -> int | None:
    """The parent hash of the first block of a sequence served with LoRA adapter ``name`` (None for
    the base model): KV computed with an adapter differs from the base model's for the same tokens,
    so its blocks hash apart, in the engine's prefix cache and the router's index alike."""
    if not name:
        return None
    h = hashlib.blake2b(b"lora:" + name.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") or 1


def hash_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block is skipped)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
