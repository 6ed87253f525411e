"""The latency suite: shardio's OSD against the servers Python users would pick instead.

    python bench/latency.py                      # everything, both layouts, ~12 min on 2 cores
    python bench/latency.py --servers shardio,gevent --quick
    python bench/latency.py --layouts fair --no-uncached

Every server serves the same OSD data directory (one load, the same segment
files), the same 4 KiB reads, over the same wire protocol, to the same load
generator (bench/loadgen.py, its own process):

* ``shardio``   -- ``python -m shardio.osd serve``: one shard process per
  server CPU, the store on tame stacks, page-cache misses through io_uring;
* ``asyncio`` / ``uvloop`` -- bench/peers/asyncio_server.py: one process, the
  store in ``asyncio.to_thread`` (PosixEnv);
* ``gevent``    -- bench/peers/gevent_server.py: monkey-patched, PosixEnv;
* ``threaded``  -- bench/peers/threaded_server.py: ThreadingTCPServer, PosixEnv;
* ``shardio-threaded`` -- bench/peers/shardio_threaded.py: that same server
  class and handler, unmodified, hosted on one shardio shard's tame stacks
  (one stack per connection instead of an OS thread);
* ``reuseport`` -- bench/peers/reuseport_workers.py: 2 uvloop worker
  processes on one SO_REUSEPORT port, each with ``to_thread``.

CPU placement, the same for every server, in two *layouts* (``--layouts``;
one run of the suite measures both, each with its own table):

* ``fair``    -- every server confined to CPU 0 (shardio: 1 shard, pinned
  there), the load generator and this runner on CPU 1: the server's cost
  per read on one core, with nothing else on that core;
* ``default`` -- the server (and every process and thread it starts) may run
  on ``--server-cpus`` (default: all CPUs; shardio runs one shard per CPU and
  pins each itself); the load generator and this runner are pinned to
  ``--client-cpus`` (default: the last CPU). On a 2-CPU machine the client
  shares a CPU with the server: the only way to give a multi-core server
  both cores.

The OSD refuses a data directory made with another shard count, so each
layout loads its own data set (through a shardio OSD with that layout's
shards; the peers read the same files). The client's own cost is reported
per point.

Scenarios per server:

1. cached: a closed loop (``--concurrency`` reads in flight: the saturation
   throughput), then open loops at rising offered loads (``--rates``, capped
   at 1.3x the closed-loop throughput) until one is not sustained;
2. uncached: the same closed loop and a few open-loop rates while a thread
   of this runner evicts the store's files from the page cache
   (posix_fadvise DONTNEED) every 20 ms. The data must be on a real disk
   (tmpfs is refused), by default under /var/tmp. The ceiling comes first:
   fio (io_uring, buffered, the suite's queue depth, 4 KiB random reads over
   the store's own segment files) on the servers' CPUs under the same
   eviction; every server's uncached closed loop is reported as a share of it.

``--runs N`` measures every server N times, the servers interleaved (run 1 of
each, then run 2, ...), and reports each point's median run: the open loop's
p99 at each rate is the median of the N runs (a rate counts as sustained when
most runs sustained it), the closed loop's figures those of its median run.

The goals (issue 11, evaluated in the fair layout, reported in both): the
server CPU per cached read <= gevent's, the closed-loop and the highest
sustained open-loop rate >= gevent's; at every rate up to 80 % of the best
peer's highest sustained rate, shardio's p99 <= 1.2x that peer's + 100 us;
uncached, >= 90 % of the fio ceiling and >= every peer.

Results: ``--out`` (default bench/latency-results/) gets run.json (the
machine, the load average, the command, each layout's goals) and summary.md
(every layout's tables, in one file); each layout's points go to
``--out/LAYOUT/`` (points.csv, points.json: every point with its encoded
HDR histogram, and that layout's run.json and summary.md), where
bench/plot.py draws its PNGs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")
PREFIX = "lat-"

DEFAULT_RATES = (
    1000, 2000, 4000, 6000, 8000, 10000, 12500, 15000, 17500, 20000, 22500, 25000, 30000,
    35000, 40000, 50000,
)  # fmt: skip
DEFAULT_UNCACHED_RATES = (1000, 3000)


class SuiteError(Exception):
    """The suite cannot run (a server did not start, the data dir is unusable, ...)."""


@dataclass(frozen=True)
class Layout:
    """Where the servers and the load generator run; shardio gets a shard per server CPU."""

    key: str
    title: str
    server_cpus: str  #: a cpuset such as "0" or "0-1"
    client_cpus: str

    @property
    def shards(self) -> int:
        return len(_cpuset(self.server_cpus))


def layouts(args: argparse.Namespace) -> dict[str, Layout]:
    """The layouts this machine can run: ``fair`` needs two CPUs."""
    out = {
        "fair": Layout("fair", "fair: every server on CPU 0 (shardio: 1 shard), load generator "
                       "on CPU 1", "0", "1"),
        "default": Layout("default", f"suite default: servers on CPUs {args.server_cpus} "
                          f"(shardio: {len(_cpuset(args.server_cpus))} shards), load generator "
                          f"on CPU {args.client_cpus}", args.server_cpus, args.client_cpus),
    }
    available = os.sched_getaffinity(0)
    if not {0, 1} <= available:
        del out["fair"]
    return out


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server of the suite and recognise that it serves."""

    key: str
    label: str
    argv: tuple[str, ...]  #: {data} is replaced by the data directory
    ready: str  #: a regex on its stdout with (host, port) groups
    single_process: bool


