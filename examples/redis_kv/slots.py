"""Redis Cluster's key placement: 16384 hash slots, each owned by one shard.

A key's slot is CRC16 (XMODEM) of the key mod 16384, or of its hash tag —
the part between the first ``{`` and the next ``}``, when not empty — so
``{user:1}:name`` and ``{user:1}:mail`` share a slot. Shard ``s`` of ``n``
owns the contiguous range ``[s * 16384 // n, (s + 1) * 16384 // n)``, so a
cluster-aware client connects straight to the owner of each key.
"""

from __future__ import annotations

import binascii

__all__ = ["SLOTS", "key_slot", "shard_of_slot", "slot_range"]

SLOTS = 16384


def key_slot(key: bytes) -> int:
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def slot_range(shard: int, shards: int) -> tuple[int, int]:
    """The first and last slot ``shard`` owns (inclusive, as CLUSTER SLOTS says it)."""
    return shard * SLOTS // shards, (shard + 1) * SLOTS // shards - 1


def shard_of_slot(slot: int, shards: int) -> int:
    return (slot * shards + shards - 1) // SLOTS
