"""Tame stacks benchmark: one run, one table.

    python bench/tame.py [--dir DIR] [--size-mb 512] [--seconds 3]

Rows (per-op rows in CPU time of the loop's thread, to_thread in wall-clock time):
  * per-op overhead of a blocking call: a tame stack (TameEnv.sleep(0): park,
    loop iteration, resume) vs ``await asyncio.to_thread(noop)`` vs gevent
    (monkey-patched ``time.sleep(0)`` in a greenlet; run in a subprocess,
    since monkey-patching is global), on asyncio and uvloop;
  * a cached 4 KiB read through TameEnv (``f.pread``) vs ``os.pread``;
  * cold QD32 vs fio: 4 KiB random reads, O_DIRECT, queue depth 32, through
    TameEnv (32 tame stacks, each ``f.pread``) and through fio (io_uring,
    iodepth 32, direct=1) on the same file with the same access pattern
    (every block once per pass in random order, fio's random map), in
    ``--cold-rounds`` alternating runs; the table gives the median of the
    per-round ratios. Also sequential ``os.preadv`` (QD1) and buffered cold
    reads (file evicted with posix_fadvise DONTNEED) through TameEnv at QD32.

  * the quota (issue 10): the max gap seen by a 1 ms heartbeat task while 48
    tame stacks each read a 1 MiB member of a cached zip file through a tamed
    ``zipfile`` and hash it, with the default quota and with preemption off
    (``tame.configure(quota=None)``), plus the scheduler's own accounting
    (longest slice and longest loop turn, thread CPU time);
  * with ``--baseline DIR`` (a source tree of an earlier shardio, e.g.
    ``git archive <commit> shardio | tar -x -C DIR``): the per-op rows and the
    heartbeat gap measured for this tree and DIR in alternating subprocesses
    of one run, with their ratio (before/after a change, same machine state).

Targets (issue 3): tame op >= 20x cheaper than to_thread; cached tame read
<= 3 us. Issue 10: cold QD32 through TameEnv >= 95% of fio; per-op cost not
worse than the baseline; heartbeat gap ~ the quota, not the load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvloop

from shardio import tame
from shardio.tame import stacks

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def noop() -> None:
    return None


# The per-op rows measure the CPU time of the loop's thread: on a shared machine,
# wall-clock time also counts the time other processes held the CPU.
_cpu_clock = time.thread_time


# -- per-op overhead --------------------------------------------------------------


async def tame_blocking_op_us(n: int = 50_000) -> float:
    def work() -> float:
        env = tame.env()
        t0 = _cpu_clock()
        for _ in range(n):
            env.sleep(0)
        return (_cpu_clock() - t0) / n * 1e6

    await tame.call(work)  # warm-up
    return await tame.call(work)


async def tame_call_us(n: int = 50_000) -> float:
    await tame.call(noop)
    t0 = _cpu_clock()
    for _ in range(n):
        await tame.call(noop)
    return (_cpu_clock() - t0) / n * 1e6


async def to_thread_us(n: int = 3_000) -> float:
    await asyncio.to_thread(noop)
    t0 = time.perf_counter()
    for _ in range(n):
        await asyncio.to_thread(noop)
    return (time.perf_counter() - t0) / n * 1e6


GEVENT_SNIPPET = """
from gevent import monkey; monkey.patch_all()
import time, gevent
n = 50000
def work():
    t0 = time.perf_counter()
    for _ in range(n):
        time.sleep(0)
    return (time.perf_counter() - t0) / n * 1e6
