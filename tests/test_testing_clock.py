"""The virtual clock: one paused time for every shard, on both backends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

import shardio
from shardio import tame
from shardio.testing import Clock, ClockError, virtual_group


@pytest.fixture(scope="module", params=["process", "thread"])
def group(request):
    with virtual_group(2, backend=request.param) as group:
        for shard in range(group.shards):  # process shards import this module once, here
            group.submit(shard, loop_time).result(timeout=30)
        yield group
    group.options.loop.close()


@pytest.fixture
def clock(group):
    clock = Clock(group, timeout=5.0)
    clock.pause()
    yield clock
    clock.resume()


# ---------------------------------------------------------------- shard functions


async def nap(seconds, value=None):
    await asyncio.sleep(seconds)
    return value


def loop_time():
    return asyncio.get_running_loop().time()


async def wait_for_nothing(timeout):
    start = asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(asyncio.get_running_loop().create_future(), timeout)
    except TimeoutError:
        return asyncio.get_running_loop().time() - start
    return None


async def timeout_block(seconds):
    try:
        async with asyncio.timeout(seconds):
            await asyncio.sleep(seconds * 10)
    except TimeoutError:
        return "timed out"


def tame_sleeper(seconds):
    tame.env().sleep(seconds)
    return "woke"


async def tame_sleep(seconds):
    return await tame.call(tame_sleeper, seconds)


_log: list = []


def record(item):
    _log.append(item)


def take_log():
    items = list(_log)
    _log.clear()
    return items


async def relay_after(seconds, shard, item):
    """Sleep, then hop to ``shard``, which sleeps half as long, then records."""
    await asyncio.sleep(seconds)
    await shardio.submit_to(shard, record_after, seconds / 2, item)


async def record_after(seconds, item):
    await asyncio.sleep(seconds)
    record(item)


async def spin_forever():
    while True:
        await asyncio.sleep(0)


async def in_shard_clock(peer):
    clock = Clock(timeout=5.0)
    clock.pause()
    start = clock.time()
    nap_there = asyncio.ensure_future(shardio.submit_to(peer, nap, 120, "peer"))
    nap_here = asyncio.ensure_future(nap(60, "here"))
    await clock.settle_async()
    assert not nap_there.done() and not nap_here.done()
    clock.advance(60)
    assert await nap_here == "here"
    clock.advance(60)
    assert await nap_there == "peer"
    await clock.settle_async()
    elapsed = clock.time() - start
    clock.resume()
    return elapsed


# ---------------------------------------------------------------- tests


def test_an_hour_of_sleep_passes_in_an_instant(group, clock):
    start = time.monotonic()
    naps = [group.submit(shard, nap, 3600, shard) for shard in range(group.shards)]
    clock.settle()  # every shard now sleeps in its selector, an hour ahead
    assert not any(future.done() for future in naps)
    clock.advance(3599)
    clock.settle()
    assert not any(future.done() for future in naps)
    clock.advance(1)
    assert [future.result(timeout=1) for future in naps] == [0, 1]
    assert time.monotonic() - start < 10.0  # far less than the virtual seconds it covered


def test_time_stands_still_while_paused_and_goes_on_from_there(group, clock):
    before = group.submit(0, loop_time).result(timeout=5)
    time.sleep(0.05)
    assert group.submit(1, loop_time).result(timeout=5) == before == clock.time()
    clock.advance(10)
    assert group.submit(1, loop_time).result(timeout=5) == pytest.approx(before + 10)
    resumed_at = time.monotonic()
    clock.resume()
    time.sleep(0.02)
    after = group.submit(0, loop_time).result(timeout=5)
    since_resume = time.monotonic() - resumed_at
    # From where it stood, at the pace of CLOCK_MONOTONIC: no jump, no lost time.
    assert 0.02 <= after - (before + 10) <= since_resume


def test_wait_for_and_timeout_expire_without_real_waiting(group, clock):
    start = time.monotonic()
    waiting = group.submit(0, wait_for_nothing, 30)
    blocked = group.submit(1, timeout_block, 5)
    clock.settle()
    clock.advance(29)
    clock.settle()
    assert not waiting.done()
    assert blocked.result(timeout=1) == "timed out"
    clock.advance(1)
    assert waiting.result(timeout=1) == pytest.approx(30)
    assert time.monotonic() - start < 10.0  # far less than the virtual seconds it covered


def test_tame_env_sleep_follows_the_virtual_clock(group, clock):
    sleeping = group.submit(1, tame_sleep, 600)
    clock.settle()
    assert not sleeping.done()
    clock.advance(600)
    assert sleeping.result(timeout=1) == "woke"


def test_settle_waits_for_work_across_shards(group, clock):
    relay = group.submit(0, relay_after, 10, 1, "relayed")
    clock.settle()  # the call reached its sleep: advancing now moves its timer
    clock.advance(10)  # shard 0 wakes and hops to shard 1, which sleeps 5 more
    clock.settle()
    assert group.submit(1, take_log).result(timeout=5) == []
    clock.advance(5)
    clock.settle()  # without waiting on relay: settle alone saw the record through
    assert group.submit(1, take_log).result(timeout=5) == ["relayed"]
    assert relay.result(timeout=1) is None


def test_settle_gives_up_on_shards_that_never_rest(group):
    clock = Clock(group, timeout=0.3)
    clock.pause()
    spinning = group.submit(1, spin_forever)
    try:
        with pytest.raises(ClockError, match="shard 1 has ready callbacks"):
            clock.settle()
    finally:
        spinning.cancel()
        group.submit(1, cancel_spinners).result(timeout=5)
        clock.resume()


def cancel_spinners():
    for task in asyncio.all_tasks():
        if task.get_coro().__name__ == "spin_forever":
            task.cancel()


def test_the_clock_works_from_inside_a_shard(group):
    start = time.monotonic()
    assert group.submit(0, in_shard_clock, 1).result(timeout=5) == pytest.approx(120)
    assert time.monotonic() - start < 10.0  # far less than the virtual seconds it covered


def test_clock_needs_a_virtual_time_group():
    with shardio.ShardGroup(1, backend="thread") as plain, pytest.raises(
            ClockError, match="virtual_group"):
        Clock(plain)
    virtual_time = virtual_group(1).options.loop
    with pytest.raises(ValueError, match="forward"):
        virtual_time.advance(-1)
    virtual_time.close()


# ---------------------------------------------------------------- races, under load

CYCLES = int(os.environ.get("SHARDIO_CLOCK_CYCLES", "300"))
"""Cycles of the documented example per run (``SHARDIO_CLOCK_CYCLES=1000`` for the long run)."""


@pytest.fixture
def busy_cpus():
    """Two processes spinning beside the shards, so the CPUs are contended."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for spinner in spinners:
        spinner.kill()
        spinner.wait()


