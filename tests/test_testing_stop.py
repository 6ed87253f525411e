"""stop() on a paused clock or with a lost message: it finishes in time, nothing is killed."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import shardio
from shardio import GroupStateError
from shardio.testing import Clock, intercept, virtual_group


async def wait_on(shard):
    """Call ``shard`` and wait for the answer, however long it takes."""
    return await shardio.submit_to(shard, echo, "answer")


def echo(value):
    return value


class Slow:
    """A service whose stop() takes a second of loop time."""

    async def stop(self):
        await asyncio.sleep(1.0)


async def start_slow():
    return await shardio.Sharded(Slow).start()


def stop_quickly_and_cleanly(group, timeout, caplog):
    """Stop ``group``; the real seconds it took.  Fails if a shard had to be killed."""
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="shardio.group"):
        group.stop(timeout=timeout)
    took = time.monotonic() - started
    killed = [record.message for record in caplog.records if "killing" in record.message]
    assert not killed, killed
    return took


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_stop_with_a_paused_clock_fails_the_sleeper_and_stops_at_once(backend, caplog):
    group = virtual_group(2, backend=backend).start()
    clock = Clock(group)
    clock.pause()
    sleeper = group.submit(1, asyncio.sleep, 3600, "rested")
    clock.settle()
    took = stop_quickly_and_cleanly(group, 30.0, caplog)
    group.options.loop.close()
    with pytest.raises(GroupStateError, match="call to shard 1 .*paused virtual clock"):
        sleeper.result(timeout=0)
    assert took < 10.0  # the promise: well inside the timeout, not after it


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_stop_with_a_dropped_message_on_a_paused_clock(backend, caplog):
    group = virtual_group(2, backend=backend).start()
    clock = Clock(group)
    with intercept(group) as net:
        lost = net.drop(0, 1, net.match(func=echo))
        waiting = group.submit(0, wait_on, 1)
        lost.result(timeout=10)
    clock.pause()
    took = stop_quickly_and_cleanly(group, 30.0, caplog)
    group.options.loop.close()
    with pytest.raises(GroupStateError, match="call to shard 0"):
        waiting.result(timeout=0)
    assert took < 10.0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_stop_with_a_dropped_message_on_a_real_clock_drains_half_the_timeout(loop, caplog):
    group = shardio.ShardGroup(2, backend="process", loop=loop).start()
    with intercept(group) as net:
        lost = net.drop(0, 1, net.match(func=echo))
        waiting = group.submit(0, wait_on, 1)
        lost.result(timeout=10)
    took = stop_quickly_and_cleanly(group, 3.0, caplog)
    with pytest.raises(GroupStateError, match=r"call to shard 0 returned \(stop\(\) waited"):
        waiting.result(timeout=0)
    assert took < 3.0  # it stopped the shards itself, within its timeout


def test_a_paused_clock_does_not_hold_up_a_service_stopping(caplog):
    group = virtual_group(2, backend="process").start()
    group.submit(0, start_slow).result(timeout=10)
    Clock(group).pause()
    took = stop_quickly_and_cleanly(group, 30.0, caplog)
    group.options.loop.close()
    assert took < 10.0
