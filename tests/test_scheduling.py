"""Scheduling groups share a loop's time by shares, in thread CPU time.

Every assertion is on CPU time: the scheduler's own accounting (each group's
runtime, read from the thread CPU clock at the ends of its slices) and the work
units each group's code completed, never on wall-clock durations.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

import shardio
from shardio import tame
from shardio.errors import SchedulingError
from shardio.tame import stacks

#: CPU seconds the groups use together in each split test (SHARDIO_SCHED_CPU to change).
TOTAL_CPU = float(os.environ.get("SHARDIO_SCHED_CPU", "1.0"))
TOLERANCE = 0.10
COROUTINES = 64


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def _unit() -> None:
    """About 20 µs of pure-Python CPU work."""
    total = 0
    for i in range(400):
        total += i * i


def _stack_hog(state: dict[str, Any], name: str) -> int:
    """On a tame stack: work units until told to stop, a tamed call (checkpoint) between."""
    n = 0
    while not state["stop"]:
        _unit()
        n += 1
        state[name] = n
        tame.checkpoint()
    return n


def _sleeping_hog(state: dict[str, Any], name: str) -> int:
    """Like _stack_hog, but every unit ends in a real wait (a zero sleep: a loop timer
    resumes the stack), so every resumption comes from the loop, not the scheduler."""
    sleep = tame.env().sleep
    n = 0
    while not state["stop"]:
        _unit()
        n += 1
        state[name] = n
        sleep(0)
        _check_group(state, name)
    return n


def _check_group(state: dict[str, Any], name: str) -> None:
    """Count the steps that ran outside their group's slice (there must be none)."""
    if shardio.scheduling.current_group_name() != name:
        state["outside"] += 1


async def _coroutine_hog(state: dict[str, Any], name: str) -> int:
    """Work units in a coroutine; between two, it waits for a future the loop completes
    (odd units) or yields bare (asyncio.sleep(0), even units)."""
    loop = asyncio.get_running_loop()
    n = 0
    while not state["stop"]:
        _unit()
        n += 1
        state[name] += 1
        if n % 2:
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            await future
        else:
            await asyncio.sleep(0)
        _check_group(state, name)
    return n


def _runtime(group: shardio.SchedulingGroup) -> float:
    return group.stats()["runtime_ms"] / 1e3


async def _until_cpu(groups: list[shardio.SchedulingGroup], seconds: float) -> None:
    start = sum(_runtime(g) for g in groups)
    give_up = time.monotonic() + 60 * seconds + 10  # generous: the groups must get CPU at all
    while sum(_runtime(g) for g in groups) - start < seconds:
        assert time.monotonic() < give_up, f"{groups} were accounted too little CPU time"
        await asyncio.sleep(0.02)


def _check_ratio(
    what: str, a: float, b: float, expected: float, tolerance: float = TOLERANCE,
    above: float | None = None,
) -> None:
    """a/b within ``tolerance`` of ``expected`` (above it within ``above``, if given)."""
    ratio = a / b
    high = tolerance if above is None else above
    assert expected * (1 - tolerance) <= ratio <= expected * (1 + high), (
        f"{what}: {a:.4g} / {b:.4g} = {ratio:.3f}, expected {expected} "
        f"-{tolerance:.0%}/+{high:.0%}"
    )


