"""The external path's latency: calls from outside the shards, against submit_to.

One run prints one table: p50 and p99 of a no-op call to shard 1 and its reply,

  * ``submit_to`` from shard 0 (the in-group reference),
  * ``await group.call`` from an asyncio loop of the owner process (asyncio and
    uvloop), which takes its replies off the ring itself,
  * ``group.submit(...).result()`` from a plain thread of the owner process,
  * an attached client in another process (``shardio.connect``): thread
    ``submit().result()`` and ``await call``,

all measured in the same run, with each p50 as a ratio of submit_to's.
Issue 14's targets: ``await group.call`` and thread ``submit().result()``
p50 at most 2x submit_to's.

    python bench/external.py [--calls 5000] [--rounds 3] [--owner-cpu N]

``--owner-cpu`` pins the owner process (and the attached client it starts)
to one CPU.  The shards are pinned (shard s to CPU s); on a machine whose
CPUs are all busy the owner may otherwise land on shard 1's CPU, where a
caller polling for its reply keeps the shard from running until the poll
window (``call_poll_us``, 200 us) ends: p50s of ~260-300 us, a measurement
of the machine's load rather than of the path.  ``--owner-cpu 0`` keeps the
owner on shard 0's CPU, idle during the owner's rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

import uvloop

import shardio


def noop(value):
    return value


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    samples_ns.sort()
    return (samples_ns[len(samples_ns) // 2] / 1e3, samples_ns[int(len(samples_ns) * 0.99)] / 1e3)


async def submit_to_latency(calls: int) -> list[int]:
    return await call_latency(shardio.submit_to, calls)


async def call_latency(call, calls: int) -> list[int]:
    """``calls`` awaited no-op calls to shard 1 through ``call(shard, func, *args)``."""
    for i in range(500):
        await call(1, noop, i)
    clock = time.perf_counter_ns
    samples = []
    for i in range(calls):
        start = clock()
        await call(1, noop, i)
        samples.append(clock() - start)
    return samples


def thread_latency(target, calls: int) -> list[int]:
    submit = target.submit
    for i in range(500):
        submit(1, noop, i).result()
    clock = time.perf_counter_ns
    samples = []
    for i in range(calls):
        start = clock()
        submit(1, noop, i).result()
        samples.append(clock() - start)
    return samples


def client_main(path: str, calls: int, mode: str) -> None:
    """An attached client: prints its samples (ns), one per line."""
    with shardio.connect(path) as client:
        if mode == "thread":
            samples = thread_latency(client, calls)
        else:
            samples = (
                uvloop.run(call_latency(client.call, calls))
                if mode == "uvloop"
                else asyncio.run(call_latency(client.call, calls))
            )
    sys.stdout.write("\n".join(map(str, samples)) + "\n")


def attached(path: str, calls: int, mode: str) -> list[int]:
    output = subprocess.run(
        [sys.executable, __file__, "--client", path, "--calls", str(calls), "--mode", mode],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [int(line) for line in output.split()]


def pin_process(cpu: int) -> None:
    """Pin every thread of this process to ``cpu`` (threads and processes started
    later inherit it).  After the group started: the group pins its shards only
    when the owner may use as many CPUs as there are shards."""
    for thread_id in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread_id), {cpu})


def one_round(calls: int, with_clients: bool, owner_cpu: int | None = None) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o700)
        path = os.path.join(directory, "shards.sock")
        listen = {"listen": path} if with_clients else {}
        # idle_poll_us: both shards keep polling between calls, as in bench/xshard.py.
        with shardio.ShardGroup(2, idle_poll_us=5000, **listen) as group:
            if owner_cpu is not None:
                pin_process(owner_cpu)
            results["submit_to"] = group.submit(0, submit_to_latency, calls).result()
            results["call_asyncio"] = asyncio.run(call_latency(group.call, calls))
            results["call_uvloop"] = uvloop.run(call_latency(group.call, calls))
            results["thread"] = thread_latency(group, calls)
            if with_clients:
                results["client_thread"] = attached(path, calls, "thread")
                results["client_call"] = attached(path, calls, "asyncio")
    return results


ROWS = [
    ("submit_to", "submit_to (shard 0 -> shard 1)"),
    ("call_asyncio", "await group.call (owner, asyncio loop)"),
    ("call_uvloop", "await group.call (owner, uvloop)"),
    ("thread", "group.submit().result() (owner thread)"),
    ("client_thread", "attached client: submit().result()"),
    ("client_call", "attached client: await call (asyncio)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="groups started, medians kept")
    parser.add_argument("--no-clients", action="store_true", help="skip the attached client")
    parser.add_argument(
        "--owner-cpu", type=int, help="pin the owner and the attached client to this CPU"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="thread", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.client:
        client_main(options.client, options.calls, options.mode)
        return
    everywhere = os.sched_getaffinity(0)
    rounds = []
    for _ in range(options.rounds):
        rounds.append(one_round(options.calls, not options.no_clients, options.owner_cpu))
        if options.owner_cpu is not None:
            os.sched_setaffinity(0, everywhere)  # the next group pins its shards again
    table = {}
    for key, _ in ROWS:
        if key in rounds[0]:
            p50s, p99s = zip(*(percentiles(r[key]) for r in rounds), strict=True)
            table[key] = (statistics.median(p50s), statistics.median(p99s))
    reference = table["submit_to"][0]
    print(
        f"external calls to shard 1; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"{options.calls} calls x {options.rounds} rounds (median of the rounds' "
        f"percentiles), load average {os.getloadavg()[0]:.2f}"
        + (f", owner on CPU {options.owner_cpu}" if options.owner_cpu is not None else "")
    )
    print("| what | p50 us | p99 us | p50 vs submit_to |")
    print("|---|---|---|---|")
    for key, label in ROWS:
        if key in table:
            p50, p99 = table[key]
            print(f"| {label} | {p50:.1f} | {p99:.1f} | {p50 / reference:.2f}x |")


if __name__ == "__main__":
    main()
