"""What runs on the shards: each opens its own blocking store on a tame stack.

``BlockingStore`` (examples/embed_blocking_store.py) is plain synchronous code
against an ``Env``: open, write, fsync, rename, a lock.  On a shard it runs on
tame stacks, so its file I/O goes through the shard's io_uring and never
blocks the reactor.  Clients call :func:`get` and :func:`put` by reference:
this module must be importable by the shard processes (the daemon runs with
examples/ on its path).
"""

from __future__ import annotations

import os
import zlib
from typing import Any

from embed_blocking_store import BlockingStore

import shardio
from shardio import tame
from shardio.attach import client_links

_stores: dict[int, BlockingStore] = {}


def shard_of(key: str, shards: int) -> int:
    """Where a key lives: the same answer in every worker."""
    return zlib.crc32(key.encode()) % shards


async def open_store(root: str) -> None:
    """Open this shard's store under ``root`` (the daemon calls it on every shard)."""
    shard = shardio.this_shard()
    if shard not in _stores:
        path = os.path.join(root, f"shard-{shard}")
        _stores[shard] = await tame.call(BlockingStore, path, tame.env())


async def get(key: str) -> bytes | None:
    return await tame.call(_stores[shardio.this_shard()].get, key)


async def put(key: str, value: bytes) -> None:
    await tame.call(_stores[shardio.this_shard()].put, key, value)


def clients() -> dict[str, Any]:
    """The clients (gunicorn workers) attached to this shard now."""
    return {"shard": shardio.this_shard(), "pid": os.getpid(), "clients": len(client_links())}
