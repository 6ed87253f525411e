"""The owner's endpoint takes its replies with Ring.dispatch: stress for its locking.

``Ring.dispatch`` pops a reply's future from ``link.pending`` in C, outside the
endpoint's lock, while submitting threads add to it under the lock, callers
cancel their futures, and several threads and loops take turns as the rings'
consumer.  These tests run all of that at once through a tight bound (two
calls in flight per shard), so that calls are held back and admitted all the
time: a lost admission hangs a call, a misdelivered reply shows as a wrong
value, an exception escaping a dispatch (a future cancelled between its check
and its result) stops the consumer that ran it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time

import external_functions as ef
import fabric_functions as ff
import pytest

import shardio

ROUNDS = int(os.environ.get("SHARDIO_STRESS_ROUNDS", "300"))


def recording(errors: list[str], work):
    """``work`` run by a thread, its exception (a consumer's, escaping a result())
    recorded instead of lost with the thread."""

    def run(*args):
        try:
            work(*args)
        except BaseException as error:
            errors.append(f"{work.__name__}{args}: {error!r}")

    return run


def test_threads_and_loops_through_a_tight_bound_lose_and_misdeliver_nothing(
    frequent_switches, leak_check
):
    with shardio.ShardGroup(2, max_calls_per_peer=2) as group:
        errors: list[str] = []

        def thread_worker(tag: int) -> None:
            for i in range(ROUNDS):
                # A few at a time: most wait behind the bound, unpickled.
                futures = [group.submit(j % 2, ef.echo, tag, i, j) for j in range(4)]
                for j, future in enumerate(futures):
                    try:
                        reply = future.result(timeout=20)
                    except concurrent.futures.TimeoutError:
                        errors.append(f"thread {tag}: call {i}/{j} never completed")
                        return
                    if reply != (tag, i, j):
                        errors.append(f"thread {tag}: call {i}/{j} got {reply}")

        def loop_worker(tag: int) -> None:
            async def main() -> None:
                for i in range(ROUNDS):
                    calls = [group.call(j % 2, ef.echo, tag, i, j) for j in range(4)]
                    try:
                        replies = await asyncio.wait_for(asyncio.gather(*calls), 20)
                    except TimeoutError:
                        errors.append(f"loop {tag}: round {i} never completed")
                        return
                    for j, reply in enumerate(replies):
                        if reply != (tag, i, j):
                            errors.append(f"loop {tag}: call {i}/{j} got {reply}")

            asyncio.run(main())

        workers = [
            threading.Thread(target=recording(errors, thread_worker), args=(tag,))
            for tag in range(3)
        ]
        workers += [
            threading.Thread(target=recording(errors, loop_worker), args=(tag,))
            for tag in range(3, 5)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not any(worker.is_alive() for worker in workers)
        assert errors == []
        assert group._owner.in_flight() == 0


@pytest.fixture
def frequent_switches():
    """Threads take turns every microsecond: the races below show within seconds."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_futures_cancelled_while_their_replies_arrive_break_no_consumer(
    frequent_switches, leak_check
):
    with shardio.ShardGroup(2, max_calls_per_peer=8) as group:
        errors: list[str] = []
        cancelled = [0]

        def worker(tag: int) -> None:
            for i in range(ROUNDS):
                futures = [group.submit(j % 2, ef.echo, tag, i, j) for j in range(6)]
                for future in futures[::2]:  # racing the replies: some are in already
                    if future.cancel():
                        cancelled[0] += 1
                for j in range(1, 6, 2):
                    try:
                        reply = futures[j].result(timeout=20)
                    except concurrent.futures.TimeoutError:
                        errors.append(f"thread {tag}: call {i}/{j} never completed")
                        return
                    if reply != (tag, i, j):
                        errors.append(f"thread {tag}: call {i}/{j} got {reply}")

        workers = [
            threading.Thread(target=recording(errors, worker), args=(tag,)) for tag in range(4)
        ]
        for worker_thread in workers:
            worker_thread.start()
        for worker_thread in workers:
            worker_thread.join(timeout=120)
        assert not any(worker_thread.is_alive() for worker_thread in workers)
        assert errors == []
        assert cancelled[0] > 0
        # Every consumer survived: the receiver thread still delivers (no caller polls).
        future = group.submit(1, ef.add, 40, 2)
        assert concurrent.futures.wait([future], timeout=20).done == {future}
        assert future.result() == 42