_PY = sys.executable
_LISTENING = r"listening on ([\d.]+):(\d+)"
SERVERS: dict[str, ServerSpec] = {
    s.key: s
    for s in (
        ServerSpec(
            "shardio", "shardio: a shard process per server CPU, tame stacks + io_uring",
            # --idle-poll-us 0: on 2 CPUs one shard shares its CPU with the load generator,
            # and idle polling would take that CPU from it (measured: p99 at 8000/s
            # 121 ms with the default 200 us, 4.1 ms with 0). An operator sets it so too.
            (_PY, "-m", "shardio.osd", "serve", "--shards", "{shards}", "--data", "{data}",
             "--port", "0", "--no-sync", "--idle-poll-us", "0"),
            r"shared port ([\d.]+):(\d+)", False,
        ),
        ServerSpec(
            "asyncio", "asyncio + to_thread",
            (_PY, os.path.join(PEERS, "asyncio_server.py"), "--data", "{data}", "--loop", "asyncio"),
            _LISTENING, True,
        ),
        ServerSpec(
            "uvloop", "uvloop + to_thread",
            (_PY, os.path.join(PEERS, "asyncio_server.py"), "--data", "{data}", "--loop", "uvloop"),
            _LISTENING, True,
        ),
        ServerSpec(
            "gevent", "gevent (monkey-patched)",
            (_PY, os.path.join(PEERS, "gevent_server.py"), "--data", "{data}"),
            _LISTENING, True,
        ),
        ServerSpec(
            "threaded", "ThreadingTCPServer",
            (_PY, os.path.join(PEERS, "threaded_server.py"), "--data", "{data}"),
            _LISTENING, True,
        ),
        ServerSpec(
            # The threaded peer's own ThreadingTCPServer and handler, unmodified, on one
            # shardio shard's tame stacks (bench/peers/shardio_threaded.py).
            "shardio-threaded", "ThreadingTCPServer's handler, unmodified, on a shardio shard",
            (_PY, os.path.join(PEERS, "shardio_threaded.py"), "--data", "{data}"),
            _LISTENING, False,
        ),
        ServerSpec(
            "reuseport", "2 uvloop workers, SO_REUSEPORT, to_thread",
            (_PY, os.path.join(PEERS, "reuseport_workers.py"), "--data", "{data}",
             "--workers", "2", "--loop", "uvloop"),
            _LISTENING, False,
        ),
    )
}


def fs_type(path: str) -> str:
    """The filesystem type holding path, from /proc/self/mounts ('?' if unknown)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def evict(data_dir: str) -> None:
    """Drop the store's segment files from the page cache (clean pages only)."""
    for root, _, files in os.walk(data_dir):
        for name in files:
            if not name.endswith(".log"):
                continue
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Evictor(threading.Thread):
    """Evicts the data directory from the page cache every ``period`` seconds."""

    def __init__(self, data_dir: str, period: float = 0.02) -> None:
        super().__init__(name="evictor", daemon=True)
        self.data_dir = data_dir
        self.period = period
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            evict(self.data_dir)

    def __enter__(self) -> Evictor:
        evict(self.data_dir)
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()


FIO = "fio"  #: the uncached ceiling's row: not a server, never a peer


def segment_files(data_dir: str) -> list[str]:
    """The store's segment files (what ``evict`` drops), in a stable order."""
    return sorted(os.path.join(root, name) for root, _, files in os.walk(data_dir)
                  for name in files if name.endswith(".log"))