g = gevent.spawn(work); g.join(); print(g.value)
"""


def gevent_us() -> float | None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", GEVENT_SNIPPET],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return float(out.stdout.strip().splitlines()[-1])


# -- cached read --------------------------------------------------------------------


def os_pread_us(path: str, n: int = 200_000) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        t0 = _cpu_clock()
        for i in range(n):
            os.pread(fd, 4096, (i & 255) * 4096)
        return (_cpu_clock() - t0) / n * 1e6
    finally:
        os.close(fd)


async def tame_cached_read_us(path: str, n: int = 200_000) -> float:
    def work() -> float:
        with tame.env().open(path, "rb") as f:
            for i in range(256):
                f.pread(4096, i * 4096)
            t0 = _cpu_clock()
            for i in range(n):
                f.pread(4096, (i & 255) * 4096)
            return (_cpu_clock() - t0) / n * 1e6

    return await tame.call(work)


# -- uncontended lock -------------------------------------------------------------------


async def tame_lock_us(n: int = 200_000) -> float:
    def work() -> float:
        lock = tame.env().Lock()
        t0 = _cpu_clock()
        for _ in range(n):
            lock.acquire()
            lock.release()
        return (_cpu_clock() - t0) / n * 1e6

    await tame.call(work)
    return await tame.call(work)


# -- heartbeat gap under a tame load -----------------------------------------------------

MEMBER_BYTES = 1 << 20


def make_zip(path: str) -> None:
    data = os.urandom(MEMBER_BYTES)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("blob", data)
    with open(path, "rb") as f:  # written back and in the page cache
        os.fsync(f.fileno())
        f.read()


def read_and_hash(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z, z.open("blob") as member:
        while data := member.read(1 << 16):
            h.update(data)
    return h.hexdigest()


async def heartbeat_gap(
    path: str, quota: Any, stacks_n: int = 48, rounds: int = 3
) -> dict[str, float]:
    """Max gap (ms) of a 1 ms heartbeat task while the zip load runs; the accounting."""
    has_quota = hasattr(tame, "DEFAULT_QUOTA")  # a baseline tree may predate the quota
    if has_quota:
        tame.configure(quota=quota, account_cpu=True)
    tame.warm_up()
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    with tame.patched(zipfile):
        await asyncio.gather(*(tame.call(read_and_hash, path) for _ in range(2)))
        if has_quota:
            tame.reset_accounting()
        for _ in range(rounds):
            stop = asyncio.Event()

            async def heartbeat(stop: asyncio.Event = stop) -> float:
                worst, last = 0.0, loop.time()
                while not stop.is_set():
                    await asyncio.sleep(0.001)
                    now = loop.time()
                    worst, last = max(worst, now - last), now
                return worst

            beat = loop.create_task(heartbeat())
            await asyncio.sleep(0.005)
            await asyncio.gather(*(tame.call(read_and_hash, path) for _ in range(stacks_n)))
            stop.set()
            gaps.append(await beat)
    st = tame.stats()
    return {
        "gap_ms": max(gaps) * 1e3,
        "gap_median_ms": statistics.median(gaps) * 1e3,
        "longest_slice_ms": st.get("longest_slice_ns", float("nan")) / 1e6,
        "longest_turn_ms": st.get("longest_turn_ns", float("nan")) / 1e6,
    }


# -- child mode: one tree's per-op and gap figures, as JSON ------------------------------


def child(kind: str, path: str, rounds: int) -> None:
    out: dict[str, Any] = {}
    for name, runner in LOOPS.items():
        if kind == "per-op":

            async def per_op() -> dict[str, float]:
                samples: dict[str, list[float]] = {"op": [], "call": [], "read": [], "lock": []}
                for _ in range(rounds):
                    samples["op"].append(await tame_blocking_op_us(20_000))
                    samples["call"].append(await tame_call_us(20_000))
                    samples["read"].append(await tame_cached_read_us(path, 50_000))
                    samples["lock"].append(await tame_lock_us(50_000))
                return {k: statistics.median(v) for k, v in samples.items()}

            out[name] = runner(per_op())
        else:
            out[name] = runner(
                heartbeat_gap(path, tame.DEFAULT_QUOTA if hasattr(tame, "DEFAULT_QUOTA") else None)
            )
    print(json.dumps(out))


def run_child(tree: str, kind: str, path: str, rounds: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            kind,
            "--child-file",
            path,
            "--rounds",
            str(rounds),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
        cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def compare_trees(
    baseline: str, path: str, zip_path: str, rounds: int
) -> list[tuple[str, str, str, str]]:
    """Per-op and gap rows for this tree vs the baseline, alternating subprocesses."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"after": here, "before": os.path.abspath(baseline)}
    per_op: dict[str, list[dict[str, Any]]] = {"after": [], "before": []}
    gap: dict[str, list[dict[str, Any]]] = {"after": [], "before": []}
    for _ in range(3):
        for label, tree in trees.items():
            per_op[label].append(run_child(tree, "per-op", path, rounds))
            gap[label].append(run_child(tree, "gap", zip_path, rounds))
    rows: list[tuple[str, str, str, str]] = []
    names = {
        "op": "blocking op (sleep(0))",
        "call": "tame.call(noop)",
        "read": "cached 4 KiB read",
        "lock": "uncontended Lock acquire+release",
    }
    for loop_name in LOOPS:
        for key, label in names.items():
            b = statistics.median(r[loop_name][key] for r in per_op["before"])
            a = statistics.median(r[loop_name][key] for r in per_op["after"])
            rows.append(
                (
                    f"{label} ({loop_name}), before -> after",
                    f"{b:.2f} -> {a:.2f} us",
                    f"after/before {a / b:.2f}",
                    "PASS" if a <= b * 1.05 else "WORSE (> 5%)",
                )
            )
        b = max(r[loop_name]["gap_ms"] for r in gap["before"])
        a = max(r[loop_name]["gap_ms"] for r in gap["after"])
        rows.append(
            (
                f"1 ms heartbeat, max gap under the zip load ({loop_name}), before -> after",
                f"{b:.1f} -> {a:.1f} ms",
                f"{b / a:.0f}x shorter",
                "",
            )
        )
    return rows


