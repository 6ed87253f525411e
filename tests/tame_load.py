"""A load of unmodified stdlib code on tame stacks: read a zip member from a cached
file through a patched ``zipfile`` and hash it (the quota tests and bench/tame.py)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import zipfile
from typing import Any

from shardio import tame

MEMBER = "blob"


def make_zip(path: str, size: int = 1 << 20, seed: int = 1) -> str:
    """A zip file with one stored (uncompressed) member of ``size`` bytes; its sha256."""
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    data = bytes(b ^ (i & 0xFF) for i, b in enumerate(data[:4096])) + data[4096:]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(MEMBER, data)
    with open(path, "rb") as f:  # written back (not dirty), then read into the page cache
        os.fsync(f.fileno())
        f.read()
    return hashlib.sha256(data).hexdigest()


def read_and_hash(path: str, times: int = 1, chunk: int = 1 << 16) -> str:
    """Read the member through zipfile in ``chunk``-byte reads, hashing as it goes."""
    h = hashlib.sha256()
    for _ in range(times):
        h = hashlib.sha256()
        with zipfile.ZipFile(path) as z, z.open(MEMBER) as member:
            while data := member.read(chunk):
                h.update(data)
    return h.hexdigest()


async def run_load(path: str, stacks: int = 48, rounds: int = 1, times: int = 1) -> list[str]:
    """``stacks`` concurrent read_and_hash calls, ``rounds`` times, with zipfile tamed."""
    digests: list[str] = []
    with tame.patched(zipfile):
        for _ in range(rounds):
            calls = (tame.call(read_and_hash, path, times) for _ in range(stacks))
            digests += await asyncio.gather(*calls)
    return digests


async def measured_load(
    path: str, quota: float | None, stacks: int = 48, rounds: int = 1, times: int = 1
) -> dict[str, Any]:
    """The load under ``quota`` on the running loop; the scheduler's CPU-time accounting.

    The cyclic GC is off while it runs: a collection pass is not a slice the
    scheduler could have cut, and on a shared VM it would only add noise.
    """
    tame.configure(quota=quota, account_cpu=True)
    tame.warm_up()
    await run_load(path, 2, 1)  # first-use costs (imports, buffers) are not the load's
    gc.collect()
    gc.disable()
    try:
        tame.reset_accounting()
        before = tame.stats()
        digests = await run_load(path, stacks, rounds, times)
        after = tame.stats()
    finally:
        gc.enable()
    return {
        "digests": sorted(set(digests)),
        "calls": len(digests),
        "longest_slice_ns": after["longest_slice_ns"],
        "longest_turn_ns": after["longest_turn_ns"],
        "slice_clock": after["slice_clock"],
        "quota_yields": after["quota_yields"] - before["quota_yields"],
        "deferred": after["deferred_resumes"]
        - before["deferred_resumes"]
        + after["deferred_starts"]
        - before["deferred_starts"],
        "pid": os.getpid(),
    }
