"""Shard-side helpers of test_tame_dump: park tame stacks on known things, release them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shardio import tame
from shardio.tame import stacks

_held: dict[str, Any] = {}


def _hold_lock(lock: Any, go: Any) -> str:
    with lock:
        go.wait()
    return "held"


def _wait_lock(lock: Any) -> str:
    with lock:
        return "locked"


def _sleep_long() -> str:
    tame.env().sleep(60)
    return "slept"


def _wait_future(fut: asyncio.Future[str]) -> str:
    return tame.wait(fut)


def _join_thread() -> str:
    handle = tame.env().start_thread(_sleep_long, name="sleeper-thread")
    handle.join()
    return "joined"


async def park_stacks() -> int:
    """Start stacks parked on an event, a lock, a timer, a future and a tame thread."""
    env = stacks.runtime().env
    lock, go = env.Lock(), env.Event()
    fut = asyncio.get_running_loop().create_future()
    tasks = [
        asyncio.ensure_future(tame.call(_hold_lock, lock, go)),
        asyncio.ensure_future(tame.call(_wait_lock, lock)),
        asyncio.ensure_future(tame.call(_sleep_long)),
        asyncio.ensure_future(tame.call(_wait_future, fut)),
        asyncio.ensure_future(tame.call(_join_thread)),
    ]
    _held.update(go=go, fut=fut, tasks=tasks)
    await asyncio.sleep(0.05)
    return len(tasks)


async def release_stacks() -> list[Any]:
    """Let every parked stack finish (the sleepers are cancelled); their outcomes."""
    _held["go"].set()
    _held["fut"].set_result("resolved")
    tasks = _held.pop("tasks")
    tasks[2].cancel()
    tasks[4].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.01)
    for task in asyncio.all_tasks():  # the tame thread's own task
        if task.get_name() == "sleeper-thread":
            task.cancel()
    return [r if isinstance(r, str) else type(r).__name__ for r in results]


async def block_reactor_on_a_stack(seconds: float) -> None:
    """A tame stack that blocks the reactor thread itself (an unpatched time.sleep)."""
    await tame.call(_blocking_sleep, seconds)


def _blocking_sleep(seconds: float) -> None:
    time.sleep(seconds)  # deliberately not tamed: the reactor stalls
