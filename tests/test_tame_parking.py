"""The wake-up token and the quota check in C (shardio.tame._parking): their edges.

A Parked is armed from its creation until its first wake, or until an exception
thrown into its park disarms it; waking it afterwards must not resume the stack,
which by then waits somewhere else. The arrival check must requeue a stack woken
when the window's quota is spent, on the runtime's own accounting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from greenlet import greenlet

from shardio import tame
from shardio.tame import _parking, stacks
from shardio.tame.stacks import NotOnTameStack, Parked, TameError

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    return uvloop.run if request.param == "uvloop" else asyncio.run  # type: ignore[return-value]


async def until(cond: Callable[[], bool]) -> None:
    """Let the loop turn until cond() holds (bounded: a hang fails the test)."""
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def test_parked_outside_a_tame_stack_raises_not_on_tame_stack(run: Runner) -> None:
    async def main() -> None:
        with pytest.raises(NotOnTameStack, match="needs a tame stack"):
            Parked("lock", None)  # a coroutine of the loop
        with pytest.raises(NotOnTameStack):
            greenlet(Parked).switch("event")  # a greenlet that is not a tame stack

    with pytest.raises(NotOnTameStack):
        Parked()  # no loop at all
    run(main())


def test_the_first_wake_wins(run: Runner) -> None:
    """Once woken, the stack runs on and parks elsewhere: a second wake of the first
    token must not resume that second wait."""
    tokens: list[Parked] = []

    def body() -> tuple[Any, Any]:
        first = Parked("event", "first")
        tokens.append(first)
        a = first.park()
        second = Parked("event", "second")
        tokens.append(second)
        return a, second.park()

    async def main() -> tuple[Any, Any]:
        task = asyncio.ensure_future(tame.call(body))
        await until(lambda: len(tokens) == 1)
        first = tokens[0]
        assert first.armed and first.kind == "event" and first.target == "first"
        first.wake("a")  # the stack runs on until it parks on the second token
        assert not first.armed and len(tokens) == 2 and tokens[1].armed
        first.wake("late")  # ignored
        assert tokens[1].armed
        tokens[1].wake("b")
        return await task

    assert run(main()) == ("a", "b")


def test_an_exception_thrown_into_park_disarms_it(run: Runner) -> None:
    """A cancelled wait disarms its token: waking it later does nothing, though the
    stack (unwinding in a finally) waits on another token by then; parking it again
    is refused."""
    tokens: list[Parked] = []
    seen: list[str] = []

    def body() -> Any:
        p = Parked("event", "cancelled")
        tokens.append(p)
        try:
            p.park()
        except asyncio.CancelledError:
            seen.append(f"cancelled armed={p.armed}")
            with pytest.raises(TameError, match="not armed"):
                p.park()
            cleanup = Parked("event", "cleanup")
            tokens.append(cleanup)
            seen.append(f"cleanup got {cleanup.park()!r}")
            raise

    async def main() -> None:
        task = asyncio.ensure_future(tame.call(body))
        await until(lambda: len(tokens) == 1)
        task.cancel()
        await until(lambda: len(tokens) == 2)
        assert not tokens[0].armed and tokens[0].g is None
        tokens[0].wake("stale")  # must not resume the cleanup wait
        assert tokens[1].armed
        tokens[1].wake("fresh")
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert seen == ["cancelled armed=False", "cleanup got 'fresh'"]


def test_wake_of_a_finished_stacks_token_does_nothing(run: Runner) -> None:
    """A token kept after its stack finished (and went back to the pool, where the
    next job reuses it) is dead: waking it must not switch into the reused stack."""
    kept: list[Parked] = []

    def first() -> None:
        p = Parked("event", "kept")
        kept.append(p)
        p.wake_soon("done")  # from the stack: resumes it on the loop's next iteration
        assert p.park() == "done"

    def second() -> Any:
        p = Parked("event", "second job")
        kept.append(p)
        return p.park()

    async def main() -> Any:
        await tame.call(first)
        task = asyncio.ensure_future(tame.call(second))
        await until(lambda: len(kept) == 2)
        assert kept[0].g is None and kept[1].g is not None
        kept[0].wake("stale")
        assert kept[1].armed
        kept[1].wake("ok")
        return await task

    assert run(main()) == "ok"


def test_an_arrival_past_the_quota_is_requeued(run: Runner) -> None:
    """Two stacks woken back to back in one loop callback, with a quota no slice can
    stay within: the second one's arrival finds the window spent and queues itself for
    a later turn (the runtime counts it in deferred_resumes) instead of running on."""

    def body(tokens: list[Parked], ran: list[int], i: int) -> None:
        p = Parked("event", i)
        tokens.append(p)
        p.park()
        ran.append(i)

    async def woken_together(quota: float | None) -> tuple[list[int], int, list[int]]:
        tame.configure(quota=quota)
        tokens: list[Parked] = []
        ran: list[int] = []
        tasks = [asyncio.ensure_future(tame.call(body, tokens, ran, i)) for i in range(2)]
        await until(lambda: len(tokens) == 2)
        before = tame.stats()["deferred_resumes"]
        for p in tokens:
            p.wake()
        in_the_callback = list(ran)
        deferred = tame.stats()["deferred_resumes"] - before
        await asyncio.gather(*tasks)
        return in_the_callback, deferred, sorted(ran)

    in_the_callback, deferred, ran = run(woken_together(1e-9))
    assert 1 not in in_the_callback and deferred >= 1 and ran == [0, 1]
    # Contrast: without preemption both run on within the callback.
    in_the_callback, deferred, ran = run(woken_together(None))
    assert in_the_callback == [0, 1] and deferred == 0 and ran == [0, 1]


def test_a_sleep_interrupted_by_a_cancel_cancels_its_timer(run: Runner) -> None:
    """_parking.suspend (the sleep's park) lets the cancellation out, and the sleep's
    timer is cancelled: it must not resume the stack in its later wait."""
    tokens: list[Parked] = []

    def body() -> Any:
        try:
            tame.env().sleep(0.05)
        except asyncio.CancelledError:
            p = Parked("event", "after the sleep")
            tokens.append(p)
            return p.park()
        return "not cancelled"

    async def main() -> Any:
        task = asyncio.ensure_future(tame.call(body))
        await until(lambda: stacks.runtime().stats.blocked_calls == 1)
        task.cancel()
        await until(lambda: len(tokens) == 1)
        await asyncio.sleep(0.1)  # the sleep's timer would have fired by now
        assert tokens[0].armed
        tokens[0].wake("woken by its token")
        return await task

    assert run(main()) == "woken by its token"


def test_checkpoint_and_current_runtime_off_and_on_a_stack(run: Runner) -> None:
    async def main() -> None:
        assert tame.checkpoint() is None and stacks.current_runtime() is None
        rt = stacks.runtime()

        def body() -> tuple[Any, Any]:
            return tame.checkpoint(), stacks.current_runtime()

        assert await tame.call(body) == (rt, rt)

    run(main())


def test_the_deadline_clock_is_perf_counter() -> None:
    """Deadlines are computed in Python from time.perf_counter() and compared in C with
    _parking.clock(): the two must be one clock."""
    for _ in range(1000):
        before = time.perf_counter()
        c = _parking.clock()
        after = time.perf_counter()
        assert before <= c <= after


@pytest.mark.parametrize("quota", [None, 1e-6])
def test_stress_many_stacks_woken_in_random_order(run: Runner, quota: float | None) -> None:
    """120 stacks wait on 30 tokens each; the loop wakes the armed tokens in random
    order, each twice (the second wake must be lost), and cancels every tenth call half
    way. Every stack must see exactly the values meant for its own tokens, in order,
    with a quota that requeues most arrivals (and CPU accounting on) or none."""
    import random

    stacks_n, waits = 120, 30
    rng = random.Random(7)
    waiting: dict[int, Parked] = {}
    received: dict[int, list[int]] = {i: [] for i in range(stacks_n)}

    def body(i: int) -> None:
        for k in range(waits):
            p = Parked("event", (i, k))
            waiting[i] = p
            received[i].append(p.park())

    async def main() -> tuple[int, int, set[int]]:
        tame.configure(quota=quota, account_cpu=True)
        tasks = {i: asyncio.ensure_future(tame.call(body, i)) for i in range(stacks_n)}
        cancelled: set[int] = set()
        sent = 0
        while any(not t.done() for t in tasks.values()):
            armed = [(i, p) for i, p in waiting.items() if p.armed]
            rng.shuffle(armed)
            for i, p in armed:
                if i % 10 == 0 and len(received[i]) == waits // 2 and i not in cancelled:
                    cancelled.add(i)
                    tasks[i].cancel()
                    continue
                value = i * 1000 + len(received[i])
                p.wake(value)
                p.wake(-1)  # lost: the first wake won
                sent += 1
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        failed = {i for i, r in zip(tasks, results, strict=True) if isinstance(r, BaseException)}
        return sent, tame.stats()["deferred_resumes"], failed - cancelled

    sent, deferred, unexpected = run(main())
    assert not unexpected
    for i, got in received.items():
        n = waits // 2 if i % 10 == 0 else waits
        assert got == [i * 1000 + k for k in range(n)], i
    assert sent == sum(len(v) for v in received.values())
    if quota is not None:
        assert deferred > 0


def test_call_below_calls_its_function_and_refuses_bad_sizes() -> None:
    """_parking.call_below (where a new tame stack is first entered): the function's
    result and exceptions come through; a size outside 1..1 MiB is refused."""
    assert _parking.call_below(4096, lambda a, b: a + b, 1, 2) == 3
    with pytest.raises(KeyError):
        _parking.call_below(4096, {}.__getitem__, "missing")
    for bad in (0, -1, (1 << 20) + 1):
        with pytest.raises(ValueError, match="nbytes must be in 1..1048576"):
            _parking.call_below(bad, print)
    with pytest.raises(TypeError):
        _parking.call_below(4096)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_start_from_a_tame_stack_is_refused_and_the_pool_still_serves(loop: str) -> None:
    """tame.start on a tame stack is misuse: TameError, and the stack it took from the
    pool (new, since every other is busy: made on a tame stack, so not entered from
    the loop's depth) goes back and runs the next jobs."""

    async def main() -> list[int]:
        def misuse() -> str:
            try:
                tame.start(print)
            except TameError as exc:
                return str(exc)
            return "no error"

        rt = stacks.runtime()
        before = rt.stats.stacks_created
        message = await tame.call(misuse)
        assert message == "tame.start must be called from the loop, not from a tame stack"
        assert rt.stats.stacks_created == before + 2  # the caller's and the refused one
        return list(await asyncio.gather(*(tame.call(int, "7") for _ in range(4))))

    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(main()) == [7, 7, 7, 7]
