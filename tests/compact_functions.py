"""Shard-side code for tests/test_fabric_compact.py (importable by every shard process)."""

from __future__ import annotations

import asyncio
import contextvars
import os

import shardio

_next: dict[tuple[int, int], int] = {}
_violations: list[str] = []

request_tag: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="")


def echo(*values):
    """Return the arguments as they arrived, with their exact types."""
    return values, tuple(type(value).__name__ for value in values)


def in_order(source: int, sequence: int, data=None, *, marker=None) -> int:
    """Record one message of a stream; note any gap, duplicate or reordering."""
    key = (shardio.this_shard(), source)
    expected = _next.get(key, 0)
    if sequence != expected:
        _violations.append(f"from {source}: got {sequence}, expected {expected}")
    _next[key] = sequence + 1
    return sequence


def stream_report(source: int) -> tuple[int, list[str]]:
    return _next.get((shardio.this_shard(), source), 0), list(_violations)


class Plain:
    """Not a compact value: its calls go pickled, between the compact ones."""

    def __init__(self, sequence: int) -> None:
        self.sequence = sequence

    def __reduce__(self):
        return (Plain, (self.sequence,))


async def mixed_stream(peer: int, count: int, window: int) -> int:
    """``count`` calls to ``peer`` in order, compact and pickled ones interleaved
    (bytearray, keyword arguments, a class instance), ``window`` in flight."""
    me = shardio.this_shard()
    in_flight: list = []
    for sequence in range(count):
        kind = sequence % 7
        if kind == 3:
            future = shardio.submit_to(peer, in_order, me, sequence, bytearray(b"x" * 5))
        elif kind == 5:
            future = shardio.submit_to(peer, in_order, me, sequence, marker="kw")
        elif kind == 6:
            future = shardio.submit_to(peer, in_order, me, sequence, Plain(sequence))
        else:
            future = shardio.submit_to(peer, in_order, me, sequence, b"y" * (sequence % 50))
        in_flight.append((sequence, future))
        if len(in_flight) >= window:
            await _check(in_flight)
            in_flight.clear()
    await _check(in_flight)
    return count


async def _check(in_flight: list) -> None:
    for expected, done in in_flight:
        # A lost call would leave its caller waiting forever: a bound says so.
        if await asyncio.wait_for(done, 20) != expected:
            raise AssertionError(f"call {expected} returned another call's result")


async def context_survives(peer: int, rounds: int) -> list[str]:
    """Tasks with their own context value await replies; each must see its own value."""

    async def one(tag: str) -> str:
        request_tag.set(tag)
        for i in range(rounds):
            assert await shardio.submit_to(peer, echo, i) == ((i,), ("int",))
            if request_tag.get() != tag:
                return f"{tag} saw {request_tag.get()!r}"
        return tag

    return list(await asyncio.gather(*(one(f"task-{n}") for n in range(8))))


async def every_done_callback_runs(peer: int) -> list[str]:
    """A reply's future with an awaiting task and two more done callbacks."""
    seen: list[str] = []
    future = shardio.submit_to(peer, echo, 1)
    future.add_done_callback(lambda f: seen.append("first"))
    future.add_done_callback(lambda f: seen.append("second"))
    await future
    await asyncio.sleep(0)
    return seen


async def failing_callback_is_reported(peer: int) -> list[str]:
    """An exception in a reply's done callback reaches the loop's exception handler."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(repr(context["exception"])))
    try:
        done = loop.create_future()

        def explode(_future):
            loop.call_soon(done.set_result, None)
            raise RuntimeError("boom in a done callback")

        future = shardio.submit_to(peer, echo, 2)
        future.add_done_callback(explode)
        await done
        assert future.result() == ((2,), ("int",))
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    return reported


async def cancelled_calls_drop_their_reply(peer: int, calls: int) -> int:
    """Cancel calls in flight: their late replies are dropped, later calls are answered."""
    for i in range(calls):
        shardio.submit_to(peer, echo, i).cancel()
    answers = await asyncio.gather(*(shardio.submit_to(peer, echo, i) for i in range(calls)))
    assert [a[0][0] for a in answers] == list(range(calls))
    return len(shardio.current_reactor().links[peer].pending)


def pid() -> int:
    return os.getpid()


def eager_wakeups(peer: int) -> int:
    """Replies from ``peer`` whose first done callback Ring.dispatch ran at once."""
    return shardio.current_reactor().links[peer].inbound.eager_wakeups


def same_object(first, second) -> bool:
    return first is second


async def shared_list(peer: int) -> bool:
    """The second call too: the first carries the function and is pickled anyway."""
    shared = [1, 2]
    first = await shardio.submit_to(peer, same_object, shared, shared)
    return first and await shardio.submit_to(peer, same_object, shared, shared)


def fails(message: str) -> None:
    raise LookupError(message)


async def later(value):
    await asyncio.sleep(0)
    return value + 1


def as_dict(value) -> dict:
    return {"value": value}


def served_calls(peer: int) -> int:
    """Calls from ``peer`` that Ring.dispatch ran itself (its serve path)."""
    return shardio.current_reactor().links[peer].inbound.served_calls


def requests_run() -> int:
    return shardio.current_reactor().stats.requests_run


async def served_outcomes(peer: int) -> list:
    """Each kind of outcome of a call ``peer`` serves inside Ring.dispatch."""
    for _ in range(2):  # the first call of each function carries it, pickled
        await shardio.submit_to(peer, echo, 0)
        await shardio.submit_to(peer, later, 0)
        await shardio.submit_to(peer, as_dict, 0)
        try:
            await shardio.submit_to(peer, fails, "warm")
        except LookupError:
            pass
    outcomes: list = [await shardio.submit_to(peer, echo, 7, "x"),
                      await shardio.submit_to(peer, later, 41),
                      await shardio.submit_to(peer, as_dict, (1, 2))]
    try:
        await shardio.submit_to(peer, fails, "no such key")
    except LookupError as error:
        outcomes.append(f"{type(error).__name__}: {error}")
    return outcomes


async def call_soon_after_batches(peer: int, rounds: int) -> list[bool]:
    """After batches of replies resumed their futures eagerly, call_soon is the loop's own."""
    loop = asyncio.get_running_loop()
    seen = []
    for _ in range(rounds):
        await asyncio.gather(*(shardio.submit_to(peer, echo, i) for i in range(200)))
        seen.append("call_soon" in vars(loop))
    return seen
