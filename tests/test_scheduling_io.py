"""I/O shares: when the device is saturated, io_uring operations of scheduling groups
are admitted in proportion to their shares (counted by the queue and by the groups)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import uvloop

import shardio
from shardio import tame
from shardio.errors import SchedulingError
from shardio.scheduling.io_queue import configure_io

STACKS = 6
OPERATIONS = int(os.environ.get("SHARDIO_SCHED_IO_OPS", "600"))


def _writer(path: str, state: dict[str, Any], name: str) -> None:
    """On a tame stack: write a block and make it durable, again and again: the disk's
    flushes are the bottleneck, the CPU is mostly idle."""
    block = b"x" * 4096
    with tame.env().open(path, "wb") as f:
        offset = 0
        while not state["stop"]:
            f.pwrite(block, offset)
            f.fdatasync()
            offset = (offset + 4096) % (1 << 20)
            state[name] += 1


def _io(stats: dict[str, Any]) -> int:
    return int(stats.get("io_admitted", 0))


async def _split(directory: str) -> dict[str, Any]:
    configure_io(capacity=2)
    a = shardio.SchedulingGroup("a", 300)
    b = shardio.SchedulingGroup("b", 100)
    state: dict[str, Any] = {"stop": False, "a": 0, "b": 0}
    tasks = [
        asyncio.ensure_future(
            g.call(_writer, os.path.join(directory, f"{g.name}{i}"), state, g.name)
        )
        for g in (a, b)
        for i in range(STACKS)
    ]
    while _io(a.stats()) + _io(b.stats()) < 50:  # warm up: both queues backlogged
        await asyncio.sleep(0.01)
    before = {g.name: (_io(g.stats()), state[g.name]) for g in (a, b)}
    while _io(a.stats()) + _io(b.stats()) - sum(v[0] for v in before.values()) < OPERATIONS:
        await asyncio.sleep(0.01)
    after = {g.name: (_io(g.stats()), state[g.name]) for g in (a, b)}
    waits = a.stats()["io_waits"] + b.stats()["io_waits"]
    state["stop"] = True
    await asyncio.gather(*tasks)
    return {
        "waits": waits,
        **{n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in ("a", "b")},
    }


def test_saturated_io_is_admitted_by_shares(tmp_path: Any) -> None:
    used = uvloop.run(_split(str(tmp_path)))
    assert used["waits"] > OPERATIONS // 2, used  # the queue was saturated: it held ops back
    admitted = used["a"][0] / used["b"][0]
    completed = used["a"][1] / used["b"][1]
    assert abs(admitted - 3.0) <= 0.3, used  # ops admitted by the queue, a:b
    assert abs(completed - 3.0) <= 0.45, used  # write+flush rounds the stacks completed


def test_io_capacity_is_checked() -> None:
    async def bad() -> None:
        with pytest.raises(SchedulingError, match="capacity must be an integer"):
            configure_io(capacity=0)

    asyncio.run(bad())
