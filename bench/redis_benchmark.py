"""redis-benchmark against redis-server, a single-process asyncio RESP server, and the
shardio example (examples/redis_kv) with 1 and 2 shards, in one run.

    python bench/redis_benchmark.py [--requests 200000] [--clients 50] [--rounds 1]
        [--base /tmp/main-tree]

For every server: ``redis-benchmark -t set,get -c CLIENTS -n REQUESTS`` at
``-P 1`` and ``-P 16``; for shardio also with ``--cluster`` against the shard
ports (each command straight to its owning shard). Prints requests per
second, the server's CPU per request (its processes' user + system time from
/proc) and the ratios the issue asks for: shardio / asyncio peer and
shardio / redis-server. Everything shares this machine's CPUs with the
load generator: read ratios, not absolute figures. ``--rounds N`` runs every
server N times, in turn, and reports medians; ``--base TREE`` adds the shardio
rows again from another source tree (main's, for an A/B in the same run).

redis-benchmark 7.0 refuses ``--cluster`` against a cluster of one node
("Invalid cluster: 1 node(s)", whatever the server: its own check), so the
1-shard row has no cluster mode; the script prints redis-benchmark's own
error whenever it reports no rate.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from process_cpu import tree_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> list[int]:
    """``count`` consecutive free ports (one free port's neighbours may be taken)."""
    while True:
        base = free_port()
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def start(key: str, base: str | None) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    """Start a server; (process, plain port, cluster ports). ``main:shardio-N`` runs
    the shardio rows from the tree ``base``."""
    port = free_port()
    root = ROOT
    if key.startswith("main:"):
        assert base is not None
        key, root = key.split(":", 1)[1], base
    if key == "redis-server":
        argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
        cluster: list[int] = []
    elif key == "asyncio":
        argv = [_PY, os.path.join(HERE, "peers", "redis_asyncio.py"), "--port", str(port)]
        cluster = []
    else:
        shards = int(key.rsplit("-", 1)[1])
        cluster = free_port_range(shards)  # (shard S listens on base + S)
        # (idle polling off: the shards share their CPUs with redis-benchmark, and a
        # polling shard takes CPU from it -- the OSD latency suite runs the same way)
        argv = [_PY, "-m", "redis_kv", "--shards", str(shards), "--port", str(port),
                "--shard-base-port", str(cluster[0]), "--idle-poll-us", "0"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.path.join(root, 'examples')}")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_port(port)
    for p in cluster:
        wait_port(p)
    return proc, port, cluster


def benchmark(port: int, pipeline: int, args: argparse.Namespace, cluster: bool) -> dict[str, float]:
    argv = ["redis-benchmark", "-p", str(port), "-t", "set,get", "-c", str(args.clients),
            "-n", str(args.requests), "-P", str(pipeline), "-q"]  # fmt: skip
    if cluster:
        argv.append("--cluster")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    rates = {}
    for line in done.stdout.replace("\r", "\n").splitlines():
        m = re.match(r"\s*(SET|GET): ([\d.]+) requests per second", line)
        if m:
            rates[m.group(1)] = float(m.group(2))
    if not rates:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        print(f"  redis-benchmark reported no rate: {said[0]}", file=sys.stderr)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--servers", default="redis-server,asyncio,shardio-1,shardio-2")
    p.add_argument("--rounds", type=int, default=1, help="every server this many times, in turn")
    p.add_argument("--base", default=None, help="a source tree whose shardio rows run too")
    args = p.parse_args(argv)
    servers = args.servers.split(",")
    if args.base:
        servers += [f"main:{k}" for k in servers if k.startswith("shardio-")]
    if shutil.which("redis-benchmark") is None:
        raise SystemExit("redis-benchmark is not installed (Debian package redis-tools)")
    rows: list[dict[str, Any]] = []
    for key in [k for _ in range(args.rounds) for k in servers]:
        if key == "redis-server" and shutil.which("redis-server") is None:
            print("skipping redis-server: not installed", file=sys.stderr)
            continue
        proc, port, cluster = start(key, args.base)
        try:
            for pipeline in (1, 16):
                # (redis-benchmark refuses a one-node cluster: see the module docstring)
                with_cluster = len(cluster) > 1
                modes = [("plain", port, False)]
                if with_cluster:
                    modes.append(("cluster", cluster[0], True))
                for mode, target, is_cluster in modes:
                    cpu0 = tree_cpu(proc.pid)
                    rates = benchmark(target, pipeline, args, is_cluster)
                    cpu = tree_cpu(proc.pid) - cpu0
                    done = 2 * args.requests
                    rows.append({"server": key, "mode": mode, "pipeline": pipeline, **rates,
                                 "cpu_us": 1e6 * cpu / done})  # fmt: skip
                    print(f"{key:18s} {mode:8s} -P {pipeline:<3d} SET {rates.get('SET', 0):>10,.0f}/s"
                          f"  GET {rates.get('GET', 0):>10,.0f}/s  server CPU "
                          f"{1e6 * cpu / done:6.1f} us/request", flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def rate(server: str, mode: str, pipeline: int, op: str) -> float:
        """The median over the rounds."""
        values = [float(r.get(op, 0.0)) for r in rows
                  if (r["server"], r["mode"], r["pipeline"]) == (server, mode, pipeline)]  # fmt: skip
        return statistics.median(values) if values else 0.0

    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds:")
        for key in dict.fromkeys(servers):
            for mode in ("plain", "cluster"):
                for pipeline in (1, 16):
                    cpu = [r["cpu_us"] for r in rows
                           if (r["server"], r["mode"], r["pipeline"]) == (key, mode, pipeline)]  # fmt: skip
                    if cpu:
                        print(f"{key:18s} {mode:8s} -P {pipeline:<3d} "
                              f"SET {rate(key, mode, pipeline, 'SET'):>10,.0f}/s  "
                              f"GET {rate(key, mode, pipeline, 'GET'):>10,.0f}/s  server CPU "
                              f"{statistics.median(cpu):6.1f} us/request")  # fmt: skip
    print("\nratios (shardio / peer), per op and pipeline depth:")
    for shards in [k for k in dict.fromkeys(servers) if "shardio-" in k]:
        for mode in ("plain", "cluster"):
            for pipeline in (1, 16):
                for op in ("SET", "GET"):
                    mine = rate(shards, mode, pipeline, op)
                    peer = rate("asyncio", "plain", pipeline, op)
                    redis_rate = rate("redis-server", "plain", pipeline, op)
                    if not mine:
                        continue
                    print(f"  {shards:17s} {mode:7s} -P {pipeline:<2d} {op}: "
                          f"{mine / peer if peer else float('nan'):.2f}x asyncio peer, "
                          f"{mine / redis_rate if redis_rate else float('nan'):.2f}x redis-server")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
