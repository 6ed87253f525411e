"""Interception of cross-shard calls: drop, delay, expect, inject -- on both backends."""

from __future__ import annotations

import asyncio
import time

import pytest

import shardio
from shardio.testing import Clock, Message, NoMatchingMessage, intercept, virtual_group


@pytest.fixture(scope="module", params=["process", "thread"])
def group(request):
    with virtual_group(3, backend=request.param) as group:
        for shard in range(group.shards):  # process shards import this module once, here
            group.submit(shard, take_log).result(timeout=30)
        yield group
    group.options.loop.close()


@pytest.fixture
def clock(group):
    clock = Clock(group, timeout=5.0)
    clock.pause()
    yield clock
    clock.resume()


# ---------------------------------------------------------------- shard functions

_log: list = []


def record(item):
    _log.append((shardio.this_shard(), item))
    return item


def take_log():
    items = list(_log)
    _log.clear()
    return items


def ping(item):
    return ("pong", item)


async def call_with_timeout(dst, timeout, func, *args):
    try:
        return await asyncio.wait_for(shardio.submit_to(dst, func, *args), timeout)
    except TimeoutError:
        return "timed out"


async def send_all(dst, items):
    """Send every item to ``dst`` at once (in this order); wait for all replies."""
    return await asyncio.gather(*(shardio.submit_to(dst, record, item) for item in items))


async def register_with_retry(dst, attempt_timeout):
    """A tiny protocol: resend the registration until an attempt is acknowledged."""
    for attempt in range(1, 10):
        try:
            await asyncio.wait_for(shardio.submit_to(dst, register, attempt), attempt_timeout)
            return attempt
        except TimeoutError:
            continue
    return None


def register(attempt):
    return record(("registered", attempt))


def is_even_item(func, args, kwargs):
    """A predicate over (func, args, kwargs): it runs on the source shard."""
    return func is record and isinstance(args[0], int) and args[0] % 2 == 0


def received_from(peer):
    return shardio.current_reactor().links[peer].received_messages


class Counter:
    def __init__(self):
        self.value = 0

    def bump(self, by=1):
        self.value += by
        return self.value

    def read(self):
        return self.value


async def start_counter():
    return await shardio.Sharded(Counter).start()


async def stop_counter(counter):
    await counter.stop()


async def invoke_with_timeout(counter, shard, timeout, method, *args):
    try:
        return await asyncio.wait_for(counter.invoke_on(shard, method, *args), timeout)
    except TimeoutError:
        return "timed out"


# ---------------------------------------------------------------- tests


def test_drop_loses_the_call_and_the_callers_timeout_fires(group, clock):
    start = time.monotonic()
    with intercept(group) as net:
        lost = net.drop(0, 1, net.match(func=record))
        call = group.submit(0, call_with_timeout, 1, 30, record, "lost")
        message = lost.result(timeout=5)
        assert message == Message(0, 1, record, ("lost",), {})
        clock.settle()
        assert not call.done()
        clock.advance(30)
        assert call.result(timeout=5) == "timed out"
        # Other functions, and other pairs of shards, still go through.
        assert group.submit(0, call_with_timeout, 1, 30, ping, 1).result(5) == ("pong", 1)
        assert group.submit(2, call_with_timeout, 1, 30, record, "kept").result(5) == "kept"
    assert group.submit(1, take_log).result(timeout=5) == [(1, "kept")]
    assert time.monotonic() - start < 10.0  # far less than the 30 virtual seconds


def test_drop_the_first_attempt_and_the_retry_gets_through(group, clock):
    with intercept(group) as net:
        first = net.drop(2, 0, net.match(func=register), count=1)
        registration = group.submit(2, register_with_retry, 0, 5)
        assert first.result(timeout=5).args == (1,)
        clock.settle()
        clock.advance(5)
        assert registration.result(timeout=5) == 2
    assert group.submit(0, take_log).result(timeout=5) == [(0, ("registered", 2))]