def test_the_documented_example_never_loses_the_sleeper_on_busy_cpus(busy_cpus):
    """pause; an hour-long sleep to shard 1; settle(); advance(3600): the sleep is over."""
    lost = 0
    with virtual_group(2, backend="process") as group:
        clock = Clock(group, timeout=10.0)
        for _ in range(CYCLES):
            clock.pause()
            rested = group.submit(1, asyncio.sleep, 3600, "rested")
            clock.settle()
            clock.advance(3600)
            try:
                rested.result(timeout=2)
            except TimeoutError:  # its timer landed past the hour: get it out, count it
                lost += 1
                clock.advance(60)
                rested.result(timeout=5)
            clock.resume()
    group.options.loop.close()
    assert lost == 0, f"{lost} of {CYCLES} sleepers were still asleep after advance(3600)"


def read_time_steadily(reads):
    """On a shard: read the virtual time ``reads`` times; (backward steps, distinct values)."""
    virtual_time = asyncio.get_running_loop().virtual_time
    backward, last, values = 0, 0, set()
    for _ in range(reads):
        now = virtual_time.now_ns()
        if now < last:
            backward += 1
        last = now
        values.add(now)
    return backward, len(values)


def test_no_reader_sees_a_time_past_a_pause(busy_cpus):
    """A pause lands at or after every time a reader saw before it: time never goes back.

    The shards read the clock in a tight loop while the owner pauses and
    resumes it as fast as it can.  A pause that took its time from
    CLOCK_MONOTONIC before readers stopped reading the running time would
    let a reader see a time, then the (earlier) paused one.
    """
    with virtual_group(2, backend="process") as group:
        virtual_time = group.options.loop
        readers = [group.submit(shard, read_time_steadily, 300_000) for shard in range(2)]
        pauses = 0
        while not all(reader.done() for reader in readers):
            virtual_time.pause()
            virtual_time.resume()
            pauses += 1
        results = [reader.result() for reader in readers]
    virtual_time.close()
    assert pauses > 100, f"only {pauses} pauses overlapped the readers"
    assert all(values > 100 for _, values in results), results  # they saw it run and stop
    assert [backward for backward, _ in results] == [0, 0]


async def hold(data):
    await asyncio.sleep(3600)
    return len(data)


async def fan_out(calls, size):
    """Send ``calls`` calls to shard 1 at once: far more than its ring holds."""
    futures = [shardio.submit_to(1, hold, bytes(size)) for _ in range(calls)]
    held = shardio.current_reactor().links[1].producer_waits
    return held, sum(await asyncio.gather(*futures))


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_settle_waits_for_calls_held_by_a_full_ring(backend):
    """Calls waiting for ring space count as on their way: all reach their sleep."""
    with virtual_group(2, backend=backend, ring_bytes=16384) as group:
        clock = Clock(group, timeout=10.0)
        clock.pause()
        fanned = group.submit(0, fan_out, 100, 4096)
        clock.settle()
        clock.advance(3600)
        held, total = fanned.result(timeout=10)
        clock.resume()
    group.options.loop.close()
    assert held >= 1  # the ring was full: sends waited in the backlog
    assert total == 100 * 4096


def test_settle_accounts_for_calls_held_back_by_the_fabric_bound():
    """Three 10 s naps from the owner to a shard that may have one call in flight
    (max_calls_per_peer=1): the second and third wait, unpickled, behind the bound.
    After each advance(10), settle() must see the next one reach its sleep before the
    clock moves again, so the three finish after three advances, one each."""
    with virtual_group(1, backend="process", max_calls_per_peer=1) as group:
        clock = Clock(group)
        clock.pause()
        naps = [group.submit(0, asyncio.sleep, 10, n) for n in range(3)]
        for n in range(3):
            clock.settle()
            assert [nap.done() for nap in naps] == [True] * n + [False] * (3 - n)
            clock.advance(10)
            assert naps[n].result(timeout=10) == n
        clock.resume()
