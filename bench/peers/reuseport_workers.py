"""Peer: N asyncio worker processes sharing one port with SO_REUSEPORT.

The usual way Python servers use several cores: N copies of the
single-process asyncio server (``asyncio_server.py``: the store in
``asyncio.to_thread``), each binding the same port with SO_REUSEPORT so the
kernel spreads *connections* (by a hash of their addresses) over the
workers. Workers are not pinned to CPUs (gunicorn/uvicorn do not pin
either). Every worker opens the same store files; since the store allows a
single writer, the workers refuse writes (EROFS): load the data first.

    python bench/peers/reuseport_workers.py --data DIR [--workers 2] [--loop uvloop]

Prints ``listening on HOST:PORT`` once every worker serves; SIGINT or
SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from common import add_common_args, announce

HERE = os.path.dirname(os.path.abspath(__file__))


class WorkerStartError(Exception):
    """A worker process did not come up."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket holding the port while workers start.

    Not listening, it never gets a connection; it is closed once they serve.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    p.add_argument("--start-timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    reserve = reserve_port(args.host, args.port)
    port = reserve.getsockname()[1]
    cmd = [
        sys.executable, os.path.join(HERE, "asyncio_server.py"), "--data", args.data,
        "--host", args.host, "--port", str(port), "--loop", args.loop, "--reuse-port",
        "--read-only",
    ]
    workers: list[subprocess.Popen[str]] = []
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        for _ in range(args.workers):
            workers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        for w in workers:
            line = w.stdout.readline() if w.stdout else ""  # blocks until it serves (or dies)
            if not line.startswith("listening on "):
                raise WorkerStartError(f"worker {w.pid} did not start (said {line!r})")
        reserve.close()
        announce(args.host, port)
        while not stopping:
            time.sleep(0.2)
            dead = [w for w in workers if w.poll() is not None]
            if dead:
                print(f"worker {dead[0].pid} exited with {dead[0].returncode}; stopping",
                      file=sys.stderr, flush=True)
                return 1
    finally:
        reserve.close()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for w in workers:
            try:
                w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