def test_delay_lets_others_overtake_and_keeps_its_own_order(group, clock):
    with intercept(group) as net:
        first = net.delay(0, 1, is_even_item, 2.0)
        sending = group.submit(0, send_all, 1, [0, 1, 2, 3, 4, 5])
        assert first.result(timeout=5).args == (0,)
        clock.settle()
        assert group.submit(1, take_log).result(timeout=5) == [(1, 1), (1, 3), (1, 5)]
        clock.advance(1.0)
        clock.settle()
        assert group.submit(1, take_log).result(timeout=5) == []
        clock.advance(1.0)
        assert sending.result(timeout=5) == [0, 1, 2, 3, 4, 5]
    assert group.submit(1, take_log).result(timeout=5) == [(1, 0), (1, 2), (1, 4)]


def test_leaving_the_block_sends_what_is_delayed_and_removes_the_rules(group, clock):
    with intercept(group) as net:
        net.delay(None, 2, None, 3600)
        net.drop(1, None)
        held = group.submit(0, send_all, 2, ["held"])
        clock.settle()
        assert not held.done()
    assert held.result(timeout=5) == ["held"]
    assert group.submit(1, call_with_timeout, 0, 30, ping, "free").result(5) == ("pong", "free")
    assert group.submit(2, take_log).result(timeout=5) == [(2, "held")]


def test_blocks_nest_and_each_removes_only_its_own_rules(group, clock):
    with intercept(group) as outer:
        seen = outer.expect(0, 1)
        with intercept(group) as inner:
            inner.drop(0, 1, inner.match(func=ping))
            lost = group.submit(0, call_with_timeout, 1, 5, ping, 1)
            clock.settle()
            clock.advance(5)
            assert lost.result(timeout=5) == "timed out"
        assert group.submit(0, call_with_timeout, 1, 5, ping, 2).result(5) == ("pong", 2)
        assert seen.result(timeout=5).args == (1,)  # the earlier rule saw it before the drop


def test_expect_is_the_first_matching_call_and_lets_it_through(group):
    with intercept(group) as net:
        first_even = net.expect(None, 1, is_even_item)
        never = net.expect(1, 0)
        assert group.submit(2, send_all, 1, [1, 4, 6]).result(timeout=5) == [1, 4, 6]
        assert first_even.result(timeout=5) == Message(2, 1, record, (4,), {})
        assert not never.done()
    with pytest.raises(NoMatchingMessage):
        never.result(timeout=5)
    assert group.submit(1, take_log).result(timeout=5) == [(1, 1), (1, 4), (1, 6)]


def test_inject_a_spoofed_call_after_dropping_the_real_one(group, clock):
    with intercept(group) as net:
        lost = net.drop(2, 1, net.match(func=register))
        group.submit(2, call_with_timeout, 1, 10, register, "real")
        message = lost.result(timeout=5)
        before = group.submit(1, received_from, 2).result(timeout=5)
        spoofed = net.inject(2, 1, message.func, "spoofed")
        assert spoofed.result(timeout=5) == ("registered", "spoofed")
        # It crossed the ring from shard 2, as if shard 2 had sent it, past the drop rule.
        assert group.submit(1, received_from, 2).result(timeout=5) == before + 1
        clock.settle()
        clock.advance(10)
    assert group.submit(1, take_log).result(timeout=5) == [(1, ("registered", "spoofed"))]


def test_match_a_method_of_a_sharded_service(group, clock):
    counter = group.submit(0, start_counter).result(timeout=5)
    try:
        with intercept(group) as net:
            lost = net.drop(0, 2, net.match(method="bump", args=(5,)))
            bumped = group.submit(0, invoke_with_timeout, counter, 2, 10, "bump", 5)
            assert lost.result(timeout=5).args[1:3] == ("bump", (5,))
            clock.settle()
            clock.advance(10)
            assert bumped.result(timeout=5) == "timed out"
            assert group.submit(0, invoke_with_timeout, counter, 2, 10, "bump", 1).result(5) == 1
            assert group.submit(0, invoke_with_timeout, counter, 2, 10, "read").result(5) == 1
    finally:
        group.submit(0, stop_counter, counter).result(timeout=5)


def test_rules_check_their_shards(group):
    with intercept(group) as net:
        with pytest.raises(ValueError, match="no shard 7"):
            net.drop(0, 7)
        with pytest.raises(ValueError, match="itself"):
            net.expect(1, 1)
        with pytest.raises(ValueError, match="two different shards"):
            net.inject(1, 1, ping, 0)
