"""Read latency while the store compacts: the OSD's 4 KiB reads with and without compaction.

    python bench/compaction.py [--shards 2] [--objects 20000] [--rate 2000] [--seconds 4]
                               [--data DIR]

Loads ``--objects`` objects of 4 KiB, overwrites every one of them twice (so
two thirds of the log is garbage, in 4 MiB segments), then runs an open loop
of random 4 KiB reads at ``--rate`` per second (latency from each intended
send time) twice: once with the store idle, once while every shard compacts
its whole store (``OSDServer.compact(min_garbage=0)``, on the shards' tame
stacks, while they serve). It prints both runs and the p99 ratio, and the
compaction's own figures (bytes copied and reclaimed, seconds taken).

There is no scheduling group yet to bound the compaction's share of a shard:
this measures what a running compaction costs the reads today.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from shardio.osd.client import AsyncClient
from shardio.osd.loadgen import BenchResult, format_table, load, object_names, open_loop
from shardio.osd.server import OSDServer

SIZE = 4096


async def read_while(
    c: AsyncClient, names: list[bytes], rate: float, running: threading.Event, label: str
) -> BenchResult:
    """Open-loop reads in 0.5 s windows until ``running`` clears; one merged result."""
    total = BenchResult(label, target_rate=rate)
    while True:
        part = await open_loop(c, names, seconds=0.5, rate=rate, seed=len(total.latencies))
        total.latencies.extend(part.latencies)
        total.service.extend(part.service)
        total.errors += part.errors
        total.first_error = total.first_error or part.first_error
        total.seconds += part.seconds
        if not running.is_set():
            break
    total.ops = len(total.latencies)
    return total


async def bench(osd: OSDServer, args: argparse.Namespace) -> list[Any]:
    assert osd.address is not None
    names = object_names(args.objects)
    async with await AsyncClient.connect(*osd.address, timeout=60) as c:
        for _ in range(3):  # the original and two overwrites
            await load(c, names, SIZE)
        before = osd.total_stats()["store"]
        await open_loop(c, names, seconds=1.0, rate=args.rate)  # warm up
        idle = await open_loop(c, names, seconds=args.seconds, rate=args.rate, label="idle store")
        running = threading.Event()
        running.set()
        out: dict[str, Any] = {}

        def compact() -> None:
            t0 = time.perf_counter()
            try:
                out["results"] = osd.compact(min_garbage=0.0)
            finally:
                out["seconds"] = time.perf_counter() - t0
                running.clear()

        t = threading.Thread(target=compact)
        t.start()
        during = await read_while(c, names, args.rate, running, "while compacting")
        t.join()
        total = osd.total_stats()
    return [idle, during, out, before, total["store"], total.get("reactor_stalls", 0)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--objects", type=int, default=20000)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--data", default=None, help="data directory (default: a temporary one)")
    args = p.parse_args()
    data = args.data or tempfile.mkdtemp(prefix="shardio-compaction-bench-")
    try:
        with OSDServer(
            data,
            shards=args.shards,
            sync=False,
            compaction_interval=None,
            segment_size=4 * 1024 * 1024,
            log_level=logging.ERROR,  # stall reports are counted below instead
        ) as osd:
            idle, during, out, before, after, stalls = asyncio.run(bench(osd, args))
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    print(
        f"{args.shards} shards, {args.objects} objects of {SIZE} B, reads at {args.rate:.0f}/s; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(format_table([idle, during]))
    p99_idle = idle.percentiles()[0.99]
    p99_during = during.percentiles()[0.99]
    ratio = p99_during / p99_idle if p99_idle else float("nan")
    print(f"\np99 while compacting / p99 idle: {ratio:.2f}x")
    copied = sum(r["bytes_copied"] for r in out["results"])
    reclaimed = sum(r["bytes_reclaimed"] for r in out["results"])
    print(
        f"compaction: {out['seconds']:.2f} s, {copied / 2**20:.1f} MiB copied, "
        f"{reclaimed / 2**20:.1f} MiB reclaimed; log {before['log_bytes'] / 2**20:.1f} -> "
        f"{after['log_bytes'] / 2**20:.1f} MiB for {after['live_bytes'] / 2**20:.1f} MiB live"
    )
    print(f"reactor stalls reported by the shards over the whole run: {stalls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
