"""Bytecode instructions per cached read, by stage and by function: where shardio's
Python costs more than its peers', counted rather than sampled.

    python bench/bytecodes.py [--seconds 5] [--servers shardio,gevent,threaded] [--top 25]

Each server runs on CPU 0 with ``bench/bytecode_counter`` on its PYTHONPATH: a
``sitecustomize`` that traces every bytecode instruction of every Python function
(threads and greenlets) and writes the counts twice a second. The load generator
(``python -m shardio.osd bench``, closed loop, 32 in flight, untraced) runs on CPU 1;
the counts taken just before and just after it, divided by the reads, give the
figures. Tracing slows a server 20-50x, so shardio's tame quota is scaled to 25 ms
and its stall detector is off, as in ``bench/instructions.py``; a pass then carries
more requests than at full speed, which makes per-pass costs look smaller than they
are. Instructions are not equal (a call costs more than a load), so this says *where*
the interpreter works; ``bench/instructions.py`` says how much it costs in all.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import fair_cpu

HERE = fair_cpu.HERE
ROOT = fair_cpu.ROOT

#: (file, function prefix) -> stage; the first match wins, "" matches every function
STAGES: list[tuple[str, str, str]] = [
    ("objectstore.py", "", "store (the same code in every server)"),
    ("operations.py", "apply_op", "store (the same code in every server)"),
    ("files.py", "", "pread"),
    ("uring.py", "", "pread"),
    ("posix_env.py", "", "pread"),
    ("osdmap.py", "", "route"),
    ("protocol.py", "", "decode"),
    ("common.py", "RequestDecoder", "decode"),
    ("common.py", "reply_parts", "encode and stats"),
    ("stats.py", "", "encode and stats"),
    ("messenger.py", "OSDConnection.run", "run a request: execute, encode, stats"),
    ("connection.py", "TameBatchConnection._drain_lane", "run a request: execute, encode, stats"),
    ("messenger.py", "OSDConnection.serve", "run a request: execute, encode, stats"),
    ("messenger.py", "OSDConnection.end_of_pass", "encode and stats"),
    ("messenger.py", "OSDConnection.charge", "admit: entry, charge, checks, routing"),
    ("messenger.py", "OSDConnection.start", "admit: entry, charge, checks, routing"),
    ("connection.py", "Entry", "admit: entry, charge, checks, routing"),
    ("connection.py", "TameBatchConnection.admit_all", "admit: entry, charge, checks, routing"),
    ("connection.py", "TameBatchConnection._drain_entries", "run a request: execute, encode, stats"),
    ("connection.py", "TameBatchConnection.complete", "run a request: execute, encode, stats"),
    ("messenger.py", "OSDConnection.finish", "run a request: execute, encode, stats"),
    ("server.py", "ShardNode.run_op", "run a request: execute, encode, stats"),
    ("common.py", "execute", "run a request: execute, encode, stats"),
    ("common.py", "answer_inline", "admit: entry, charge, checks, routing"),
    ("common.py", "handle_blocking", "run a request: execute, encode, stats"),
    ("connection.py", "", "per pass: connection (settle, flush, ...)"),
    ("messenger.py", "", "per pass: connection (settle, flush, ...)"),
    ("server.py", "ShardNode", "per pass: connection (settle, flush, ...)"),
    ("stacks.py", "", "per pass: tame stacks"),
    ("reactor.py", "", "per pass: reactor (ring poll, sleep, wake)"),
    ("", "", "per pass: loop, sockets, other"),
]


def stage_of(name: str) -> str:
    file, _, function = name.partition(":")
    for stage_file, prefix, stage in STAGES:
        if (not stage_file or file == stage_file) and function.startswith(prefix):
            return stage
    return STAGES[-1][2]


def measure(name: str, data: str, seconds: float, port: int, out_dir: str) -> dict[str, float]:
    counts = os.path.join(out_dir, name)
    env = dict(os.environ, SHARDIO_BYTECODES=counts, PYTHONPATH=os.pathsep.join(
        [os.path.join(HERE, "bytecode_counter"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    argv = fair_cpu.server_argv(name, data, port, slowed=True)
    server = subprocess.Popen(["taskset", "-c", "0", *argv], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    fair_cpu.wait_until_serving(name, server)
    time.sleep(1.5)
    path = f"{counts}.{fair_cpu.serving_pid(name, server)}"

    def snapshot() -> dict[str, int]:
        time.sleep(0.7)  # the counter writes twice a second
        with open(path, "rb") as f:
            return pickle.load(f)  # type: ignore[no-any-return]

    before = snapshot()
    reads = fair_cpu.closed_loop(name, port, seconds) * seconds
    after = snapshot()
    fair_cpu.stop(server)
    per_read = {k: (v - before.get(k, 0)) / reads for k, v in after.items()}
    return {k: v for k, v in per_read.items() if v > 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--servers", default="shardio,gevent,threaded")
    p.add_argument("--data", default="/var/tmp/shardio-fair-cpu")
    p.add_argument("--top", type=int, default=25, help="functions listed per server")
    args = p.parse_args(argv)
    fair_cpu.load_once(args.data)
    names = args.servers.split(",")
    with tempfile.TemporaryDirectory(prefix="shardio-bytecodes-") as out_dir:
        results = {n: measure(n, args.data, args.seconds, 17985 + i, out_dir)
                   for i, n in enumerate(names)}  # fmt: skip
    stages = list(dict.fromkeys(stage for _, _, stage in STAGES))
    print("| stage (bytecodes per read) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in stages:
        cells = [sum(v for k, v in results[n].items() if stage_of(k) == stage) for n in names]
        print(f"| {stage} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    print("| **total** | " + " | ".join(f"**{sum(results[n].values()):.0f}**" for n in names) + " |")
    for n in names:
        print(f"\n{n}: the {args.top} functions that execute most per read")
        for k, v in sorted(results[n].items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {v:7.1f}  {k}  [{stage_of(k)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
