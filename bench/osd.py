"""OSD read benchmark: the store on tame stacks in shards vs the store in a thread pool.

    python bench/osd.py [--data DIR] [--objects 20000] [--seconds 5] [--concurrency 16]
                        [--rates 1000,3000] [--systems shardio2,shardio1,threadpool8,threadpool32]

Systems, all serving the same protocol to the same client:

* ``shardio2`` / ``shardio1`` -- the shardio OSD with 2 / 1 shard processes:
  each shard's store runs on tame stacks (TameEnv: preadv2(RWF_NOWAIT), then
  io_uring on a page-cache miss). The client sends each read straight to
  the owning shard.
* ``threadpool`` (or ``threadpoolN``: N threads) -- bench/peers/asyncio_threadpool.py:
  one uvloop process, the same store under PosixEnv, every op in a
  ThreadPoolExecutor (``--threads``, default 8), the same messenger code.

Per system: load ``--objects`` objects of 4 KiB (writes not fsynced: this is a
read benchmark), read them all once, then 4 KiB reads of random objects:

* cached: a closed loop (``--concurrency`` in flight) and open loops at each
  of ``--rates`` (latency from the intended send time: coordinated omission
  corrected);
* uncached: the same closed loop while a thread evicts the store's files
  from the page cache (posix_fadvise DONTNEED) every 20 ms; the shards'
  I/O counters tell how many reads really missed. The data directory must
  be on a real disk: tmpfs is refused for this part.

The load generator is one uvloop process on the same machine: on a small
machine it competes with the servers for CPU (the table says how many CPUs
and the load average). ``srv CPU`` is the servers' CPU time (user + system,
from /proc) per read: it includes idle polling of the shard reactors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from shardio.osd.client import AsyncClient
from shardio.osd.demo import evict_page_cache, fs_type
from shardio.osd.loadgen import BenchResult, closed_loop, content, load, object_names, open_loop
from shardio.osd.server import OSDServer

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 4096


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Evictor(threading.Thread):
    """Drops the store's files from the page cache every ``period`` seconds."""

    def __init__(self, data: str, period: float = 0.02) -> None:
        super().__init__(name="evictor", daemon=True)
        self.data = data
        self.period = period
        self.stop = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        while not self.stop.wait(self.period):
            evict_page_cache(self.data)
            self.rounds += 1


@dataclass
class Row:
    system: str
    cache: str
    load: str
    result: BenchResult
    server_cpu_us: float
    missed: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class System:
    """A running server: its address, pids (for CPU accounting), I/O counters, stop()."""

    name: str
    address: tuple[str, int]
    pids: list[int]

    def io_counts(self) -> tuple[int, int] | None:
        return None

    def stalls(self) -> int | None:
        return None

    def stop(self) -> None:
        raise NotImplementedError


class Shardio(System):
    def __init__(self, data: str, shards: int) -> None:
        self.name = f"shardio, {shards} shard{'s' if shards > 1 else ''} (tame stacks)"
        # shard logs at ERROR: stall reports (with stacks) would bury the output; counted below
        self.osd = OSDServer(data, shards=shards, sync=False, log_level=logging.ERROR).start()
        assert self.osd.address is not None
        self.address = self.osd.address
        self.pids = list(self.osd.shard_pids)

    def io_counts(self) -> tuple[int, int]:
        io = self.osd.total_stats().get("io", {})
        return int(io.get("read_cached", 0)), int(io.get("read_uring", 0))

    def stalls(self) -> int:
        return int(self.osd.total_stats().get("reactor_stalls", 0))

    def stop(self) -> None:
        self.osd.stop()


class ThreadPool(System):
    def __init__(self, data: str, threads: int) -> None:
        self.name = f"asyncio + {threads}-thread pool (PosixEnv)"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "peers", "asyncio_threadpool.py"),
                "--data",
                data,
                "--threads",
                str(threads),
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"the thread-pool server did not start: {line!r}")
        host, port = line.split()[-1].rsplit(":", 1)
        self.address = (host, int(port))
        self.pids = [self.proc.pid]

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(30)


