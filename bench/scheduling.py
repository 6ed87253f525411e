"""Client latency and background progress on one OSD shard, against the share ratio.

    python bench/scheduling.py [--objects 2000] [--seconds 3] [--rounds 3] [--concurrency 16]
                               [--stacks 16] [--plot bench/scheduling-results/scheduling.png]

One OSD shard (a process) serves a closed loop of 4 KiB reads (``--concurrency``
workers, from this process) while a background job runs on the shard: ``--stacks``
(16) tame stacks, each writing 16 KiB blocks to a file of its own through the tame Env
(io_uring) and, after each write, reading back and hashing (sha256) the last four
blocks, without end; its progress is the bytes hashed. The job runs
in the OSD's "background" scheduling group, with the client requests in the shard's
default group, at several share ratios (foreground:background), and once on plain
tame stacks outside any group (what the shard did before scheduling groups), and
without the job (the reference). Each round runs every configuration once, in turn,
for ``--seconds``; the table gives each configuration's median over ``--rounds``
rounds (so a burst of load from other processes on a shared machine hits one round).

Printed per configuration: client p50/p99 and throughput, p99 against the reference,
the shard thread's CPU time per wall second ("shard CPU"), the background job's
share of that CPU time (the scheduler's runtime of the group against the shard
thread's CPU clock) and its progress in MiB/s. A share can exceed the group's
nominal one when the client load leaves the shard idle part of the time. Targets
(issue 15): 1000:100 gives p99 ≤ 1.5× the reference with the background ≥ 5 % of
the shard's time; 100:100 splits the time about evenly. The plot (matplotlib, the
bench extra) shows p99 and background progress against the share ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from shardio import tame
from shardio.osd.client import AsyncClient
from shardio.osd.loadgen import BenchResult, closed_loop, load, object_names
from shardio.osd.server import OSDServer, node
from shardio.reactor import require_reactor
from shardio.scheduling import set_default_shares, stats

BLOCK = 16384
READS_PER_WRITE = 4
FILE_BYTES = 8 << 20
READ = 4096
#: (foreground shares, background shares); None: the job on plain tame stacks.
CONFIGURATIONS: list[tuple[float, float] | None] = [
    (1000, 50),
    (1000, 100),
    (1000, 250),
    (1000, 500),
    (100, 100),
    None,
]

# -- on the shard ----------------------------------------------------------------
_job: dict[str, Any] = {"stop": True, "bytes": 0, "tasks": []}


def _hog(path: str, job: dict[str, Any]) -> None:
    """On a tame stack, until told to stop: write a 16 KiB block (io_uring), then read
    back and hash the last ``READS_PER_WRITE`` blocks written (each read a tamed call,
    so the stack can be preempted between two hashes)."""
    env = tame.env()
    block = os.urandom(BLOCK)
    offset = 0
    with env.open(path, "w+b") as f:
        while not job["stop"]:
            f.pwrite(block, offset % FILE_BYTES)
            for back in range(READS_PER_WRITE):
                at = max(0, offset - back * BLOCK) % FILE_BYTES
                hashlib.sha256(f.pread(BLOCK, at)).digest()
                job["bytes"] += BLOCK
            offset += BLOCK


async def start_job(directory: str, stacks: int, grouped: bool) -> None:
    _job.update(stop=False, bytes=0)
    background = node().background
    for i in range(stacks):
        path = os.path.join(directory, f"background-{i}")
        call = background.call(_hog, path, _job) if grouped else tame.call(_hog, path, _job)
        _job["tasks"].append(asyncio.ensure_future(call))


async def stop_job() -> int:
    _job["stop"] = True
    tasks, _job["tasks"] = _job["tasks"], []
    await asyncio.gather(*tasks)
    return int(_job["bytes"])


def set_shares(foreground: float, background: float) -> None:
    set_default_shares(foreground)
    node().background.set_shares(background)


def cpu_figures() -> dict[str, float]:
    """The shard thread's CPU time and the background group's runtime, in seconds."""
    runtime = {s["group"]: s["runtime_ms"] / 1e3 for s in stats()}
    return {
        "cpu": require_reactor().stats.cpu_seconds,
        "background": runtime.get("background", 0.0),
    }


# -- in the bench process ----------------------------------------------------------
async def _on_shard(osd: OSDServer, func: Any, *args: Any) -> Any:
    assert osd.group is not None
    return await asyncio.wrap_future(osd.group.submit(0, func, *args))


async def run_one(
    osd: OSDServer,
    client: AsyncClient,
    names: list[bytes],
    args: argparse.Namespace,
    config: tuple[float, float] | None | str,
    scratch: str,
) -> dict[str, Any]:
    label = (
        "no background"
        if config == "none"
        else "plain tame stacks"
        if config is None
        else f"{config[0]:g}:{config[1]:g}"
    )
    job = config != "none"
    if isinstance(config, tuple):
        await _on_shard(osd, set_shares, *config)
    before = await _on_shard(osd, cpu_figures)
    if job:
        await _on_shard(osd, start_job, scratch, args.stacks, config is not None)
    t0 = time.perf_counter()
    result: BenchResult = await closed_loop(
        client, names, seconds=args.seconds, concurrency=args.concurrency, length=READ, label=label
    )
    wall = time.perf_counter() - t0
    after = await _on_shard(osd, cpu_figures)
    done = await _on_shard(osd, stop_job) if job else 0
    cpu = after["cpu"] - before["cpu"]
    # Outside any group the job's CPU is not accounted on its own.
    background_cpu = float("nan") if config is None else after["background"] - before["background"]
    p = result.percentiles()
    return {
        "label": label,
        "config": config,
        "p50_ms": p[0.5] * 1e3,
        "p99_ms": p[0.99] * 1e3,
        "reads_per_s": result.throughput,
        "errors": result.errors,
        "shard_cpu_s": cpu,
        "shard_busy": cpu / wall,
        "background_share": background_cpu / cpu if cpu else float("nan"),
        "background_mib_s": done / wall / 2**20,
    }


async def bench(osd: OSDServer, args: argparse.Namespace, scratch: str) -> list[dict[str, Any]]:
    assert osd.address is not None
    names = object_names(args.objects)
    rows: list[dict[str, Any]] = []
    async with await AsyncClient.connect(*osd.address, timeout=60) as client:
        await load(client, names, READ)
        await closed_loop(client, names, seconds=1.0, concurrency=args.concurrency)  # warm up
        for _ in range(args.rounds):
            for config in ["none", *CONFIGURATIONS]:
                rows.append(await run_one(osd, client, names, args, config, scratch))
    return _medians(rows)


def _medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: the median of each figure over the rounds."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(
            row["label"], {"label": row["label"], "config": row["config"], "runs": []}
        )["runs"].append(row)
    for entry in merged.values():
        for key in (
            "p50_ms",
            "p99_ms",
            "reads_per_s",
            "shard_cpu_s",
            "shard_busy",
            "background_share",
            "background_mib_s",
            "errors",
        ):
            entry[key] = statistics.median(r[key] for r in entry["runs"])
        entry["p99_range"] = (
            min(r["p99_ms"] for r in entry["runs"]),
            max(r["p99_ms"] for r in entry["runs"]),
        )
    return list(merged.values())


def print_table(rows: list[dict[str, Any]]) -> float:
    reference = next(r["p99_ms"] for r in rows if r["config"] == "none")
    print(
        f"{'fg:bg shares':<18} {'p50 ms':>7} {'p99 ms':>7} {'p99 range':>13} {'p99/ref':>8} "
        f"{'reads/s':>8} {'shard CPU':>9} {'bg share':>9} {'bg MiB/s':>9}"
    )
    for r in rows:
        share = (
            ""
            if r["background_share"] != r["background_share"]
            else (f"{r['background_share']:.1%}")
        )
        mib = f"{r['background_mib_s']:.1f}" if r["config"] != "none" else ""
        low, high = r["p99_range"]
        print(
            f"{r['label']:<18} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
            f"{low:6.2f}-{high:<6.2f} {r['p99_ms'] / reference:7.2f}x {r['reads_per_s']:8.0f} "
            f"{r['shard_busy']:9.0%} {share:>9} {mib:>9}"
        )
    print(
        f"\nmedians of {len(rows[0]['runs'])} rounds; reference p99 (no background): "
        f"{reference:.2f} ms"
    )
    return reference


def plot(rows: list[dict[str, Any]], reference: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = [r for r in rows if isinstance(r["config"], tuple)]
    grouped.sort(key=lambda r: r["config"][1] / r["config"][0])
    ratio = [r["config"][1] / r["config"][0] for r in grouped]
    fig, left = plt.subplots(figsize=(7, 4.2))
    left.plot(
        ratio, [r["p99_ms"] for r in grouped], "o-", color="tab:blue", label="client p99 (ms)"
    )
    left.axhline(reference, color="tab:blue", linestyle=":", label="p99, no background")
    left.axhline(
        1.5 * reference, color="tab:red", linestyle="--", linewidth=0.8, label="1.5 × that"
    )
    plain = [r for r in rows if r["config"] is None]
    if plain:
        left.axhline(
            plain[0]["p99_ms"],
            color="tab:gray",
            linestyle="-.",
            label="p99, job on plain tame stacks",
        )
    left.set_xscale("log")
    left.set_xlabel("background shares / foreground shares")
    left.set_ylabel("client p99 (ms)")
    right = left.twinx()
    right.plot(
        ratio,
        [100 * r["background_share"] for r in grouped],
        "s-",
        color="tab:green",
        label="background share of the shard's CPU (%)",
    )
    right.set_ylabel("background share of the shard's CPU (%)")
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    left.set_title("One OSD shard: closed-loop 4 KiB reads vs a background job")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every configuration")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop workers")
    p.add_argument("--stacks", type=int, default=16, help="background tame stacks")
    p.add_argument(
        "--plot",
        default=os.path.join(os.path.dirname(__file__), "scheduling-results", "scheduling.png"),
    )
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="shardio-scheduling-bench-")
    load_before = os.getloadavg()
    try:
        with OSDServer(
            os.path.join(data, "osd"),
            shards=1,
            sync=False,
            compaction_interval=None,
            log_level=logging.ERROR,
        ) as osd:
            rows = asyncio.run(bench(osd, args, data))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"1 OSD shard, {args.objects} objects of {READ} B, closed loop of {args.concurrency}; "
        f"background: {args.stacks} stacks writing, reading and hashing {BLOCK // 1024} KiB "
        f"blocks; {args.seconds:g} s per run, {args.rounds} rounds; {os.cpu_count()} CPUs; "
        f"load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (a shared machine)\n"
    )
    reference = print_table(rows)
    if args.plot:
        plot(rows, reference, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