async def _split(kind_a: str, kind_b: str, shares_a: float, shares_b: float) -> dict[str, Any]:
    a = shardio.SchedulingGroup("a", shares_a)
    b = shardio.SchedulingGroup("b", shares_b)
    state: dict[str, Any] = {"stop": False, "a": 0, "b": 0, "outside": 0}

    def launch(group: shardio.SchedulingGroup, kind: str) -> asyncio.Future[int]:
        if kind == "stack":
            return asyncio.ensure_future(group.call(_stack_hog, state, group.name))
        if kind == "sleeping-stack":
            return asyncio.ensure_future(group.call(_sleeping_hog, state, group.name))
        # Several coroutines, so the group always has a step ready: one alone waits a
        # loop iteration or two for each future, and no scheduler can give it more.
        return asyncio.gather(
            *(group.create_task(_coroutine_hog(state, group.name)) for _ in range(COROUTINES))
        )

    tasks = [launch(a, kind_a), launch(b, kind_b)]
    await _until_cpu([a, b], 0.2)  # warm-up: both running
    before = {g.name: (_runtime(g), state[g.name]) for g in (a, b)}
    await _until_cpu([a, b], TOTAL_CPU)
    after = {g.name: (_runtime(g), state[g.name]) for g in (a, b)}
    state["stop"] = True
    await asyncio.gather(*tasks)
    assert state["outside"] == 0, f"{state['outside']} steps ran outside their group"
    return {
        name: (after[name][0] - before[name][0], after[name][1] - before[name][1])
        for name in ("a", "b")
    }


def _split_in_a_fresh_process(loop: str, kind_a: str, kind_b: str, shares_a: float,
                              shares_b: float) -> dict[str, Any]:
    """``_split`` in a fresh interpreter, as a shard's loop runs.

    A CPU-time measurement must not share its process with what hundreds of earlier
    tests left behind: in one full-suite run (3.11, CI) the in-process split gave the
    right 3:1 of accounted CPU but only 2:1 of work units, which no run alone, loaded
    or not, reproduced.
    """
    code = (
        "import asyncio, json, sys\n"
        "import uvloop\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_scheduling as t\n"
        "run = uvloop.run if sys.argv[2] == 'uvloop' else asyncio.run\n"
        "used = run(t._split(sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6])))\n"
        "print(json.dumps(used))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), loop, kind_a, kind_b,
         str(shares_a), str(shares_b)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "kinds",
    [("stack", "stack"), ("sleeping-stack", "sleeping-stack"), ("coroutine", "coroutine")],
    ids=["stacks", "sleeping-stacks", "coroutines"],
)
def test_cpu_bound_groups_split_by_shares(loop_kind: str, kinds: tuple[str, str]) -> None:
    """300:100 gives 3:1 of the CPU time, in the scheduler's accounting and in work done."""
    used = _split_in_a_fresh_process(loop_kind, *kinds, 300, 100)
    _check_ratio("accounted CPU a/b", used["a"][0], used["b"][0], 3.0)
    # Work done, a check independent of the accounting. Each slice also costs the
    # dispatcher's own work (a switch of window, two clock reads, a resumption with
    # cold caches), and the group with fewer shares has shorter slices (a third of
    # the quota here), so more of them per CPU second: that overhead can only *raise*
    # a/b. It is a fixed cost against slices of fixed time, so the slower and busier
    # the CPU, the more: within +15 % on the earlier hosts; 3.36-3.45 alone and
    # 3.47-3.65 inside the full suite on the slower EPYC host of 2026-12-02 (about
    # 20-40 us per slice), with the accounted CPU at 3.00. Below 3:1 nothing excuses
    # a shortfall: -15 % catches a 2:1 split; +35 % still catches a 4.5:1 one.
    _check_ratio("work units a/b", used["a"][1], used["b"][1], 3.0, tolerance=0.15, above=0.35)


def test_a_stack_group_and_a_coroutine_group_split_evenly() -> None:
    used = _split_in_a_fresh_process("uvloop", "stack", "coroutine", 100, 100)
    _check_ratio("accounted CPU stack/coroutine", used["a"][0], used["b"][0], 1.0)
    # Work units are not compared: a coroutine step (a task step, a turn, a sleep(0))
    # costs more than a checkpoint, so equal CPU does fewer units on the coroutine side.
    assert used["b"][1] > 0.5 * used["a"][1], used


