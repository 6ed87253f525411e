"""Cross-shard call latency and throughput, against what Python offers instead.

One run prints one table: round-trip latency (p50, p99) of a no-op call and
pipelined throughput, for

  * shardio ``submit_to`` between two process shards (both polling),
  * shardio ``group.submit`` from a thread outside the shards,
  * ``multiprocessing.Pipe`` and ``multiprocessing.Queue`` to an echo process,
  * ``asyncio.to_thread`` on asyncio and on uvloop,
  * the floor: two Python processes spinning on a word of shared memory each
    (no framework, no pickling: the fastest a Python round trip gets here),

all measured in the same run on the same machine, so the ratios mean
something even on a noisy machine.

A second table shows what a message costs when it goes to a shard that is
busy serving a socket load (idle_poll_us=0): doorbells rung (eventfd writes)
per message and CPU time per message on the sender, before the wake hook (a
loop from a factory, which shardio cannot hook: the sleeping flag stays set
while the loop runs socket callbacks) and after (the loop shardio makes).
The calls leave on a 1 ms timer without waiting for each other's replies, so
their arrival is not tied to the receiver's cycle (an awaited call would land
in the gap after each reply, when the receiver really sleeps), and the
receiver's flagged-asleep share is printed beside them.  Two rows pin the
socket client (a thread of the benchmark process) to each CPU, since on two
CPUs where it runs decides when the receiver sleeps, and a baseline row gives
the sender's CPU per timer tick with no call, to subtract.

    python bench/xshard.py [--calls 20000] [--pipelined 100000] [--busy-calls 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import struct
import sys
import time

import uvloop

import shardio

SLOT = struct.Struct("<q")


def noop(value):
    return value


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    samples_ns.sort()
    return (samples_ns[len(samples_ns) // 2] / 1e3,
            samples_ns[int(len(samples_ns) * 0.99)] / 1e3)


# ------------------------------------------------------------------ shardio


async def submit_to_latency(calls: int) -> list[int]:
    submit_to = shardio.submit_to
    for i in range(2000):
        await submit_to(1, noop, i)
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        start = clock()
        await submit_to(1, noop, i)
        samples.append(clock() - start)
    return samples


async def submit_to_throughput(calls: int, window: int = 1000) -> float:
    submit_to = shardio.submit_to
    start = time.perf_counter()
    for base in range(0, calls, window):
        await asyncio.gather(*[submit_to(1, noop, i) for i in range(base, base + window)])
    return calls / (time.perf_counter() - start)


def measure_shardio(calls: int, pipelined: int) -> dict[str, tuple]:
    # idle_poll_us: keep both shards polling between the measured calls.
    with shardio.ShardGroup(2, idle_poll_us=5000) as group:
        samples = group.submit(0, submit_to_latency, calls).result()
        throughput = statistics.median(
            group.submit(0, submit_to_throughput, pipelined).result() for _ in range(3))
        shard_to_shard = (*percentiles(samples), throughput)

        for i in range(1000):
            group.submit(1, noop, i).result()
        samples = []
        for i in range(calls // 2):
            start = time.perf_counter_ns()
            group.submit(1, noop, i).result()
            samples.append(time.perf_counter_ns() - start)
        start = time.perf_counter()
        window = 1000
        for base in range(0, pipelined, window):
            futures = [group.submit(1, noop, i) for i in range(base, base + window)]
            for future in futures:
                future.result()
        outside = (*percentiles(samples), pipelined / (time.perf_counter() - start))
    return {"shardio submit_to (shard 0 -> shard 1)": shard_to_shard,
            "shardio group.submit (thread outside -> shard)": outside}


# ------------------------------------------------------------------ multiprocessing


def pipe_echo(connection) -> None:
    while True:
        value = connection.recv()
        if value is None:
            return
        connection.send(value)


def queue_echo(requests, replies) -> None:
    while True:
        value = requests.get()
        if value is None:
            return
        replies.put(value)


def measure_pipe(calls: int, pipelined: int) -> tuple:
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    echo = context.Process(target=pipe_echo, args=(there,))
    echo.start()
    for i in range(1000):
        here.send(i)
        here.recv()
    samples = []
    for i in range(calls):
        start = time.perf_counter_ns()
        here.send(i)
        here.recv()
        samples.append(time.perf_counter_ns() - start)
    window = 100  # stays within the pipe's buffer, so neither side blocks on write
    start = time.perf_counter()
    for base in range(0, pipelined, window):
        for i in range(window):
            here.send(base + i)
        for _ in range(window):
            here.recv()
    throughput = pipelined / (time.perf_counter() - start)
    here.send(None)
    echo.join()
    return (*percentiles(samples), throughput)


def measure_queue(calls: int, pipelined: int) -> tuple:
    context = multiprocessing.get_context("spawn")
    requests, replies = context.Queue(), context.Queue()
    echo = context.Process(target=queue_echo, args=(requests, replies))
    echo.start()
    for i in range(1000):
        requests.put(i)
        replies.get()
    samples = []
    for i in range(calls // 2):
        start = time.perf_counter_ns()
        requests.put(i)
        replies.get()
        samples.append(time.perf_counter_ns() - start)
    window = 1000
    start = time.perf_counter()
    for base in range(0, pipelined, window):
        for i in range(window):
            requests.put(base + i)
        for _ in range(window):
            replies.get()
    throughput = pipelined / (time.perf_counter() - start)
    requests.put(None)
    echo.join()
    return (*percentiles(samples), throughput)


# ------------------------------------------------------------------ the floor


def spin_echo(name: str, count: int) -> None:
    """Answer each number written at offset 0 by writing it at offset 64."""
    from multiprocessing import shared_memory

    memory = shared_memory.SharedMemory(name)
    buffer = memory.buf
    unpack, pack = SLOT.unpack_from, SLOT.pack_into
    last = 0
    try:
        while last != count:
            value = unpack(buffer, 0)[0]
            if value != last:
                last = value
                pack(buffer, 64, value)
    finally:
        del buffer
        memory.close()


def measure_spin_floor(calls: int) -> tuple:
    from multiprocessing import shared_memory

    memory = shared_memory.SharedMemory(create=True, size=128)
    buffer = memory.buf
    total = calls + 1000
    echo = multiprocessing.get_context("spawn").Process(target=spin_echo,
                                                        args=(memory.name, total))
    echo.start()
    unpack, pack = SLOT.unpack_from, SLOT.pack_into
    clock = time.perf_counter_ns
    samples = []
    try:
        for value in range(1, total + 1):
            start = clock()
            pack(buffer, 0, value)
            while unpack(buffer, 64)[0] != value:
                pass
            if value > 1000:
                samples.append(clock() - start)
        echo.join()
    finally:
        del buffer
        memory.close()
        memory.unlink()
    # One value in flight at a time: the "pipelined" rate is one over the median.
    p50, p99 = percentiles(samples)
    return p50, p99, 1e6 / p50


# ------------------------------------------------------------------ a busy peer

_servers: list = []


async def start_busy_server(work_us: float) -> int:
    async def serve(reader, writer) -> None:
        while line := await reader.readline():
            end = time.perf_counter() + work_us / 1e6
            while time.perf_counter() < end:
                pass
            writer.write(line)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    _servers.append(server)
    return server.sockets[0].getsockname()[1]


def busy_accounting() -> tuple[float, float]:
    """(monotonic time, seconds this reactor has had its sleeping flag set)."""
    return time.monotonic(), shardio.current_reactor().stats.asleep_seconds


async def paced_calls(count: int, send: bool = True, interval: float = 0.001
                      ) -> tuple[int, float]:
    """``count`` calls to shard 1 on a timer; each leaves without waiting for the
    previous one's reply (``send=False``: the timer alone, the CPU baseline).
    (doorbells rung, sender CPU seconds)."""
    link = shardio.current_reactor().links[1]
    rung, cpu = link.doorbells_rung, time.thread_time()
    calls = []
    for i in range(count):
        if send:
            calls.append(asyncio.ensure_future(shardio.submit_to(1, noop, i)))
        await asyncio.sleep(interval)
    results = await asyncio.gather(*calls)
    if send and results != list(range(count)):
        raise AssertionError("paced calls: wrong results")
    return link.doorbells_rung - rung, time.thread_time() - cpu


def measure_busy_peer(calls: int, hooked: bool, client_cpu: int | None = None,
                      send: bool = True) -> tuple[float, float, float]:
    """(doorbells per message, sender CPU us per message, receiver's flagged-asleep share).

    The socket client is a thread of this process; ``client_cpu`` pins it.  On CPU 0,
    the sender's, it cannot send its next line while the sender runs, so the receiver
    sleeps exactly when calls leave; on CPU 1, the receiver's, the receiver was
    measured almost never to sleep (a line is waiting whenever it looks)."""
    import socket
    import threading

    loop = "auto" if hooked else uvloop.new_event_loop
    with shardio.ShardGroup(2, idle_poll_us=0, loop=loop, stall_threshold_ms=None) as group:
        port = group.submit(1, start_busy_server, 500).result()
        stop = threading.Event()

        def client() -> None:
            if client_cpu is not None:
                os.sched_setaffinity(0, {client_cpu})
            with socket.create_connection(("127.0.0.1", port)) as sock:
                reader = sock.makefile("rb")
                while not stop.is_set():
                    sock.sendall(b"x\n")
                    reader.readline()

        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(0.2)
        started, slept = group.submit(1, busy_accounting).result()
        rung, cpu = group.submit(0, paced_calls, calls, send).result()
        ended, slept_after = group.submit(1, busy_accounting).result()
        asleep = (slept_after - slept) / (ended - started)
        stop.set()
        thread.join()
    return rung / calls, cpu / calls * 1e6, asleep


# ------------------------------------------------------------------ to_thread


def measure_to_thread(loop_factory, calls: int, pipelined: int) -> tuple:
    async def run() -> tuple:
        for i in range(500):
            await asyncio.to_thread(noop, i)
        samples = []
        for i in range(calls // 4):
            start = time.perf_counter_ns()
            await asyncio.to_thread(noop, i)
            samples.append(time.perf_counter_ns() - start)
        window = 1000
        start = time.perf_counter()
        for base in range(0, pipelined // 4, window):
            await asyncio.gather(*[asyncio.to_thread(noop, i) for i in range(base, base + window)])
        return (*percentiles(samples), pipelined // 4 / (time.perf_counter() - start))

    loop = loop_factory()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


# ------------------------------------------------------------------ table


def main() -> None:
    parser = argparse.ArgumentParser(description="cross-shard call benchmark")
    parser.add_argument("--calls", type=int, default=20000, help="round trips for latency")
    parser.add_argument("--pipelined", type=int, default=100000, help="calls for throughput")
    parser.add_argument("--busy-calls", type=int, default=1000,
                        help="messages to a shard busy with sockets")
    options = parser.parse_args()
    rows = measure_shardio(options.calls, options.pipelined)
    rows["multiprocessing.Pipe (echo process)"] = measure_pipe(options.calls, options.pipelined)
    rows["multiprocessing.Queue (echo process)"] = measure_queue(options.calls,
                                                                 options.pipelined)
    rows["asyncio.to_thread (asyncio loop)"] = measure_to_thread(
        asyncio.new_event_loop, options.calls, options.pipelined)
    rows["asyncio.to_thread (uvloop)"] = measure_to_thread(
        uvloop.new_event_loop, options.calls, options.pipelined)
    rows["floor: Python spin on shared memory, 2 procs"] = measure_spin_floor(
        options.calls)

    base_p50 = rows["shardio submit_to (shard 0 -> shard 1)"][0]
    base_rate = rows["shardio submit_to (shard 0 -> shard 1)"][2]
    print(f"cross-shard no-op calls; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{options.calls} round trips, {options.pipelined} pipelined")
    header = (f"| {'what':48} | {'p50 us':>8} | {'p99 us':>8} | {'pipelined calls/s':>17} "
              f"| {'p50 vs submit_to':>16} | {'rate vs submit_to':>17} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, (p50, p99, rate) in rows.items():
        print(f"| {name:48} | {p50:8.1f} | {p99:8.1f} | {rate:17,.0f} "
              f"| {p50 / base_p50:15.1f}x | {base_rate / rate:16.2f}x |")

    print()
    print(f"messages to a shard busy serving sockets (idle_poll_us=0), {options.busy_calls} "
          "calls on a 1 ms timer")
    print("| loop | doorbells per message | sender CPU us per message | receiver flagged asleep |")
    print("|---|---|---|---|")
    busy_rows = [("before: no wake hook (loop factory)", False, None, True),
                 ("after: wake hook (shardio's loop)", True, None, True)]
    if {0, 1} <= os.sched_getaffinity(0):  # the shards sit on CPUs 0 and 1
        busy_rows += [("after, socket client on the sender's CPU 0", True, 0, True),
                      ("after, socket client on the receiver's CPU 1", True, 1, True)]
    busy_rows.append(("baseline: the sender's 1 ms timer, no calls", True, None, False))
    for label, hooked, client_cpu, send in busy_rows:
        rung, cpu, asleep = measure_busy_peer(options.busy_calls, hooked, client_cpu, send)
        print(f"| {label} | {rung:.2f} | {cpu:.1f} | {asleep:.0%} |")


if __name__ == "__main__":
    main()
