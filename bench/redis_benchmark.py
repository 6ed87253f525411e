"""redis-benchmark against redis-server, a single-process asyncio RESP server, and the
shardio example (examples/redis_kv) with 1 and 2 shards, in one run.

    python bench/redis_benchmark.py [--requests 200000] [--clients 50]

For every server: ``redis-benchmark -t set,get -c CLIENTS -n REQUESTS`` at
``-P 1`` and ``-P 16``; for shardio also with ``--cluster`` against the shard
ports (each command straight to its owning shard). Prints requests per
second, the server's CPU per request (its processes' user + system time from
/proc) and the ratios the issue asks for: shardio / asyncio peer and
shardio / redis-server. Everything shares this machine's CPUs with the
load generator: read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
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


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def start(key: str) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    """Start a server; (process, plain port, cluster ports)."""
    port = free_port()
    if key == "redis-server":
        argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
        cluster: list[int] = []
    elif key == "asyncio":
        argv = [_PY, os.path.join(HERE, "peers", "redis_asyncio.py"), "--port", str(port)]
        cluster = []
    else:
        shards = int(key.rsplit("-", 1)[1])
        cluster = [free_port() for _ in range(shards)]
        # (idle polling off: the shards share their CPUs with redis-benchmark, and a
        # polling shard takes CPU from it -- the OSD latency suite runs the same way)
        argv = [_PY, "-m", "redis_kv", "--shards", str(shards), "--port", str(port),
                "--shard-base-port", str(cluster[0]), "--idle-poll-us", "0"]  # fmt: skip
        cluster = list(range(cluster[0], cluster[0] + shards))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "examples"))
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
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    rates = {}
    for line in out.replace("\r", "\n").splitlines():
        m = re.match(r"\s*(SET|GET): ([\d.]+) requests per second", line)
        if m:
            rates[m.group(1)] = float(m.group(2))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--servers", default="redis-server,asyncio,shardio-1,shardio-2")
    args = p.parse_args(argv)
    if shutil.which("redis-benchmark") is None:
        raise SystemExit("redis-benchmark is not installed (Debian package redis-tools)")
    rows: list[dict[str, Any]] = []
    for key in args.servers.split(","):
        if key == "redis-server" and shutil.which("redis-server") is None:
            print("skipping redis-server: not installed", file=sys.stderr)
            continue
        proc, port, cluster = start(key)
        try:
            for pipeline in (1, 16):
                modes = [("plain", port, False)] + ([("cluster", cluster[0], True)] if cluster else [])
                for mode, target, is_cluster in modes:
                    cpu0 = tree_cpu(proc.pid)
                    rates = benchmark(target, pipeline, args, is_cluster)
                    cpu = tree_cpu(proc.pid) - cpu0
                    done = 2 * args.requests
                    rows.append({"server": key, "mode": mode, "pipeline": pipeline, **rates,
                                 "cpu_us": 1e6 * cpu / done})  # fmt: skip
                    print(f"{key:13s} {mode:8s} -P {pipeline:<3d} SET {rates.get('SET', 0):>10,.0f}/s"
                          f"  GET {rates.get('GET', 0):>10,.0f}/s  server CPU "
                          f"{1e6 * cpu / done:6.1f} us/request", flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def rate(server: str, mode: str, pipeline: int, op: str) -> float:
        for r in rows:
            if (r["server"], r["mode"], r["pipeline"]) == (server, mode, pipeline):
                return float(r.get(op, 0.0))
        return 0.0

    print("\nratios (shardio / peer), per op and pipeline depth:")
    for shards in ("shardio-1", "shardio-2"):
        for mode in ("plain", "cluster"):
            for pipeline in (1, 16):
                for op in ("SET", "GET"):
                    mine = rate(shards, mode, pipeline, op)
                    peer = rate("asyncio", "plain", pipeline, op)
                    redis_rate = rate("redis-server", "plain", pipeline, op)
                    if not mine:
                        continue
                    print(f"  {shards} {mode:7s} -P {pipeline:<2d} {op}: "
                          f"{mine / peer if peer else float('nan'):.2f}x asyncio peer, "
                          f"{mine / redis_rate if redis_rate else float('nan'):.2f}x redis-server")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