async def _idle_then_busy() -> dict[str, float]:
    """Group a (100) works alone while b (300) waits on an event, then b works too."""
    a = shardio.SchedulingGroup("a", 100)
    b = shardio.SchedulingGroup("b", 300)
    loop = asyncio.get_running_loop()
    go = loop.create_future()
    state: dict[str, Any] = {"stop": False, "a": 0, "b": 0}

    def waits_then_hogs() -> int:
        tame.wait(go)
        return _stack_hog(state, "b")

    ta = asyncio.ensure_future(a.call(_stack_hog, state, "a"))
    tb = asyncio.ensure_future(b.call(waits_then_hogs))
    await _until_cpu([a], 0.1)
    cpu0, a0 = time.thread_time(), _runtime(a)
    await _until_cpu([a], TOTAL_CPU / 2)
    alone = (_runtime(a) - a0) / (time.thread_time() - cpu0)
    go.set_result(None)  # b wakes after a long idle time: it gets no credit for it
    before = {g.name: _runtime(g) for g in (a, b)}
    await _until_cpu([a, b], TOTAL_CPU / 4)
    after = {g.name: _runtime(g) for g in (a, b)}
    state["stop"] = True
    await asyncio.gather(ta, tb)
    return {"alone": alone, "a": after["a"] - before["a"], "b": after["b"] - before["b"]}


def test_an_idle_groups_shares_go_to_the_others_without_credit() -> None:
    """While b and the default group are idle, a (the lowest shares) gets the thread's
    time; when b wakes, the split is 3:1 at once: b banked nothing while idle."""
    used = uvloop.run(_idle_then_busy())
    assert used["alone"] >= 0.8, used  # a's share of the thread's CPU while alone
    _check_ratio("accounted CPU b/a after b woke", used["b"], used["a"], 3.0)


async def _busy_default_against(shares: float) -> dict[str, float]:
    """A default-group coroutine hogs the loop (plain task) against a group's stack."""
    group = shardio.SchedulingGroup("g", shares)
    state: dict[str, Any] = {"stop": False, "g": 0, "default": 0}
    cpu = {"default": 0.0}

    async def default_hog() -> None:
        while not state["stop"]:
            start = time.thread_time()
            for _ in range(5):
                _unit()
            cpu["default"] += time.thread_time() - start
            await asyncio.sleep(0)

    plain = asyncio.ensure_future(default_hog())
    in_group = asyncio.ensure_future(group.call(_stack_hog, state, "g"))
    await _until_cpu([group], 0.05)
    g0, d0 = _runtime(group), cpu["default"]
    while _runtime(group) - g0 + cpu["default"] - d0 < TOTAL_CPU / 2:
        await asyncio.sleep(0.02)
    result = {"group": _runtime(group) - g0, "default": cpu["default"] - d0}
    state["stop"] = True
    await asyncio.gather(plain, in_group)
    return result


def test_the_default_group_competes_with_its_shares() -> None:
    """Work outside any group (a plain task) against a group: 1000:250 gives 4:1."""
    used = uvloop.run(_busy_default_against(250))
    # The default's CPU is what its coroutine measured itself; the scheduler counts the
    # loop's own work on the default's side too, less its estimate of an idle iteration
    # (at most FLOOR_CAP per dispatch), so the split is 4:1 within ±25 % here.
    ratio = used["default"] / used["group"]
    assert 4.0 * 0.75 <= ratio <= 4.0 * 1.25, used


async def _nested() -> dict[str, Any]:
    g = shardio.SchedulingGroup("nested", 100)
    seen: dict[str, Any] = {}

    def on_stack() -> str | None:
        return shardio.scheduling.current_group_name()

    async def coroutine() -> Any:
        seen["coroutine"] = shardio.scheduling.current_group_name()
        seen["task"] = asyncio.current_task() is not None
        await asyncio.sleep(0.001)
        seen["after_sleep"] = shardio.scheduling.current_group_name()
        seen["inherited_call"] = await tame.call(on_stack)  # no group=: joins this one
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        except TimeoutError:
            seen["timeout"] = True
        return "result"

    seen["result"] = await g.create_task(coroutine())
    seen["stack"] = await g.call(on_stack)
    seen["outside"] = shardio.scheduling.current_group_name()
    seen["plain_stack"] = await tame.call(on_stack)
    return seen


