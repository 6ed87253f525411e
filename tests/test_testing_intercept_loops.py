"""drop, delay, expect and inject on every loop shardio runs: uvloop, asyncio, virtual time.

On the real loops the callers' timeouts and the delays run in real time
(short ones); nothing here asserts how long anything took: order on a ring
and counts show what happened.
"""

from __future__ import annotations

import asyncio

import pytest

import shardio
from shardio.testing import Clock, Message, VirtualTime, intercept, virtual_group

LOOPS = ["uvloop", "asyncio", "virtual"]


@pytest.fixture(scope="module", params=LOOPS)
def group(request):
    if request.param == "virtual":
        group = virtual_group(3, backend="process")
    else:
        group = shardio.ShardGroup(3, backend="process", loop=request.param)
    with group:
        for shard in range(group.shards):  # process shards import this module once, here
            assert group.submit(shard, loop_name).result(timeout=30) == request.param
        yield group
    if request.param == "virtual":
        group.options.loop.close()


class Waiting:
    """Lets a short loop-time wait pass: real time on a real loop, advance() on a virtual one."""

    def __init__(self, group):
        virtual = isinstance(group.options.loop, VirtualTime)
        self.clock = Clock(group) if virtual else None
        if self.clock is not None:
            self.clock.pause()

    def past(self, seconds):
        if self.clock is not None:
            self.clock.settle()
            self.clock.advance(seconds)

    def close(self):
        if self.clock is not None:
            self.clock.resume()


@pytest.fixture
def waiting(group):
    waiting = Waiting(group)
    yield waiting
    waiting.close()


SHORT = 0.2
"""A caller's timeout, or a delay, in loop seconds."""


# ---------------------------------------------------------------- shard functions

_log: list = []


def loop_name():
    loop = asyncio.get_running_loop()
    if hasattr(loop, "virtual_time"):
        return "virtual"
    import uvloop

    return "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"  # (shardio subclasses it)


def record(item):
    _log.append(item)
    return item


def take_log():
    items = list(_log)
    _log.clear()
    return items


def log_length():
    return len(_log)


async def call_with_timeout(dst, timeout, item):
    try:
        return await asyncio.wait_for(shardio.submit_to(dst, record, item), timeout)
    except TimeoutError:
        return "timed out"


async def send_all(dst, items):
    return await asyncio.gather(*(shardio.submit_to(dst, record, item) for item in items))


def is_even_item(func, args, kwargs):
    return func is record and isinstance(args[0], int) and args[0] % 2 == 0


def received_from(peer):
    return shardio.current_reactor().links[peer].received_messages


# ---------------------------------------------------------------- tests


def test_drop(group, waiting):
    with intercept(group) as net:
        lost = net.drop(0, 1, net.match(func=record, args=("lost",)))
        call = group.submit(0, call_with_timeout, 1, SHORT, "lost")
        assert lost.result(timeout=10) == Message(0, 1, record, ("lost",), {})
        waiting.past(SHORT)
        assert call.result(timeout=10) == "timed out"
        assert group.submit(0, call_with_timeout, 1, 30, "kept").result(10) == "kept"
    assert group.submit(1, take_log).result(timeout=10) == ["kept"]


def test_delay(group, waiting):
    with intercept(group) as net:
        first = net.delay(0, 1, is_even_item, SHORT)
        sending = group.submit(0, send_all, 1, [0, 1, 2, 3, 4, 5])
        assert first.result(timeout=10).args == (0,)
        waiting.past(SHORT)
        assert sending.result(timeout=10) == [0, 1, 2, 3, 4, 5]
    # One ring from shard 0 to shard 1: the calls sent at once arrived before the delayed.
    assert group.submit(1, take_log).result(timeout=10) == [1, 3, 5, 0, 2, 4]


def test_delay_holds_its_calls_until_the_block_ends(group, waiting):
    with intercept(group) as net:
        net.delay(0, 1, is_even_item, 3600)
        sending = group.submit(0, send_all, 1, [0, 1, 2, 3])
        while group.submit(1, log_length).result(timeout=10) < 2:
            pass  # the two odd ones arrive; the even ones wait an hour
        assert not sending.done()
        assert group.submit(1, take_log).result(timeout=10) == [1, 3]
    assert sending.result(timeout=10) == [0, 1, 2, 3]  # sent, in order, on leaving the block
    assert group.submit(1, take_log).result(timeout=10) == [0, 2]


def test_expect(group):
    with intercept(group) as net:
        first_even = net.expect(None, 1, is_even_item)
        assert group.submit(2, send_all, 1, [1, 4, 6]).result(timeout=10) == [1, 4, 6]
        assert first_even.result(timeout=10) == Message(2, 1, record, (4,), {})
    assert group.submit(1, take_log).result(timeout=10) == [1, 4, 6]


def test_inject(group, waiting):
    with intercept(group) as net:
        net.drop(2, 1)
        before = group.submit(1, received_from, 2).result(timeout=10)
        assert net.inject(2, 1, record, "spoofed").result(timeout=10) == "spoofed"
        assert group.submit(1, received_from, 2).result(timeout=10) == before + 1
    assert group.submit(1, take_log).result(timeout=10) == ["spoofed"]
