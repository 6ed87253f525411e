"""Server CPU per cached read in the fair layout, quickly: the server confined to CPU 0,
the load generator (``python -m shardio.osd bench``, 32 in flight) on CPU 1.

    python bench/fair_cpu.py [--seconds 5] [--servers shardio,gevent,threaded,shardio-threaded]

Loads a 1-shard OSD data set once (5,000 objects of 4 KiB under /var/tmp), then for
each server: start it on CPU 0, run the closed loop, and print reads/s and the
server's user + system CPU (its whole process tree, from /proc) per read. The
full suite (``bench/latency.py``) measures far more; this is the quick A/B.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

from process_cpu import tree_cpu_split

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
PEERS = {
    "gevent": "gevent_server.py",
    "threaded": "threaded_server.py",
    "shardio-threaded": "shardio_threaded.py",
}


#: shardio's clock-driven knobs scaled to a server slowed 20-50x (valgrind, tracing)
SLOWED = ("--tame-quota-ms", "25", "--stall-threshold-ms", "0")


def server_argv(name: str, data: str, port: int, *, slowed: bool = False) -> list[str]:
    """The command that serves ``data`` on ``port``: shardio with 1 shard, or a peer."""
    if name == "shardio":
        return [PY, "-m", "shardio.osd", "serve", "--shards", "1", "--data", data,
                "--port", str(port), "--idle-poll-us", "0",
                *(SLOWED if slowed else ())]  # fmt: skip
    return [PY, os.path.join(HERE, "peers", PEERS[name]), "--data", data, "--port", str(port)]


def wait_until_serving(name: str, proc: subprocess.Popen[str]) -> None:
    """Read the server's output until it says it listens."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line or "serving" in line:
            return
    raise SystemExit(f"{name} did not start")


def start(name: str, data: str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["taskset", "-c", "0", *server_argv(name, data, port)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    wait_until_serving(name, proc)
    return proc


def serving_pid(name: str, launcher: subprocess.Popen[str]) -> int:
    """The process that serves: the shard (shardio, 1 shard) or the peer itself."""
    if name != "shardio":
        return launcher.pid
    # (under valgrind --trace-children=yes the shard keeps its pid through the exec)
    out = subprocess.run(["pgrep", "-f", "multiprocessing.spawn import spawn_main"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    for pid in map(int, out):
        if _is_descendant(pid, launcher.pid):
            return pid
    raise SystemExit("shardio: no shard process found below the server")


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def closed_loop(name: str, port: int, seconds: float) -> float:
    """Reads/s of the load generator on CPU 1: closed loop, 32 in flight, ``seconds``."""
    out = subprocess.run(
        ["taskset", "-c", "1", PY, "-m", "shardio.osd", "bench", "--addr",
         f"127.0.0.1:{port}", "--objects", "5000", "--seconds", str(seconds),
         "--concurrency", "32"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout  # fmt: skip
    m = re.search(r"closed loop \(32\)\s+(\d+)", out)
    if not m:
        raise SystemExit(f"{name}: the load generator printed no result:\n{out}")
    return float(m.group(1))


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def load_once(data: str) -> None:
    """The data set: 5,000 objects of 4 KiB on one shard, loaded unless already there."""
    if not os.path.exists(os.path.join(data, "osd.json")):
        proc = start("shardio", data, 17950)
        subprocess.run([PY, "-m", "shardio.osd", "load", "--addr", "127.0.0.1:17950",
                        "--objects", "5000", "--size", "4096"], cwd=ROOT, check=True)  # fmt: skip
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--servers", default="shardio,gevent")
    p.add_argument("--data", default="/var/tmp/shardio-fair-cpu")
    args = p.parse_args(argv)
    load_once(args.data)
    for name in args.servers.split(","):
        port = 17951
        proc = start(name, args.data, port)
        time.sleep(1)
        user0, system0 = tree_cpu_split(proc.pid)
        rate = closed_loop(name, port, args.seconds)
        user1, system1 = tree_cpu_split(proc.pid)
        user, system = user1 - user0, system1 - system0
        reads = rate * args.seconds
        print(f"{name:17s} {rate:>9,.0f} reads/s  server CPU "
              f"{1e6 * (user + system) / reads:6.1f} us/read "
              f"(user {1e6 * user / reads:5.1f}, system {1e6 * system / reads:5.1f})",
              flush=True)  # fmt: skip
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
