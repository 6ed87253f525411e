"""Per-call CPU of each side of a cross-shard call, measured without a peer.

``bench/xshard.py`` times round trips between two spinning shards, which
mixes both sides, the cross-CPU cache traffic and whatever else the machine
runs.  This script measures one side at a time, in one reactor thread, in
thread CPU time (so a loaded machine disturbs it much less):

  * receiver: N compact calls are put on the ring into shard 1 by hand; the
    reactor's poll step (``Reactor._drain``, the function its poll callback
    runs) dispatches them, runs the function and publishes the replies;
    ``--single`` does it one message at a time (put, poll, take the reply);
  * sender: shard 0 makes N ``submit_to`` calls (a list comprehension, as a
    pipelined user would), ``asyncio.gather`` wraps them, compact replies are
    put on the ring back by hand, and the poll step resolves them.

It drives the reactor's private poll step directly (nothing public polls one
ring on demand), so it is a measuring tool for the fabric, not an example.

    python bench/xshard_sides.py [--calls 500] [--rounds 400] [--single]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import struct
import threading
import time

from shardio.fabric._ring import encode_call, encode_result

import shardio
from shardio.fabric.mesh import Mesh, default_ring_bytes
from shardio.reactor import Reactor

REQUEST_ID = struct.Struct("<Q")


def noop(value):
    return value


def tenth_percentile(samples: list[int], calls: int) -> float:
    """Microseconds per call of the 10th-percentile round (the least disturbed)."""
    samples.sort()
    return samples[len(samples) // 10] / calls / 1e3


def receiver_side(reactor: Reactor, mesh: Mesh, calls: int, rounds: int, single: bool) -> float:
    reactor.links[0].functions[7] = noop  # as if shard 0 had sent the function once
    producer, replies = mesh.ring(0, 1), mesh.ring(1, 0)
    messages = [encode_call(i, 7, (i,)) for i in range(calls)]
    drain, clock = reactor._drain, time.thread_time_ns
    samples = []
    for _ in range(rounds):
        if single:
            start = clock()
            for message in messages:
                producer.put(message)
                drain()
                replies.get(1)
            samples.append(clock() - start)
            continue
        for message in messages:
            producer.put(message)
        start = clock()
        while drain():
            pass
        samples.append(clock() - start)
        taken = 0
        while taken < calls:
            taken += len(replies.get(100000) or ())
    return tenth_percentile(samples, calls)


async def sender_side(
    reactor: Reactor, mesh: Mesh, calls: int, rounds: int
) -> tuple[float, float, float]:
    submit_to = shardio.submit_to
    requests, replies = mesh.ring(0, 1), mesh.ring(1, 0)
    drain, clock = reactor._drain, time.thread_time_ns
    submitting, gathering, replying = [], [], []
    for round_number in range(rounds + 2):  # the first round interns the function
        start = clock()
        futures = [submit_to(1, noop, i) for i in range(calls)]
        submitted = clock()
        together = asyncio.gather(*futures)
        gathered = clock()
        taken: list = []
        while len(taken) < calls:
            taken += requests.get(100000) or []
        for message in taken:
            request_id = REQUEST_ID.unpack_from(message, 1)[0]
            replies.put(encode_result(request_id, request_id))
        answered = clock()
        while drain():
            pass
        resolved = clock()
        await together
        if round_number >= 2:
            submitting.append(submitted - start)
            gathering.append(gathered - submitted)
            replying.append(resolved - answered)
    return (
        tenth_percentile(submitting, calls),
        tenth_percentile(gathering, calls),
        tenth_percentile(replying, calls),
    )


def on_reactor(reactor: Reactor, work) -> object:
    """Run ``work()`` (a function or a coroutine function) on the reactor's thread."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def start() -> None:
        result = work()
        if asyncio.iscoroutine(result):
            task = reactor.loop.create_task(result)
            task.add_done_callback(
                lambda t: (
                    done.set_exception(t.exception())
                    if t.exception()
                    else done.set_result(t.result())
                )
            )
        else:
            done.set_result(result)

    reactor.call_threadsafe(start)
    return done.result(timeout=600)


def measure(side: int, calls: int, rounds: int, single: bool) -> object:
    """One reactor of a two-shard mesh runs; nobody else reads its rings."""
    mesh = Mesh.create(3, default_ring_bytes(3))
    reactors = [
        Reactor(shard, 2, mesh, idle_poll_us=0, stall_threshold_ms=None) for shard in range(2)
    ]
    reactor = reactors[side]
    threading.Thread(target=reactor.run, daemon=True).start()
    while reactor.loop is None or not reactor.loop.is_running():
        time.sleep(0.01)
    if side == 1:
        return on_reactor(reactor, lambda: receiver_side(reactor, mesh, calls, rounds, single))
    return on_reactor(reactor, lambda: sender_side(reactor, mesh, calls, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--single", action="store_true", help="receiver: one message per poll")
    parser.add_argument(
        "--side",
        choices=["sender", "receiver"],
        default=None,
        help="one side only (default: each, in a fresh process)",
    )
    options = parser.parse_args()
    if options.side is None:
        import subprocess
        import sys

        for side in ("sender", "receiver"):
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--calls",
                    str(options.calls),
                    "--rounds",
                    str(options.rounds),
                    *(["--single"] if options.single else []),
                ],
                check=True,
            )
        return
    if options.side == "receiver":
        per_call = measure(1, options.calls, options.rounds, options.single)
        what = "one message per poll, with put and take" if options.single else "batches"
        print(f"receiver: {per_call:.3f} us CPU per call ({what} of {options.calls})")
    else:
        submit, gather, reply = measure(0, options.calls, options.rounds, False)
        print(
            f"sender: {submit + gather + reply:.3f} us CPU per call = submit_to {submit:.3f}"
            f" + gather() {gather:.3f} + replies {reply:.3f} (batches of {options.calls})"
        )
    os._exit(0)  # the reactor threads never stop on their own


if __name__ == "__main__":
    main()
