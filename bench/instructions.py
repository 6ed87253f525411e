"""Instructions per cached read, shardio against its peers: the fair-layout A/B that
does not depend on how busy the machine is.

    python bench/instructions.py [--seconds 10] [--servers shardio,gevent,threaded]
                                 [--batch 16] [--functions 30]

Each server runs under ``valgrind --tool=callgrind`` (which counts the user-space
instructions a process executes, the same count for the same work whatever else the
machine does) while ``python -m shardio.osd bench`` drives it at full speed (closed
loop, 32 in flight, not under valgrind). The serving process's counters are dumped
just before and just after the load; the second dump divided by the reads is the
figure. The table splits it into zlib's ``crc32`` (the store's block and header
checksums and the reply's payload CRC: the same code in every server) and the rest
(the server's own code, the interpreter, the event loop), and gives both ratios to
the first peer.

What it does not count: system calls (the kernel's side of recv/send/pread, the same
work for every server here; ``bench/fair_cpu.py`` reports user and system time).
Valgrind runs the server about 50x slower, so shardio's two clock-driven knobs are
scaled to match: the tame quota to 25 ms (0.5 ms at full speed) and the stall
detector off (it would report every 25 ms of valgrind time). The data set is the
one ``bench/fair_cpu.py`` loads (it makes it when missing).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import fair_cpu

from shardio.osd.loadgen import object_names
from shardio.osd.protocol import FrameDecoder, Op, Status, encode_request

ROOT = fair_cpu.ROOT


def _self_costs(path: str) -> dict[str, int]:
    """Instructions per function (self cost) of one callgrind dump."""
    names: dict[str, str] = {}
    costs: dict[str, int] = {}
    function = None
    after_calls = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                assert m is not None
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                function = names.get(m.group(1), m.group(1))
            elif line.startswith("cfn="):
                m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
            elif line.startswith("calls="):
                after_calls = True  # the next cost line is the call's inclusive cost
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_calls:
                    after_calls = False
                    continue
                fields = line.split()
                if len(fields) >= 2 and function is not None:
                    costs[function] = costs.get(function, 0) + int(fields[1])
    return costs


def lock_step(port: int, seconds: float, batch: int) -> float:
    """Reads/s of a deterministic load: one connection sends ``batch`` READs in one write
    and waits for every reply before the next batch, so that every server sees passes
    of exactly ``batch`` requests (the closed loop's pass sizes follow the server's
    speed, and the per-pass costs then move a per-read count by a few per cent)."""
    names = object_names(5000)
    decoder = FrameDecoder()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reads = 0
    tid = 0
    end = time.monotonic() + seconds
    with sock:
        while time.monotonic() < end:
            frames = []
            for _ in range(batch):
                tid += 1
                frames.append(encode_request(Op.READ, tid, names[tid % 5000], length=4096))
            sock.sendall(b"".join(frames))
            got = 0
            while got < batch:
                data = sock.recv(1 << 20)
                if not data:
                    raise SystemExit("the server closed the connection")
                for reply in decoder.feed(data):
                    if reply.status != Status.OK or len(reply.payload) != 4096:
                        raise SystemExit(f"a bad reply: {reply}")
                    got += 1
            reads += batch
    return reads / seconds


def measure(
    name: str, data: str, seconds: float, port: int, out_dir: str, batch: int = 0
) -> dict[str, float]:
    out_file = os.path.join(out_dir, f"{name}.%p")
    launcher = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--trace-children=yes",
         f"--callgrind-out-file={out_file}",
         *fair_cpu.server_argv(name, data, port, slowed=True)],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    fair_cpu.wait_until_serving(name, launcher)
    time.sleep(2)
    pid = fair_cpu.serving_pid(name, launcher)
    dump = ["callgrind_control", "--dump", str(pid)]
    subprocess.run(dump, check=True, capture_output=True)
    if batch:
        reads = lock_step(port, seconds, batch) * seconds
    else:
        reads = fair_cpu.closed_loop(name, port, seconds) * seconds
    subprocess.run(dump, check=True, capture_output=True)
    fair_cpu.stop(launcher, timeout=120)
    costs = _self_costs(os.path.join(out_dir, f"{name}.{pid}.2"))
    total = sum(costs.values())
    crc = sum(v for k, v in costs.items() if k.startswith("crc32"))
    per_read = {function: cost / reads for function, cost in costs.items()}
    return {"reads": reads, "total": total / reads, "crc32": crc / reads, "functions": per_read}


def print_functions(rows: list[tuple[str, dict]], base_name: str, top: int) -> None:
    """The ``top`` functions whose self cost per read differs most from the peer's."""
    base = dict(rows)[base_name]["functions"]
    for name, r in rows:
        if name == base_name:
            continue
        mine = r["functions"]
        names = sorted(
            set(mine) | set(base), key=lambda f: -abs(mine.get(f, 0.0) - base.get(f, 0.0))
        )
        print(f"\n| function (self cost) | {name} per read | {base_name} per read | difference |")
        print("|---|---|---|---|")
        for function in names[:top]:
            a, b = mine.get(function, 0.0), base.get(function, 0.0)
            print(f"| `{function}` | {a:,.0f} | {b:,.0f} | {a - b:+,.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--servers", default="shardio,gevent,threaded")
    p.add_argument("--data", default="/var/tmp/shardio-fair-cpu")
    p.add_argument(
        "--batch", type=int, default=0, metavar="K",
        help="drive the server in lock step, K reads per write on one connection "
        "(the same passes for every server), instead of the closed loop",
    )  # fmt: skip
    p.add_argument(
        "--functions", type=int, default=0, metavar="N",
        help="also print the N functions whose instructions per read differ most from the peer's",
    )  # fmt: skip
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install -y valgrind)")
    fair_cpu.load_once(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardio-callgrind-") as out_dir:
        for index, name in enumerate(args.servers.split(",")):
            port = 17970 + index
            rows.append((name, measure(name, args.data, args.seconds, port, out_dir, args.batch)))
            for path in glob.glob(os.path.join(out_dir, "*")):
                os.unlink(path)
    base_name, base = ([(n, r) for n, r in rows if n != "shardio"] or rows)[0]
    print("| server | reads | instructions per read | crc32 | the rest | total vs "
          f"{base_name} | the rest vs it |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        rest, base_rest = r["total"] - r["crc32"], base["total"] - base["crc32"]
        print(f"| {name} | {r['reads']:,.0f} | {r['total']:,.0f} | {r['crc32']:,.0f} | "
              f"{rest:,.0f} | {r['total'] / base['total']:.2f}x | {rest / base_rest:.2f}x |")
    if args.functions:
        print_functions(rows, base_name, args.functions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