def offsets(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size // 4096) * 4096 for _ in range(count)]


def random_map(size: int, seed: int) -> Iterator[int]:
    """Every 4 KiB block of the file once per pass, in random order (fio's random map).

    The order is shuffled here, before the clock starts (shuffling 128k blocks
    takes ~40 ms of the loop's thread, which fio's bitmap does not pay), and
    each pass repeats it: with O_DIRECT no pass finds the cache warmer. The
    offsets are made in the order they are read, so that taking the next one
    walks memory in order instead of missing the cache on every read.
    """
    blocks = list(range(size // 4096))
    random.Random(seed).shuffle(blocks)
    return itertools.cycle([b * 4096 for b in blocks])


async def tame_qd_iops(
    path: str, size: int, seconds: float, qd: int, direct: bool
) -> tuple[float, dict[str, Any]]:
    """IOPS of qd tame stacks reading 4 KiB blocks of path at random through TameEnv,
    and the driver's stats plus ``cpu_us_per_read`` (user + system CPU of the process)."""
    if not direct:
        evict(path)
    offs = random_map(size, 7)
    done = 0
    await tame.call(noop)  # the runtime and its driver exist before the clock starts
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        nonlocal done
        with tame.env().open(path, "rb", direct=direct) as f:
            while time.perf_counter() < deadline:
                f.pread(4096, next(offs))
                done += 1

    cpu0 = os.times()
    t0 = time.perf_counter()
    await asyncio.gather(*(tame.call(worker) for _ in range(qd)))
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    st: dict[str, Any] = dict(stacks.runtime().uring.stats())
    st["cpu_us_per_read"] = cpu / max(done, 1) * 1e6
    return done / elapsed, st


def sequential_direct_iops(path: str, size: int, seconds: float) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    done = 0
    try:
        offs = offsets(size, 1_000_000, 11)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            os.preadv(fd, [buf], offs[done])
            done += 1
        return done / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()


def fio_run(path: str, size: int, seconds: float) -> tuple[float, float] | None:
    """fio's IOPS and its CPU (user + system) per read in us; None without fio."""
    if shutil.which("fio") is None:
        return None
    cmd = [
        "fio",
        "--name=qd32",
        f"--filename={path}",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=32",
        "--ioengine=io_uring",
        "--direct=1",
        "--numjobs=1",
        f"--runtime={seconds}",
        "--time_based",
        f"--size={size}",
        "--invalidate=1",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    job = json.loads(out.stdout)["jobs"][0]
    iops = float(job["read"]["iops"])
    cpu_share = (job["usr_cpu"] + job["sys_cpu"]) / 100  # of one CPU, over the run
    return iops, cpu_share / max(iops, 1) * 1e6


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt, typ = line.split()[1:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, typ
    return kind


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dir", default="/var/tmp", help="directory on a real disk (not tmpfs) for the data file"
    )
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each cold-read run")
    ap.add_argument(
        "--cold-rounds", type=int, default=5, help="alternating fio/TameEnv rounds (median ratio)"
    )
    ap.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds for the per-op rows (medians)"
    )
    ap.add_argument("--baseline", help="source tree of an earlier shardio to compare with")
    ap.add_argument("--child", choices=["per-op", "gap"], help=argparse.SUPPRESS)
    ap.add_argument("--child-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_file, args.rounds)
        return
    size = args.size_mb << 20
    workdir = tempfile.mkdtemp(prefix="shardio-bench-tame-", dir=args.dir)
    path = os.path.join(workdir, "data")
    rows: list[tuple[str, str, str, str]] = []
    try:
        make_file(path, size)
        # 1. per-op overhead
        # Alternate the measurements and keep medians: the machine is shared, and
        # load that comes and goes would otherwise favour whichever ran in a quiet moment.
        per_op: dict[str, dict[str, float]] = {}
        for name, runner in LOOPS.items():

            async def rounds() -> dict[str, float]:
                samples: dict[str, list[float]] = {"tame": [], "call": [], "thread": []}
                for _ in range(args.rounds):
                    samples["tame"].append(await tame_blocking_op_us(20_000))
                    samples["thread"].append(await to_thread_us(1_000))
                    samples["call"].append(await tame_call_us(20_000))
                return {k: statistics.median(v) for k, v in samples.items()}

            per_op[name] = runner(rounds())
        gev = gevent_us()
        for name in LOOPS:
            d = per_op[name]
            ratio = d["thread"] / d["tame"]
            rows.append(
                (
                    f"blocking op on a tame stack ({name})",
                    f"{d['tame']:.2f} us",
                    f"{ratio:.0f}x cheaper than to_thread",
                    "PASS" if ratio >= 20 else "FAIL (>= 20x)",
                )
            )
            rows.append((f"asyncio.to_thread(noop) ({name})", f"{d['thread']:.1f} us", "", ""))
            rows.append((f"tame.call(noop), no blocking ({name})", f"{d['call']:.2f} us", "", ""))
        rows.append(
            (
                "gevent, monkey-patched time.sleep(0)",
                "not installed (pip install gevent)" if gev is None else f"{gev:.2f} us",
                "",
                "",
            )
        )
        for name, runner in LOOPS.items():
            lock_us = statistics.median(runner(tame_lock_us(50_000)) for _ in range(args.rounds))
            rows.append(
                (f"uncontended TameLock acquire+release ({name})", f"{lock_us:.2f} us", "", "")
            )
        # 1b. the quota: heartbeat gap under the zip load, preemption off vs the default quota
        zip_path = os.path.join(workdir, "member.zip")
        make_zip(zip_path)
        for name, runner in LOOPS.items():
            off = runner(heartbeat_gap(zip_path, None))
            on = runner(heartbeat_gap(zip_path, tame.DEFAULT_QUOTA))
            rows.append(
                (
                    f"1 ms heartbeat, max gap, 48 stacks x 1 MiB zip member + sha256, quota off ({name})",
                    f"{off['gap_ms']:.1f} ms",
                    f"longest slice {off['longest_slice_ms']:.2f} ms, turn {off['longest_turn_ms']:.1f} ms (CPU)",
                    "",
                )
            )
            rows.append(
                (
                    f"1 ms heartbeat, max gap, same load, quota {tame.DEFAULT_QUOTA * 1e3:g} ms ({name})",
                    f"{on['gap_ms']:.1f} ms",
                    f"longest slice {on['longest_slice_ms']:.2f} ms, turn {on['longest_turn_ms']:.2f} ms (CPU); "
                    f"{off['gap_ms'] / on['gap_ms']:.0f}x shorter gap",
                    "",
                )
            )
        if args.baseline:
            rows += compare_trees(args.baseline, path, zip_path, max(1, args.rounds // 2))
        # 2. cached read
        pread = statistics.median(os_pread_us(path, 50_000) for _ in range(args.rounds))
        for name, runner in LOOPS.items():

            async def cached_rounds() -> float:
                return statistics.median(
                    [await tame_cached_read_us(path, 50_000) for _ in range(args.rounds)]
                )

            t = runner(cached_rounds())
            rows.append(
                (
                    f"cached 4 KiB read, TameEnv f.pread ({name})",
                    f"{t:.2f} us",
                    f"os.pread {pread:.2f} us",
                    "PASS" if t <= 3.0 else "FAIL (<= 3 us)",
                )
            )
        # 3. cold QD32 vs fio: alternate fio and TameEnv runs, keep the median ratio
        # (a run on a shared machine is as fast as its neighbours let it be).
        cold: dict[str, list[float]] = {name: [] for name in LOOPS}
        cold_cpu: dict[str, list[float]] = {name: [] for name in LOOPS}
        fio_runs: list[float] = []
        fio_cpu: list[float] = []
        ratios: dict[str, list[float]] = {name: [] for name in LOOPS}
        for _ in range(args.cold_rounds):
            run = fio_run(path, size, args.seconds)
            fio = None if run is None else run[0]
            for name, runner in LOOPS.items():
                iops, st = runner(tame_qd_iops(path, size, args.seconds, 32, True))
                cold[name].append(iops)
                cold_cpu[name].append(st["cpu_us_per_read"])
                if fio is not None:
                    ratios[name].append(iops / fio)
            if run is not None:
                fio_runs.append(run[0])
                fio_cpu.append(run[1])
        for name in LOOPS:
            iops = statistics.median(cold[name])
            if not fio_runs:
                share, verdict = "", "fio not installed (apt-get install fio)"
            else:
                ratio = statistics.median(ratios[name])
                spread = f"{min(ratios[name]):.0%}-{max(ratios[name]):.0%}"
                share = f"{ratio:.0%} of fio (median of {len(ratios[name])}; {spread})"
                verdict = "PASS" if ratio >= 0.95 else "FAIL (>= 95% of fio)"
            share += f"; CPU {statistics.median(cold_cpu[name]):.1f} us/read"
            rows.append(
                (
                    f"cold 4 KiB random read, O_DIRECT, QD32, TameEnv ({name})",
                    f"{iops / 1000:.1f}k IOPS",
                    share,
                    verdict,
                )
            )
        rows.append(
            (
                "cold 4 KiB random read, O_DIRECT, fio io_uring QD32",
                "fio not installed (apt-get install fio)"
                if not fio_runs
                else f"{statistics.median(fio_runs) / 1000:.1f}k IOPS",
                f"CPU {statistics.median(fio_cpu):.1f} us/read" if fio_cpu else "",
                "",
            )
        )
        seq = sequential_direct_iops(path, size, args.seconds)
        for name, runner in LOOPS.items():
            iops, st = runner(tame_qd_iops(path, size, args.seconds, 32, False))
            rows.append(
                (
                    f"4 KiB random read, buffered, evicted before the run, QD32, TameEnv ({name})",
                    f"{iops / 1000:.1f}k IOPS",
                    f"{st['read_cold_probed']} cold-probed, {st['read_cached']} cached",
                    "",
                )
            )
        rows.append(
            (
                "cold 4 KiB random read, O_DIRECT, sequential os.preadv (QD1)",
                f"{seq / 1000:.1f}k IOPS",
                "",
                "",
            )
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"shardio tame benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, kernel {os.uname().release}, data file {args.size_mb} MiB on {args.dir} ({fs_type(args.dir)})"
    )
    print(f"(per-op and cached-read rows: medians of {args.rounds} alternating rounds)")
    print()
    print("| what | result | compared | target |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
