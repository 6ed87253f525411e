"""Tame stacks: tame.call / tame.wait, pooling, cancellation, exceptions, nesting."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from shardio import tame

Runner = Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]


def test_call_returns_and_propagates_context(run: Runner) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def work(a: int, b: int = 0) -> tuple[int, str, bool]:
        return a + b, var.get(), tame.on_tame_stack()

    async def main() -> None:
        var.set("caller")
        assert await tame.call(work, 1, b=2) == (3, "caller", True)
        assert not tame.on_tame_stack()
        assert tame.env() is tame.posix_env

    run(main)


def test_wait_future_coroutine_and_outside_stack(run: Runner) -> None:
    async def answer() -> int:
        await asyncio.sleep(0.001)
        return 42

    def work(fut: asyncio.Future[str]) -> tuple[int, str]:
        return tame.wait(answer()), tame.wait(fut)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(0.01, fut.set_result, "later")
        assert await tame.call(work, fut) == (42, "later")
        coro = answer()
        with pytest.raises(tame.NotOnTameStack, match="outside a tame stack"):
            tame.wait(coro)
        coro.close()
        st = tame.stats()
        assert st["calls"] == 1 and st["blocked_calls"] == 1 and st["stacks"] == 1

    run(main)


def test_exception_reaches_caller_with_traceback(run: Runner) -> None:
    def inner_frame_that_fails() -> None:
        tame.wait(asyncio.sleep(0.001))
        raise KeyError("missing object")

    def work() -> None:
        inner_frame_that_fails()

    async def main() -> None:
        with pytest.raises(KeyError, match="missing object") as info:
            await tame.call(work)
        names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "work" in names and "inner_frame_that_fails" in names
        # the stack is back in the pool and reusable
        assert await tame.call(lambda: 7) == 7
        assert tame.stats()["stacks"] == 1

    run(main)


def test_cancel_raises_inside_blocking_call_and_runs_finally(run: Runner) -> None:
    log: list[str] = []

    def work() -> None:
        try:
            log.append("start")
            tame.wait(asyncio.sleep(10))
            log.append("not reached")
        except asyncio.CancelledError:
            log.append("cancelled inside")
            raise
        finally:
            log.append("finally")

    async def main() -> None:
        task = asyncio.ensure_future(tame.call(work))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["start", "cancelled inside", "finally"]
        st = tame.stats()
        assert st["cancellations"] == 1 and st["free_stacks"] == st["stacks"] == 1
        # wait_for timeout takes the same path
        log.clear()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tame.call(work), 0.01)
        assert log == ["start", "cancelled inside", "finally"]
        assert tame.stats()["free_stacks"] == 1

    run(main)


def test_cancel_waits_for_blocking_cleanup(run: Runner) -> None:
    """A finally block that blocks again completes before tame.call returns."""
    log: list[str] = []

    def work() -> str:
        try:
            tame.wait(asyncio.sleep(10))
        finally:
            tame.wait(asyncio.sleep(0.01))  # e.g. flushing a file while unwinding
            log.append("cleanup done")
        return "unreachable"

    def swallow() -> str:
        try:
            tame.wait(asyncio.sleep(10))
        except asyncio.CancelledError:
            pass
        tame.wait(asyncio.sleep(0.001))
        return "kept going"

    async def main() -> None:
        task = asyncio.ensure_future(tame.call(work))
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["cleanup done"]
        task = asyncio.ensure_future(tame.call(swallow))
        await asyncio.sleep(0.005)
        task.cancel()
        assert await task == "kept going"  # like a coroutine that swallows its cancel
        assert tame.stats()["free_stacks"] == tame.stats()["stacks"]

    run(main)


def test_cancel_while_waiting_for_a_stack(run: Runner) -> None:
    async def main() -> None:
        tame.configure(max_stacks=1)
        loop = asyncio.get_running_loop()
        gate = loop.create_future()
        holder = asyncio.ensure_future(tame.call(tame.wait, gate))
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(tame.call(lambda: "never"))
        await asyncio.sleep(0)
        assert tame.stats()["stack_waiters"] == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set_result("done")
        assert await holder == "done"
        assert await tame.call(lambda: "next") == "next"
        assert tame.stats()["stacks"] == 1

    run(main)


def test_pool_exhaustion_is_bounded_and_fifo(run: Runner) -> None:
    async def main() -> None:
        tame.configure(max_stacks=3)
        loop = asyncio.get_running_loop()
        started: list[int] = []
        gates = [loop.create_future() for _ in range(10)]
        peak = 0

        def work(i: int) -> int:
            nonlocal peak
            started.append(i)
            peak = max(peak, tame.stats()["stacks"])
            return tame.wait(gates[i])

        tasks = [asyncio.ensure_future(tame.call(work, i)) for i in range(10)]
        await asyncio.sleep(0.01)
        assert started == [0, 1, 2]
        assert tame.stats()["stack_waiters"] == 7
        # finish out of order; queued calls still start in arrival order
        for i in (2, 0, 1, 4, 3, 5, 6, 7, 8, 9):
            gates[i].set_result(i * 10)
            await asyncio.sleep(0.001)
        assert [await t for t in tasks] == [i * 10 for i in range(10)]
        assert started == list(range(10))
        assert peak == 3 and tame.stats()["stacks"] == 3
        assert tame.stats()["stack_waits"] == 7

    run(main)


def test_nested_tame_call(run: Runner) -> None:
    def leaf(x: int) -> int:
        tame.wait(asyncio.sleep(0.001))
        return x * 2

    def middle(x: int) -> int:
        return tame.wait(tame.call(leaf, x)) + 1

    def top() -> int:
        return tame.wait(tame.call(middle, 20))

    async def main() -> None:
        assert await tame.call(top) == 41
        assert tame.stats()["stacks"] == 3

    run(main)


def test_many_concurrent_calls_share_the_loop(run: Runner) -> None:
    def work(i: int) -> int:
        for _ in range(5):
            tame.wait(asyncio.sleep(0))
        return i

    async def main() -> None:
        results = await asyncio.gather(*(tame.call(work, i) for i in range(500)))
        assert results == list(range(500))
        assert tame.stats()["stacks"] <= tame.DEFAULT_MAX_STACKS

    run(main)


def test_runtime_needs_a_running_loop() -> None:
    coro = tame.call(lambda: 1)
    with pytest.raises(RuntimeError):
        coro.send(None)
    coro.close()
    with pytest.raises(ValueError):
        asyncio.run(_configure_zero())


async def _configure_zero() -> None:
    tame.configure(max_stacks=0)


def test_warm_up_creates_driver_and_stacks(run: Runner) -> None:
    async def main() -> None:
        rt = tame.warm_up(stacks=8)
        assert rt._uring is not None and len(rt.free) == 8
        assert tame.stats()["stacks"] == 8
        assert await tame.call(lambda: 5) == 5
        assert tame.stats()["stacks_created"] == 8

    run(main)


def test_runtime_closes_with_the_loop(run: Runner) -> None:
    """asyncio.run/uvloop.run shut the loop's async generators down: the runtime closes
    with them (ring fd, idle stacks, alien threads), so repeated runs leak nothing."""
    from shardio.tame import stacks

    async def main() -> None:
        await tame.call(lambda: stacks.runtime().uring)
        await tame.alien(lambda: None)

    run(main)  # warm-up: one-time fds of the loop implementation itself
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(10):
        run(main)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert not stacks._runtimes