def fio_ceiling(data_dir: str, args: argparse.Namespace, layout: Layout) -> dict[str, Any] | None:
    """The uncached ceiling: fio's 4 KiB random reads over the store's segment files at the
    suite's queue depth (io_uring, buffered like the servers' reads), pinned to the servers'
    CPUs, while the same evictor runs. A point shaped like the load generator's; None
    without fio."""
    if shutil.which(FIO) is None:
        print("fio is not installed (apt-get install fio): no uncached ceiling", flush=True)
        return None
    files = segment_files(data_dir)
    if any(":" in f for f in files):  # fio splits --filename at colons
        raise SuiteError(f"a segment path contains ':', which fio cannot take: {files}")
    cpus = _cpuset(layout.server_cpus)
    argv = [
        FIO, "--name=ceiling", "--filename=" + ":".join(files), "--rw=randread", "--bs=4k",
        f"--iodepth={args.concurrency}", "--ioengine=io_uring", "--direct=0", "--numjobs=1",
        "--file_service_type=random", "--norandommap", "--randrepeat=0", "--time_based",
        f"--runtime={args.seconds}", f"--ramp_time={args.warmup}", "--output-format=json",
    ]
    load_start = os.getloadavg()[0]
    with Evictor(data_dir):
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=args.seconds + args.warmup + 60,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if proc.returncode != 0:
        raise SuiteError(f"fio failed ({proc.returncode}): {proc.stderr[-2000:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    read = job["read"]
    iops = float(read["iops"])
    percentiles = read["clat_ns"].get("percentile", {})

    def percentile(p: str) -> float:
        return percentiles.get(p, 0) / 1e3

    return {
        "mode": "closed", "concurrency": args.concurrency, "offered": None, "throughput": iops,
        "latency_us": {"p50": percentile("50.000000"), "p90": percentile("90.000000"),
                       "p99": percentile("99.000000"), "p99.9": percentile("99.900000"),
                       "max": read["clat_ns"]["max"] / 1e3, "mean": read["clat_ns"]["mean"] / 1e3},
        "ok": int(read["total_ios"]), "errors": 0, "timeouts": 0, "overloaded": False,
        "send_lag_us": {}, "service_us": {},
        # fio's own CPU (its io-wq kernel workers are not in it): a lower bound
        "server_cpu_us_per_read": (job["usr_cpu"] + job["sys_cpu"]) / 100 / max(iops, 1) * 1e6,
        "client_cpu_us_per_read": 0.0, "loadavg": [load_start, os.getloadavg()[0]],
        "first_error": None, "server": FIO, "label": f"fio io_uring QD{args.concurrency} (ceiling)",
        "scenario": "uncached", "sustained": True, "layout": layout.key,
    }


class Server:
    """A server process of the suite, started pinned to ``cpus``; stopped with SIGTERM."""

    def __init__(self, spec: ServerSpec, data_dir: str, cpus: set[int], log_path: str,
                 timeout: float = 60.0) -> None:
        self.spec = spec
        shards = str(len(cpus))  # shardio: one shard per CPU it may use
        argv = [a.replace("{data}", data_dir).replace("{shards}", shards) for a in spec.argv]
        self.log = open(log_path, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=os.path.dirname(HERE),
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # noqa: PLW1509 -- no threads yet
        )
        self.address = self._await_ready(re.compile(spec.ready), timeout)
        assert self.proc.stdout is not None
        threading.Thread(target=self._copy_stdout, daemon=True).start()

    def _await_ready(self, ready: re.Pattern[str], timeout: float) -> tuple[str, int]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                self.log.write(line)
                m = ready.search(line)
                if m:
                    return m.group(1), int(m.group(2))
                if time.monotonic() > deadline:
                    break
        finally:
            timer.cancel()
        self.stop()
        raise SuiteError(f"{self.spec.key} did not start; see {self.log.name}")

    def _copy_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.flush()
        self.log.close()


def _cpuset(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def run_loadgen(server: Server, args: argparse.Namespace, layout: Layout,
                plan: list[dict[str, Any]], stop_when_saturated: bool) -> list[dict[str, Any]]:
    """Run bench/loadgen.py pinned to the client CPUs; return its points."""
    host, port = server.address
    argv = [
        _PY, os.path.join(HERE, "loadgen.py"), "--addr", f"{host}:{port}",
        "--objects", str(args.objects), "--prefix", PREFIX, "--plan", json.dumps(plan),
        "--connections", str(args.connections), "--warmup", str(args.warmup),
        "--server-pids", str(server.pid), "--cpus", layout.client_cpus,
    ]
    if stop_when_saturated:
        argv.append("--stop-when-saturated")
    budget = sum(p["seconds"] + args.warmup + 3 for p in plan) + 60
    nice = args.client_nice
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=budget,
                          preexec_fn=(lambda: os.nice(nice)) if nice else None)
    points = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not points:
        raise SuiteError(
            f"loadgen against {server.spec.key} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return points


def _show(key: str, scenario: str, p: dict[str, Any]) -> None:
    lat = p["latency_us"]
    what = f"open {p['offered']:.0f}/s" if p["mode"] == "open" else f"closed x{p['concurrency']}"
    flag = " NOT SUSTAINED" if p.get("sustained") is False else ""
    print(f"  {key:9} {scenario:8} {what:16} {p['throughput']:8.0f}/s  p50 "
          f"{lat.get('p50', 0) / 1e3:7.3f}  p99 {lat.get('p99', 0) / 1e3:8.3f}  p99.9 "
          f"{lat.get('p99.9', 0) / 1e3:8.3f} ms  srv {p['server_cpu_us_per_read'] or 0:5.0f} "
          f"cli {p['client_cpu_us_per_read']:5.0f} us/read  load {p['loadavg'][1]:.1f}"
          f"{flag}", flush=True)


def sustained(p: dict[str, Any]) -> bool:
    """An open-loop point was sustained: no errors, no overload, >= 95% of offered achieved."""
    if p["errors"] or p["timeouts"] or p["overloaded"]:
        return False
    return p["mode"] != "open" or p["throughput"] >= 0.95 * p["offered"]


def bench_server(spec: ServerSpec, data_dir: str, args: argparse.Namespace, layout: Layout,
                 out_dir: str, run: int = 0) -> list[dict[str, Any]]:
    """All the scenarios against one server in one layout; its points, labelled with ``run``."""
    server = Server(spec, data_dir, _cpuset(layout.server_cpus),
                    os.path.join(out_dir, f"server-{spec.key}.log"))
    rows: list[dict[str, Any]] = []

    def keep(scenario: str, points: list[dict[str, Any]]) -> None:
        for p in points:
            p.update(server=spec.key, label=spec.label, scenario=scenario, sustained=sustained(p),
                     layout=layout.key, run=run)
            rows.append(p)
            _show(spec.key, scenario, p)

    try:
        closed = {"mode": "closed", "concurrency": args.concurrency, "seconds": args.seconds}
        keep("cached", run_loadgen(server, args, layout, [closed], False))
        cap = 1.3 * rows[-1]["throughput"]
        rates = [r for r in args.rates if r <= cap] or [args.rates[0]]
        plan = [{"mode": "open", "rate": r, "seconds": args.seconds} for r in rates]
        keep("cached", run_loadgen(server, args, layout, plan, True))
        if args.uncached:
            plan = [dict(closed)] + [
                {"mode": "open", "rate": r, "seconds": args.seconds} for r in args.uncached_rates
            ]
            with Evictor(data_dir):
                keep("uncached", run_loadgen(server, args, layout, plan, False))
    finally:
        server.stop()
    return rows


def make_data(data_dir: str, args: argparse.Namespace, layout: Layout, out_dir: str) -> None:
    """Load a layout's working set, through a shardio OSD with that layout's shard count.

    The OSD refuses a data directory made with another shard count (objects
    are placed by it), so every layout has its own; every server reads it.
    """
    spec = SERVERS["shardio"]
    server = Server(spec, data_dir, _cpuset(layout.server_cpus), os.path.join(out_dir, "load.log"))
    try:
        host, port = server.address
        subprocess.run(
            [_PY, "-m", "shardio.osd", "load", "--addr", f"{host}:{port}", "--objects",
             str(args.objects), "--prefix", PREFIX, "--size", "4096", "--verify"],
            check=True, capture_output=True, text=True, timeout=300,
        )
    except subprocess.CalledProcessError as exc:
        raise SuiteError(f"loading the data failed: {exc.stdout}{exc.stderr}") from None
    finally:
        server.stop()


CSV_FIELDS = (
    "layout", "run", "server", "scenario", "mode", "offered", "concurrency", "throughput", "sustained",
    "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "mean_us", "ok", "errors", "timeouts",
    "send_lag_p99_us", "service_p99_us", "server_cpu_us_per_read", "client_cpu_us_per_read",
    "loadavg_start", "loadavg_end", "first_error",
)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for p in rows:
            lat = p["latency_us"]
            w.writerow([
                p["layout"], p.get("run", ""), p["server"], p["scenario"], p["mode"], p["offered"] or "", p["concurrency"] or "",
                p["throughput"], p["sustained"], lat.get("p50", ""), lat.get("p90", ""),
                lat.get("p99", ""), lat.get("p99.9", ""), lat.get("max", ""), lat.get("mean", ""),
                p["ok"], p["errors"], p["timeouts"], p["send_lag_us"].get("p99", ""),
                p["service_us"].get("p99", ""), p["server_cpu_us_per_read"],
                p["client_cpu_us_per_read"], p["loadavg"][0], p["loadavg"][1], p["first_error"],
            ])


# -- summary and goals -------------------------------------------------------------------------


def _by(rows: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def saturation(rows: Sequence[dict[str, Any]], server: str, scenario: str = "cached") -> dict[str, float]:
    """Closed-loop throughput and the highest sustained open-loop rate of a server."""
    closed = _by(rows, server=server, scenario=scenario, mode="closed")
    opens = [r["offered"] for r in _by(rows, server=server, scenario=scenario, mode="open")
             if r["sustained"]]
    return {
        "closed": closed[0]["throughput"] if closed else 0.0,
        "open": max(opens) if opens else 0.0,
    }


def median_points(rows: Sequence[dict[str, Any]], runs: int) -> list[dict[str, Any]]:
    """One point per server, scenario and load over ``runs`` runs: the median run's.

    Open loop: the point with the median p99 among the runs that sustained the
    rate; the rate counts as sustained when more than half of the runs did (a
    run that stopped below it did not). Closed loop: the point with the median
    throughput. Each keeps the runs' figures beside it (``p99_runs_us``,
    ``throughput_runs``, ``sustained_runs``)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["server"], r["scenario"], r["mode"], r["offered"], r["concurrency"])
        groups.setdefault(key, []).append(r)
    out = []
    for points in groups.values():
        ok = [q for q in points if q["sustained"]]
        if points[0]["mode"] == "open":
            pool = sorted(ok or points, key=lambda q: q["latency_us"].get("p99", 0))
        else:
            pool = sorted(points, key=lambda q: q["throughput"])
        chosen = dict(pool[(len(pool) - 1) // 2])
        chosen.update(
            runs=runs, sustained_runs=len(ok), sustained=2 * len(ok) > runs,
            p99_runs_us=sorted(q["latency_us"].get("p99", 0) for q in points),
            throughput_runs=sorted(q["throughput"] for q in points),
        )
        out.append(chosen)
    return out


#: The peer issue 11's CPU and throughput goals compare with.
REFERENCE_PEER = "gevent"


def goals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 11's goals on a layout's (median) points; see the module docstring."""
    servers = list(dict.fromkeys(r["server"] for r in rows if r["server"] != FIO))
    if "shardio" not in servers:
        return {}
    peers = [s for s in servers if not s.startswith("shardio")]  # shardio-threaded is shardio
    sat = {s: saturation(rows, s) for s in servers}
    out: dict[str, Any] = {"saturation": sat, "checks": []}
    checks = out["checks"]

    def check(name: str, value: float | str | None, goal: str, met: bool) -> None:
        checks.append({"goal": name, "value": value, "target": goal, "met": met})

    def closed(server: str, scenario: str = "cached") -> dict[str, Any] | None:
        points = _by(rows, server=server, scenario=scenario, mode="closed")
        return points[0] if points else None

    ours, ref = closed("shardio"), closed(REFERENCE_PEER)
    if ours and ref:
        mine, theirs = ours["server_cpu_us_per_read"], ref["server_cpu_us_per_read"]
        if mine and theirs:
            ratio = round(mine / theirs, 2)
            check(f"server CPU per cached read vs {REFERENCE_PEER}", ratio, "<= 1", ratio <= 1)
        ratio = round(ours["throughput"] / ref["throughput"], 2)
        check(f"closed-loop reads/s vs {REFERENCE_PEER}", ratio, ">= 1", ratio >= 1)
        theirs = sat[REFERENCE_PEER]["open"]
        ratio = round(sat["shardio"]["open"] / theirs, 2) if theirs else None
        check(f"highest sustained open-loop rate vs {REFERENCE_PEER}", ratio, ">= 1",
              ratio is not None and ratio >= 1)
    if peers:
        best = max(peers, key=lambda s: (sat[s]["open"], sat[s]["closed"]))
        out["best_peer"] = best
        limit = 0.8 * sat[best]["open"]
        p99 = out["p99_up_to_80_percent_of_the_best_peer"] = []
        for theirs in _by(rows, server=best, scenario="cached", mode="open"):
            rate = theirs["offered"]
            if rate > limit or not theirs["sustained"]:
                continue
            mine = _by(rows, server="shardio", scenario="cached", mode="open", offered=rate)
            bound = 1.2 * theirs["latency_us"]["p99"] + 100
            ours_p99 = mine[0]["latency_us"]["p99"] if mine and mine[0]["sustained"] else None
            p99.append({"offered": rate, "shardio_p99_us": ours_p99,
                        "peer_p99_us": theirs["latency_us"]["p99"], "bound_us": round(bound, 1),
                        "met": ours_p99 is not None and ours_p99 <= bound})
        met = sum(x["met"] for x in p99)
        check(f"p99 <= 1.2x {best}'s + 100 us at every rate up to {limit:.0f}/s "
              f"(80 % of {best}'s highest sustained)", f"{met} of {len(p99)} rates",
              "every rate, at least one", bool(p99) and met == len(p99))
    ceiling = closed(FIO, "uncached")
    uncached = {s: closed(s, "uncached") for s in servers}
    if ceiling and uncached.get("shardio"):
        shares = out["uncached_share_of_ceiling"] = {
            s: round(p["throughput"] / ceiling["throughput"], 3)
            for s, p in uncached.items() if p is not None
        }
        check("uncached closed loop, share of the fio ceiling", shares["shardio"], ">= 0.9",
              shares["shardio"] >= 0.9)
        best_peer = max((shares[s] for s in peers if s in shares), default=0.0)
        check("uncached closed loop vs every peer", round(shares["shardio"] - best_peer, 3),
              ">= 0 (share minus the best peer's)", shares["shardio"] >= best_peer)
    return out


def summary_md(rows: Sequence[dict[str, Any]], g: dict[str, Any], info: dict[str, Any],
               layout: Layout) -> str:
    """A layout's markdown summary: the saturation table, latency at common loads, the goals."""
    servers = list(dict.fromkeys(r["server"] for r in rows if r["server"] != FIO))
    runs = max((r.get("runs", 1) for r in rows), default=1)
    ceiling = _by(rows, server=FIO, scenario="uncached", mode="closed")
    lines = [
        f"### Layout {layout.title}",
        "",
        f"Machine: {info['cpu_model']}, {info['cpus']} CPUs, Linux {info['kernel']}, "
        f"Python {info['python']}; data on {info['fs']} ({info['data_parent']}); "
        f"server CPUs {layout.server_cpus}, client CPUs {layout.client_cpus}; "
        f"load average {info['loadavg_start']} at start, {info['loadavg_end']} at end"
        + (f"; every figure is the median of {runs} runs." if runs > 1 else "."),
        "",
        "| server | cached: closed-loop reads/s | max sustained open-loop reads/s "
        "| p50 / p99 ms at closed loop | server CPU µs/read | uncached: closed-loop reads/s "
        "| uncached p99 ms | uncached, share of the fio ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        c = _by(rows, server=s, scenario="cached", mode="closed")
        u = _by(rows, server=s, scenario="uncached", mode="closed")
        sat = saturation(rows, s)
        cl = c[0]["latency_us"] if c else {}
        ul = u[0]["latency_us"] if u else {}
        share = (f"{u[0]['throughput'] / ceiling[0]['throughput']:.0%}"
                 if u and ceiling and ceiling[0]["throughput"] else "")
        lines.append(
            f"| {s} | {sat['closed']:.0f} | {sat['open']:.0f} | "
            f"{cl.get('p50', 0) / 1e3:.2f} / {cl.get('p99', 0) / 1e3:.2f} | "
            f"{(c[0]['server_cpu_us_per_read'] or 0) if c else 0:.1f} | "
            f"{u[0]['throughput'] if u else 0:.0f} | {ul.get('p99', 0) / 1e3:.2f} | {share} |"
        )
    if ceiling:
        c = ceiling[0]
        lines.append(
            f"| {c['label']} | | | | {c['server_cpu_us_per_read']:.1f} | {c['throughput']:.0f} | "
            f"{c['latency_us'].get('p99', 0) / 1e3:.2f} | 100% |")
    rates = sorted({r["offered"] for r in rows if r["mode"] == "open" and r["scenario"] == "cached"})
    lines += ["", "p99 latency (ms) at each offered load, cached (— : not sustained):", "",
              "| offered reads/s | " + " | ".join(servers) + " |",
              "|---|" + "---|" * len(servers)]
    for rate in rates:
        cells = []
        for s in servers:
            pts = _by(rows, server=s, scenario="cached", mode="open", offered=rate)
            if not pts:
                cells.append("")
            elif not pts[0]["sustained"]:
                cells.append("—")
            else:
                cells.append(f"{pts[0]['latency_us']['p99'] / 1e3:.2f}")
        lines.append(f"| {rate:.0f} | " + " | ".join(cells) + " |")
    for scen in ("uncached",):
        urates = sorted({r["offered"] for r in rows if r["mode"] == "open" and r["scenario"] == scen})
        if not urates:
            continue
        lines += ["", f"p50 / p99 latency (ms), {scen}, open loop:", "",
                  "| offered reads/s | " + " | ".join(servers) + " |",
                  "|---|" + "---|" * len(servers)]
        for rate in urates:
            cells = []
            for s in servers:
                pts = _by(rows, server=s, scenario=scen, mode="open", offered=rate)
                if not pts:
                    cells.append("")
                    continue
                lat = pts[0]["latency_us"]
                mark = "" if pts[0]["sustained"] else " (not sustained)"
                cells.append(f"{lat.get('p50', 0) / 1e3:.2f} / {lat.get('p99', 0) / 1e3:.2f}{mark}")
            lines.append(f"| {rate:.0f} | " + " | ".join(cells) + " |")
    if g:
        lines += ["", "Goals (issue 11; they apply to the fair layout):", ""]
        for c in g["checks"]:
            lines.append(f"- {c['goal']}: {c['value']} (target {c['target']}): "
                         f"**{'met' if c['met'] else 'missed'}**")
        for x in g.get("p99_up_to_80_percent_of_the_best_peer", []):
            ours = ("not sustained" if x["shardio_p99_us"] is None
                    else f"{x['shardio_p99_us'] / 1e3:.2f} ms")
            lines.append(f"  - {x['offered']:.0f}/s: shardio p99 {ours}, {g['best_peer']} "
                         f"{x['peer_p99_us'] / 1e3:.2f} ms, bound {x['bound_us'] / 1e3:.2f} ms: "
                         f"{'met' if x['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def machine_info(args: argparse.Namespace, data_parent: str,
                 chosen: Sequence[Layout]) -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fs": fs_type(data_parent),
        "data_parent": data_parent,
        "layouts": {
            lay.key: {"server_cpus": lay.server_cpus, "client_cpus": lay.client_cpus,
                      "shardio_shards": lay.shards}
            for lay in chosen
        },
        "objects": args.objects,
        "seconds_per_point": args.seconds,
        "warmup": args.warmup,
        "connections": args.connections,
        "concurrency": args.concurrency,
        "command": " ".join(["python", *sys.argv]),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def wait_for_quiet(limit: float, wait: float) -> float:
    """Wait (at most ``wait`` s) for the 1-minute load average to drop below ``limit``."""
    deadline = time.monotonic() + wait
    load = os.getloadavg()[0]
    while load >= limit and time.monotonic() < deadline:
        print(f"load average {load:.2f} >= {limit}: waiting for a quieter machine", flush=True)
        time.sleep(15)
        load = os.getloadavg()[0]
    return load


def main(argv: list[str] | None = None) -> int:
    ncpu = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default=",".join(SERVERS), help=f"any of {','.join(SERVERS)}")
    p.add_argument("--layouts", default="fair,default",
                   help="CPU layouts to run, in order: fair (servers on CPU 0, load generator "
                   "on CPU 1) and/or default (--server-cpus / --client-cpus)")
    p.add_argument("--out", default=os.path.join(HERE, "latency-results"))
    p.add_argument("--data-parent", default="/var/tmp",
                   help="where the data directory is made (a real disk for the uncached runs)")
    p.add_argument("--objects", type=int, default=20000, help="working set, 4 KiB objects")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32, help="closed loop: reads in flight")
    p.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)))
    p.add_argument("--uncached-rates", default=",".join(map(str, DEFAULT_UNCACHED_RATES)))
    p.add_argument("--no-uncached", dest="uncached", action="store_false")
    p.add_argument("--server-cpus", default=f"0-{ncpu - 1}", help="the default layout's")
    p.add_argument("--client-cpus", default=str(ncpu - 1), help="the default layout's")
    p.add_argument("--client-nice", type=int, default=-10,
                   help="nice increment of the load generator (negative: it preempts the "
                   "server on its CPU, so its timer fires on time; needs root)")
    p.add_argument("--quiet-load", type=float, default=1.5,
                   help="wait for the load average to drop below this before starting")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="seconds to wait at most for that (default: do not wait)")
    p.add_argument("--runs", type=int, default=1,
                   help="measure every server this many times (interleaved) and report the "
                   "median run of each point (issue 11 asks for 5)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2000 objects, 1 s points, few rates")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, not {args.runs}")
    if args.quick:
        args.objects, args.seconds, args.warmup = 2000, 1.0, 0.3
        args.rates, args.uncached_rates = "1000,4000,8000", "1000"
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.uncached_rates = [float(r) for r in args.uncached_rates.split(",") if r]
    keys = [k for k in args.servers.split(",") if k]
    for k in keys:
        if k not in SERVERS:
            raise SystemExit(f"unknown server {k!r}; choose from {', '.join(SERVERS)}")
    known = layouts(args)
    chosen = []
    for k in (k for k in args.layouts.split(",") if k):
        if k not in known:
            why = " (it needs CPUs 0 and 1)" if k == "fair" else ""
            raise SystemExit(f"layout {k!r} cannot run here{why}; choose from {', '.join(known)}")
        chosen.append(known[k])
    os.makedirs(args.out, exist_ok=True)
    if args.quiet_wait:
        wait_for_quiet(args.quiet_load, args.quiet_wait)
    kind = fs_type(args.data_parent)
    if args.uncached and kind in ("tmpfs", "ramfs"):
        print(f"{args.data_parent} is on {kind}: no uncached runs (use --data-parent on a real "
              "disk)", file=sys.stderr)
        args.uncached = False
    info = machine_info(args, args.data_parent, chosen)
    started = time.monotonic()
    by_layout: dict[str, list[dict[str, Any]]] = {}
    for layout in chosen:
        out_dir = os.path.join(args.out, layout.key)
        os.makedirs(out_dir, exist_ok=True)
        os.sched_setaffinity(0, _cpuset(layout.client_cpus))  # this runner and its evictor
        data_dir = tempfile.mkdtemp(prefix=f"shardio-latency-{layout.key}-", dir=args.data_parent)
        print(f"layout {layout.title}; data {data_dir} ({kind}); load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        rows: list[dict[str, Any]] = []
        try:
            t0 = time.monotonic()
            make_data(data_dir, args, layout, out_dir)
            print(f"loaded {args.objects} objects of 4 KiB for {layout.shards} shard(s) in "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
            if args.uncached:
                ceiling = fio_ceiling(data_dir, args, layout)
                if ceiling is not None:
                    rows.append(ceiling)
                    _show(FIO, "uncached", ceiling)
            for run in range(args.runs):
                if args.runs > 1:
                    print(f"run {run + 1} of {args.runs}", flush=True)
                for key in keys:
                    rows += bench_server(SERVERS[key], data_dir, args, layout, out_dir, run)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        by_layout[layout.key] = rows
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    info["wall_seconds"] = round(time.monotonic() - started, 1)
    texts = []
    all_goals = {}
    for layout in chosen:
        raw = by_layout[layout.key]
        rows = median_points(raw, args.runs)
        out_dir = os.path.join(args.out, layout.key)
        g = all_goals[layout.key] = goals(rows)
        with open(os.path.join(out_dir, "points.json"), "w") as f:  # the medians: what plot.py draws
            json.dump(rows, f, indent=1)
        if args.runs > 1:
            with open(os.path.join(out_dir, "points-every-run.json"), "w") as f:
                json.dump(raw, f, indent=1)
        write_csv(os.path.join(out_dir, "points.csv"), raw)
        with open(os.path.join(out_dir, "run.json"), "w") as f:  # what bench/plot.py reads
            layout_info = dict(info, server_cpus=layout.server_cpus,
                               client_cpus=layout.client_cpus, layout=layout.key)
            json.dump({"machine": layout_info, "goals": g}, f, indent=1)
        text = summary_md(rows, g, info, layout)
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(text)
        texts.append(text)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"machine": info, "goals": all_goals}, f, indent=1)
    text = "\n".join(texts)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"wall time {info['wall_seconds']:.0f} s; results in {args.out}")
    if args.plots:
        for layout in chosen:
            subprocess.run([_PY, os.path.join(HERE, "plot.py"), os.path.join(args.out, layout.key)],
                           check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
