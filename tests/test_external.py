"""The owner's external path: asyncio loops and threads take their replies off the rings.

Real process shards, real shared memory.  The counters say who took each
reply off the ring: the loop itself, a thread blocked in ``result()``, or the
receiver thread (a thread hop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import external_functions as ef
import pytest

import shardio


def test_await_call_takes_its_replies_on_the_loop_thread(leak_check):
    # The largest window: the loop polls until each reply is there.
    with shardio.ShardGroup(2, call_poll_us=100_000) as group:

        async def main():
            results = [await group.call(1, ef.add, i, 1) for i in range(300)]
            return results, group._owner.loop_counters(asyncio.get_running_loop())

        before = group._owner.receiver_messages
        results, counters = asyncio.run(main())
        assert results == [i + 1 for i in range(300)]
        # A hop now and then is allowed (the receiver thread takes over from a loop the
        # machine did not run for STALE_POLLER); one that delivered every reply is not.
        assert counters["hops"] < 150, counters
        assert group._owner.receiver_messages - before < 150


def test_await_call_stops_polling_outside_its_window(leak_check):
    with shardio.ShardGroup(2, call_poll_us=200) as group:

        async def main():
            loop = asyncio.get_running_loop()
            assert await group.call(0, ef.add, 1, 1) == 2
            await asyncio.sleep(0.05)  # the window (200 us after the last reply) ends
            idle_before = group._owner.loop_counters(loop)["polls"]
            await asyncio.sleep(0.2)  # nothing in flight: no polling at all
            idle_after = group._owner.loop_counters(loop)["polls"]
            slow_before = idle_after
            # A call that takes 0.5 s: polled for 200 us, then the loop sleeps on the
            # doorbell (an unbounded spin would run ~25,000 poll callbacks).
            assert await group.call(1, ef.slow_echo, "late", 0.5) == "late"
            slow = group._owner.loop_counters(loop)["polls"] - slow_before
            return idle_after - idle_before, slow

        idle, slow = asyncio.run(main())
        assert idle == 0
        assert slow < 1000, slow


def test_many_loops_and_threads_at_once_get_their_own_replies(leak_check):
    with shardio.ShardGroup(2) as group:
        errors: list[str] = []

        def loop_worker(tag: int) -> None:
            async def main():
                replies = await asyncio.gather(
                    *[group.call(i % 2, ef.echo, tag, i) for i in range(500)]
                )
                for i, reply in enumerate(replies):
                    if reply != (tag, i):
                        errors.append(f"loop {tag}: call {i} got {reply}")
                for i in range(200):  # and one at a time
                    reply = await group.call(i % 2, ef.echo, tag, i)
                    if reply != (tag, i):
                        errors.append(f"loop {tag}: sequential call {i} got {reply}")

            asyncio.run(main())

        def thread_worker(tag: int) -> None:
            futures = [group.submit(i % 2, ef.echo, tag, i) for i in range(300)]
            for i, future in enumerate(futures):
                if future.result(timeout=60) != (tag, i):
                    errors.append(f"thread {tag}: call {i} got {future.result()}")
            for i in range(200):
                reply = group.submit(i % 2, ef.echo, tag, i).result(timeout=60)
                if reply != (tag, i):
                    errors.append(f"thread {tag}: sequential call {i} got {reply}")

        workers = [threading.Thread(target=loop_worker, args=(tag,)) for tag in range(3)]
        workers += [threading.Thread(target=thread_worker, args=(tag,)) for tag in range(3, 6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not any(worker.is_alive() for worker in workers)
        assert errors == []


def test_result_polls_the_rings_from_the_calling_thread(leak_check):
    with shardio.ShardGroup(2, call_poll_us=100_000) as group:
        owner = group._owner
        for i in range(50):  # warm up
            group.submit(1, ef.add, i).result(timeout=30)
        before = owner.receiver_messages
        for i in range(300):
            assert group.submit(1, ef.add, i, 2).result(timeout=30) == i + 2
        # Without polling in result() the receiver thread takes all 300 replies.
        assert owner.receiver_messages - before < 150


def test_a_blocked_loop_does_not_hold_up_other_threads_replies(leak_check):
    """A loop blocked while it polls leaves the sleeping flag clear: the receiver thread
    takes the rings over, so futures waited on without result() still complete."""
    with shardio.ShardGroup(2, call_poll_us=100_000) as group:
        started = threading.Event()
        outcome: dict[str, object] = {}

        def waiter() -> None:
            started.wait(30)
            futures = [group.submit(i % 2, ef.add, i, 100) for i in range(20)]
            done, _ = concurrent.futures.wait(futures, timeout=2.0)  # no result() polling
            outcome["done"] = len(done)

        thread = threading.Thread(target=waiter)
        thread.start()

        async def main():
            call = group.call(1, ef.slow_echo, "slow", 3.0)
            task = asyncio.ensure_future(call)
            await asyncio.sleep(0.01)  # the loop polls for the slow call now
            started.set()
            time.sleep(3.0)  # blocks the loop (the bug this guards against)
            return await task

        assert asyncio.run(main()) == "slow"
        thread.join(timeout=30)
        assert outcome["done"] == 20


def test_cancelled_await_never_delivers_and_the_loop_goes_quiet(leak_check):
    with shardio.ShardGroup(2, call_poll_us=200) as group:

        async def main():
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(group.call(1, ef.slow_echo, "never", 0.3))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)  # its reply arrived and was dropped
            assert await group.call(1, ef.add, 2, 2) == 4
            await asyncio.sleep(0.05)  # the poll window (200 us after the last reply) ends
            polls = group._owner.loop_counters(loop)["polls"]
            await asyncio.sleep(0.2)
            return group._owner.loop_counters(loop)["polls"] - polls

        assert asyncio.run(main()) == 0


def test_thread_backend_calls_from_a_loop_and_a_thread(leak_check):
    with shardio.ShardGroup(2, backend="thread") as group:
        assert group.call_poll_us == 0  # polling would hold the GIL the shards need

        async def main():
            return await asyncio.gather(*[group.call(i % 2, ef.whoami) for i in range(100)])

        assert asyncio.run(main()) == [i % 2 for i in range(100)]
        assert [group.submit(1, ef.add, i).result(timeout=30) for i in range(50)] == list(range(50))


def test_call_poll_us_is_checked():
    with pytest.raises(ValueError, match="call_poll_us"):
        shardio.ShardGroup(1, call_poll_us=-1)


@pytest.mark.parametrize("backend_name", ["process", "thread"])
def test_a_loop_that_takes_the_doorbell_re_arms_it(backend_name, leak_check):
    """Without polling (call_poll_us=0) a loop sleeps on the doorbell beside the receiver
    thread; whichever takes a wake-up must re-arm the sleeping flag, or the next reply
    rings nobody and a caller waits forever."""
    with shardio.ShardGroup(2, backend=backend_name, call_poll_us=0) as group:
        failures: list[str] = []

        def thread_calls() -> None:
            for i in range(1500):
                try:
                    if group.submit(i % 2, ef.add, i, 1).result(timeout=10) != i + 1:
                        failures.append(f"thread call {i}: wrong reply")
                except concurrent.futures.TimeoutError:
                    failures.append(f"thread call {i}: no reply")
                    return

        async def loop_calls() -> None:
            for i in range(1500):
                try:
                    if await asyncio.wait_for(group.call(i % 2, ef.add, i, 2), 10) != i + 2:
                        failures.append(f"loop call {i}: wrong reply")
                except TimeoutError:
                    failures.append(f"loop call {i}: no reply")
                    return

        thread = threading.Thread(target=thread_calls)
        thread.start()
        asyncio.run(loop_calls())
        thread.join(timeout=120)
        assert failures == []


def test_a_loop_waiting_when_the_group_stops_gets_an_error_and_lets_go(leak_check):
    group = shardio.ShardGroup(2, call_poll_us=200).start()
    problems: list[object] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: problems.append(context))
        waiting = asyncio.ensure_future(group.call(1, ef.slow_echo, "never", 30))
        await asyncio.sleep(0.05)  # polled, then asleep on the doorbell through add_reader
        await asyncio.to_thread(group.stop, 2)  # the call in flight gets 1 s to drain
        with pytest.raises((shardio.ShardDied, shardio.GroupStateError)):
            await waiting
        polls = group._owner.loop_counters(loop)["polls"]
        await asyncio.sleep(0.2)
        return group._owner.loop_counters(loop)["polls"] - polls

    try:
        assert asyncio.run(main()) == 0
    finally:
        group.stop()
    assert problems == []