def test_group_work_knows_its_group_and_asyncio_still_works() -> None:
    seen = uvloop.run(_nested())
    assert seen == {
        "coroutine": "nested",
        "task": True,
        "after_sleep": "nested",
        "inherited_call": "nested",
        "timeout": True,
        "result": "result",
        "stack": "nested",
        "outside": None,
        "plain_stack": None,
    }


async def _cancel_both() -> dict[str, Any]:
    g = shardio.SchedulingGroup("cancel", 100)
    out: dict[str, Any] = {}

    def sleeper() -> None:
        try:
            tame.env().sleep(10)
        finally:
            out["stack_unwound"] = shardio.scheduling.current_group_name()

    async def coroutine() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            out["coroutine_unwound"] = shardio.scheduling.current_group_name()

    for make in (
        lambda: asyncio.ensure_future(g.call(sleeper)),
        lambda: g.create_task(coroutine()),
    ):
        task = make()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    out["queue"] = g.stats()["queue_length"]
    out["free_stacks"] = tame.stats()["free_stacks"] == tame.stats()["stacks"]
    return out


def test_cancelling_group_work_unwinds_it_inside_the_group() -> None:
    out = uvloop.run(_cancel_both())
    assert out == {
        "stack_unwound": "cancel",
        "coroutine_unwound": "cancel",
        "queue": 0,
        "free_stacks": True,
    }


def test_misuse_gets_scheduling_errors() -> None:
    with pytest.raises(SchedulingError, match="shares must be a number"):
        shardio.SchedulingGroup("x", 0)
    with pytest.raises(SchedulingError, match="non-empty name"):
        shardio.SchedulingGroup("", 10)
    with pytest.raises(SchedulingError, match="default group"):
        shardio.SchedulingGroup("default", 10)
    with pytest.raises(SchedulingError, match="running loop"):
        shardio.SchedulingGroup("x", 10).stats()

    async def bad() -> None:
        with pytest.raises(SchedulingError, match="coroutine object"):
            shardio.SchedulingGroup("x", 10).create_task(lambda: None)  # type: ignore[arg-type]
        with pytest.raises(SchedulingError, match="default group: shares"):
            shardio.scheduling.set_default_shares(-1)

    asyncio.run(bad())


def test_groups_pickle_as_values() -> None:
    import pickle

    g = shardio.SchedulingGroup("bg", 50)
    copy = pickle.loads(pickle.dumps(g))
    assert copy == g and copy.shares == 50 and hash(copy) == hash(g)


async def _ready_queue_turns() -> dict[str, int]:
    rt = stacks.runtime()
    calls = {"run_ready": 0, "turns": 0}
    original = type(rt)._run_ready

    def counted() -> None:
        calls["run_ready"] += 1
        original(rt)

    rt._run_ready = counted  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    state = {"stop": False}

    def tick() -> None:
        calls["turns"] += 1
        if not state["stop"]:
            loop.call_soon(tick)

    def hog() -> None:
        end = time.thread_time() + 0.15
        while time.thread_time() < end:
            _unit()
            tame.checkpoint()

    loop.call_soon(tick)
    await asyncio.gather(*(tame.call(hog) for _ in range(16)))
    state["stop"] = True
    calls["quota_yields"] = tame.stats()["quota_yields"]
    return calls


def test_run_ready_queues_itself_once_per_turn_not_once_per_yield() -> None:
    """16 stacks cut by the quota: the deferred-resume callback runs at most once per
    loop turn (it used to queue one more of itself per quota yield, piling up)."""
    calls = uvloop.run(_ready_queue_turns())
    assert calls["quota_yields"] > 100, calls
    assert calls["run_ready"] <= calls["turns"] + 2, calls
