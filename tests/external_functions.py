"""Functions the external-path and attach tests run on shards (importable by shards)."""

from __future__ import annotations

import asyncio

import shardio


def echo(*values):
    return values


def add(a, b=0):
    return a + b


def blob(size: int) -> bytes:
    return b"x" * size


async def slow_echo(value, seconds: float):
    await asyncio.sleep(seconds)
    return value


def whoami() -> int:
    return shardio.this_shard()