def test_an_owner_call_whose_arguments_fail_to_unpickle_does_not_poison_its_function(
    leak_check,
):
    """The owner interns functions per link as shards do, and its later calls of an
    interned function go compact: the first call's failure (it introduced the
    function) must leave the function usable, from a thread and from a loop."""
    with shardio.ShardGroup(2) as group:
        with pytest.raises(shardio.CannotCrossError, match="refuses to be unpickled"):
            group.submit(1, ff.add, ff.Unloadable(), 1).result(timeout=30)
        assert group.submit(1, ff.add, 2, 3).result(timeout=30) == 5  # compact now

        async def from_a_loop() -> list[int]:
            return [await group.call(1, ff.add, i, 1) for i in range(3)]

        assert asyncio.run(from_a_loop()) == [1, 2, 3]


VALUES = [
    None,
    True,
    0,
    -(2**63),
    2**64 + 1,
    1.5,
    float("inf"),
    "",
    "shard ü",
    b"\x00\xff",
    (),
    (1, (2.5, "x", b"y"), None),
    [1, 2],
    {"a": (1,)},
    frozenset({3}),
    ValueError("a value, not raised"),
]


def test_every_result_reaches_the_owner_as_it_was_returned(leak_check):
    """Plain results come back compact (decoded in C), the rest pickled: both exact,
    to a thread, a loop and the receiver thread."""
    with shardio.ShardGroup(2) as group:
        for value in VALUES:
            got = group.submit(1, ef.echo, value).result(timeout=30)[0]
            assert type(got) is type(value) and repr(got) == repr(value), (value, got)

        async def from_a_loop() -> list:
            return [(await group.call(1, ef.echo, value))[0] for value in VALUES]

        for value, got in zip(VALUES, asyncio.run(from_a_loop()), strict=True):
            assert type(got) is type(value) and repr(got) == repr(value), (value, got)
        futures = [group.submit(0, ef.echo, value) for value in VALUES]
        done, _ = concurrent.futures.wait(futures, timeout=30)  # the receiver thread's
        assert len(done) == len(VALUES)
        for value, future in zip(VALUES, futures, strict=True):
            got = future.result()[0]
            assert type(got) is type(value) and repr(got) == repr(value), (value, got)
        received = sum(link.inbound.dispatched_messages for link in group._owner.links)
        assert received >= 3 * len(VALUES)  # every reply went through Ring.dispatch


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_reply_resumes_its_task_inside_the_loops_poll(loop_kind, leak_check):
    """The awaiting task runs inside the poll that took its reply (no loop iteration
    in between), on asyncio's loop and uvloop's alike; a task resumed there may block
    on a thread-style result() (it runs outside the consume lock: the rings are free)."""
    run = asyncio.run if loop_kind == "asyncio" else pytest.importorskip("uvloop").run
    # A long window: a reply slowed past it by a loaded machine would come through the
    # receiver thread instead, which is right but not what this test looks at.
    with shardio.ShardGroup(2, call_poll_us=100_000) as group:

        async def main() -> tuple[dict, list]:
            loop = asyncio.get_running_loop()
            before = group._owner.loop_counters(loop)
            for i in range(300):
                assert await group.call(1, ef.add, i, 1) == i + 1
            after = group._owner.loop_counters(loop)
            nested = []
            for i in range(20):
                assert await group.call(1, ef.add, i) == i
                nested.append(group.submit(0, ef.add, i, 2).result(timeout=10))
            return {key: after[key] - before[key] for key in after}, nested

        counters, nested = run(main())
        assert counters["eager"] >= 30, counters  # without the eager wake-up: 0
        assert nested == [i + 2 for i in range(20)]


def test_a_done_callback_that_waits_on_another_reply_gets_it(leak_check):
    """A future's done callback runs inside the dispatch that took its reply; one that
    blocks on another call's result() takes that reply itself (dispatch cannot be
    re-entered: the nested poll reads the rings another way)."""
    with shardio.ShardGroup(2, call_poll_us=100_000) as group:
        seen: list = []

        def then_wait(future: concurrent.futures.Future) -> None:
            try:
                seen.append((future.result(), group.submit(0, ef.add, 5, 5).result(timeout=10)))
            except BaseException as error:
                seen.append(error)

        for i in range(20):
            future = group.submit(1, ef.add, i, 1)
            future.add_done_callback(then_wait)
            future.result(timeout=10)  # this thread polls: the callback runs in its dispatch
        deadline = time.monotonic() + 10
        while len(seen) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [entry for entry in seen if isinstance(entry, BaseException)] == []
        assert sorted(seen) == [(i + 1, 10) for i in range(20)]  # callbacks run on two threads