async def run_system(sysm: System, data: str, args: argparse.Namespace) -> list[Row]:
    names = object_names(args.objects, "b-")
    rows: list[Row] = []
    async with await AsyncClient.connect(*sysm.address, timeout=30) as c:
        t0 = time.perf_counter()
        await load(c, names, SIZE, concurrency=64)
        print(f"  loaded {len(names)} objects in {time.perf_counter() - t0:.1f} s", flush=True)
        # read everything once: warms the page cache and checks the data
        bad = 0
        for i in range(0, len(names), 256):
            part = names[i : i + 256]
            got = await asyncio.gather(*(c.read(n, 0, SIZE) for n in part))
            bad += sum(g != content(n, SIZE) for n, g in zip(part, got, strict=True))
        if bad:
            raise RuntimeError(f"{sysm.name}: {bad} objects read back wrong")

        async def measured(cache: str, label: str, coro: Any) -> None:
            io0 = sysm.io_counts()
            cpu0 = sum(cpu_seconds(p) for p in sysm.pids)
            res: BenchResult = await coro
            cpu1 = sum(cpu_seconds(p) for p in sysm.pids)
            io1 = sysm.io_counts()
            missed = ""
            if io0 is not None and io1 is not None:
                hits, misses = io1[0] - io0[0], io1[1] - io0[1]
                missed = f"{misses / max(1, hits + misses):.0%}"
            per_op = (cpu1 - cpu0) / res.ops * 1e6 if res.ops else 0.0
            rows.append(Row(sysm.name, cache, label, res, per_op, missed))
            p = res.percentiles()
            print(
                f"  {cache:8} {label:22} {res.throughput:8.0f}/s p50 {p[0.5] * 1e3:.2f} "
                f"p99 {p[0.99] * 1e3:.2f} ms, errors {res.errors}",
                flush=True,
            )

        await measured(
            "cached",
            f"closed, {args.concurrency} in flight",
            closed_loop(c, names, seconds=args.seconds, concurrency=args.concurrency, length=SIZE),
        )
        for rate in args.rates:
            await measured(
                "cached",
                f"open, {rate:.0f}/s",
                open_loop(c, names, seconds=args.seconds, rate=rate, length=SIZE),
            )
        if args.uncached:
            ev = Evictor(data)
            ev.start()
            try:
                await measured(
                    "uncached",
                    f"closed, {args.concurrency} in flight",
                    closed_loop(
                        c, names, seconds=args.seconds, concurrency=args.concurrency, length=SIZE
                    ),
                )
                await measured(
                    "uncached",
                    f"closed, {args.deep} in flight",
                    closed_loop(c, names, seconds=args.seconds, concurrency=args.deep, length=SIZE),
                )
            finally:
                ev.stop.set()
                ev.join()
    return rows


def format_rows(rows: list[Row]) -> str:
    head = (
        "| system | cache | load | reads/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| errors | missed cache | srv CPU µs/read |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        p = r.result.percentiles()
        lines.append(
            f"| {r.system} | {r.cache} | {r.load} | {r.result.throughput:.0f} | "
            + " | ".join(f"{p[q] * 1e3:.2f}" for q in (0.5, 0.9, 0.99, 0.999, 1.0))
            + f" | {r.result.errors} | {r.missed or 'n/a'} | {r.server_cpu_us:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default=None,
        help="parent directory for the stores (default: a temp dir in /var/tmp)",
    )
    p.add_argument("--objects", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--deep", type=int, default=64, help="uncached: a second, deeper closed loop")
    p.add_argument(
        "--rates", default="1000,3000", help="open-loop rates, comma separated (reads/s)"
    )
    p.add_argument("--threads", type=int, default=8, help="threads of the thread-pool server")
    p.add_argument("--systems", default="shardio2,shardio1,threadpool8,threadpool32")
    p.add_argument("--no-uncached", dest="uncached", action="store_false")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    parent = args.data or tempfile.mkdtemp(prefix="shardio-osd-bench-", dir="/var/tmp")
    kind = fs_type(parent)
    if args.uncached and kind in ("tmpfs", "ramfs"):
        print(
            f"{parent} is on {kind}: the page cache is the storage there; uncached runs "
            "skipped (use --data on a real disk)",
            file=sys.stderr,
        )
        args.uncached = False
    ncpu = len(os.sched_getaffinity(0))
    print(
        f"data under {parent} ({kind}); {ncpu} CPUs; load average "
        f"{os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    rows: list[Row] = []
    loads: list[float] = []
    notes: list[str] = []
    for key in args.systems.split(","):
        data = tempfile.mkdtemp(prefix=f"{key}-", dir=parent)
        sysm: System
        if key.startswith("shardio"):
            sysm = Shardio(data, int(key[len("shardio") :] or 2))
        elif key.startswith("threadpool"):
            sysm = ThreadPool(data, int(key[len("threadpool") :] or args.threads))
        else:
            raise SystemExit(f"unknown system {key!r}")
        print(f"{sysm.name}:", flush=True)
        try:
            rows += uvloop.run(run_system(sysm, data, args))
            stalls = sysm.stalls()
            if stalls is not None:
                print(f"  reactor stalls over 25 ms during the runs: {stalls}", flush=True)
                notes.append(f"{sysm.name}: {stalls} reactor stalls over 25 ms")
        finally:
            sysm.stop()
        loads.append(os.getloadavg()[0])
    print()
    print(
        f"4 KiB reads of random objects among {args.objects}; {args.seconds:g} s per run; "
        f"{ncpu} CPUs shared by the servers and the load generator; load average during "
        f"the runs {min(loads):.1f}-{max(loads):.1f}"
    )
    print(format_rows(rows))
    for note in notes:
        print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        "system": r.system,
                        "cache": r.cache,
                        "load": r.load,
                        "throughput": r.result.throughput,
                        "errors": r.result.errors,
                        "percentiles_ms": {
                            str(q): v * 1e3 for q, v in r.result.percentiles().items()
                        },
                        "missed_cache": r.missed,
                        "server_cpu_us_per_read": r.server_cpu_us,
                    }
                    for r in rows
                ],
                f,
                indent=1,
            )
    if not args.data:
        shutil.rmtree(parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
