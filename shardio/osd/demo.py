"""``python -m shardio.osd demo``: the OSD read path, end to end, in under a minute.

It starts an OSD (2 shard processes by default) on free ports over a
temporary directory, loads a few thousand generated objects (every PUT
acknowledged only once fsynced), reads every one back and verifies its
bytes, straight from the owning shard and through the shared port (a
cross-shard hop for about half of them), evicts the store's files from the
page cache and reads everything again (now through io_uring), runs a short
latency run, prints a table, and stops cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .client import AsyncClient
from .loadgen import BenchResult, closed_loop, format_table, load, object_names, open_loop, verify
from .server import OSDServer

__all__ = ["evict_page_cache", "fs_type", "new_loop", "run_demo", "run_in_new_loop"]

T = TypeVar("T")


def fs_type(path: str) -> str:
    """The type of the filesystem holding path ('ext4', 'tmpfs', ...; '?' if unknown)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def evict_page_cache(data_dir: str) -> int:
    """posix_fadvise(DONTNEED) every store segment under data_dir; return bytes advised.

    Only clean pages are dropped (the store fsyncs what it acknowledges), and
    nothing is dropped on tmpfs, where the page cache is the storage.
    """
    total = 0
    for path in glob.glob(os.path.join(data_dir, "shard-*", "seg-*.log")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += size
        finally:
            os.close(fd)
    return total


def _io_driver(osd: OSDServer) -> str:
    return str(osd.total_stats().get("io", {}).get("driver", "?"))


def _io_counts(osd: OSDServer) -> tuple[int, int]:
    """(page-cache hits, io_uring reads) summed over the shards' file I/O drivers."""
    io = osd.total_stats().get("io", {})
    return int(io.get("read_cached", 0)), int(io.get("read_uring", 0) + io.get("read_thread", 0))


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_in_new_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro to completion in a fresh loop; Ctrl-C (or SIGTERM) cancels it cleanly.

    The signals cancel the task, so its ``finally`` blocks (closing clients)
    run while the loop still works, and KeyboardInterrupt is raised after.
    (A KeyboardInterrupt raised by Python's default handler inside a
    protocol callback would be taken by uvloop for a transport error.)
    """
    loop = new_loop()
    task = loop.create_task(coro)
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupt)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: leave the signals alone
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        raise
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        loop.close()


def run_demo(
    *,
    shards: int = 2,
    objects: int = 3000,
    seconds: float = 6.0,
    size: int = 4096,
    backend: str = "process",
    data_dir: str | None = None,
    concurrency: int = 16,
    out: Callable[[str], Any] = print,
) -> int:
    """Run the demo; return the process exit code (0: every check passed)."""
    if shards < 1 or objects < 1 or seconds <= 0 or size < 1:
        raise ValueError("shards, objects, seconds and size must be positive")
    t_all = time.perf_counter()
    tmp = None
    if data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix="shardio-osd-demo-")
    ok = True
    try:
        kind = fs_type(data_dir)
        out(
            f"shardio OSD demo: {shards} shards ({backend} backend), {objects} objects x {size} B, "
            f"data in {data_dir} ({kind})"
        )
        t0 = time.perf_counter()
        # Shard logs at ERROR only: on a busy machine the stall detector's reports (with
        # stacks) would bury the demo's output; the stalls are counted and shown instead.
        osd = OSDServer(
            data_dir,
            shards=shards,
            backend=backend,  # type: ignore[arg-type]
            log_level=logging.ERROR,
        )
        osd.start()
        try:
            assert osd.address is not None and osd.osdmap is not None
            shard_ports = ", ".join(str(p) for _, p in osd.osdmap.addrs)
            out(
                f"  started in {time.perf_counter() - t0:.1f} s: shared port "
                f"{osd.address[0]}:{osd.address[1]} (SO_REUSEPORT), shard ports {shard_ports}; "
                f"{osd.osdmap.pools[0].pg_num} pgs"
            )
            ok = run_in_new_loop(
                _demo_body(osd, data_dir, kind, objects, seconds, size, concurrency, out)
            )
        finally:
            t_stop = time.perf_counter()
            osd.stop()
            out(f"  stopped cleanly in {time.perf_counter() - t_stop:.1f} s")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    verdict = "all checks passed" if ok else "SOME CHECKS FAILED"
    out(f"demo finished in {time.perf_counter() - t_all:.1f} s: {verdict}")
    return 0 if ok else 1


async def _demo_body(
    osd: OSDServer,
    data_dir: str,
    kind: str,
    objects: int,
    seconds: float,
    size: int,
    concurrency: int,
    out: Callable[[str], Any],
) -> bool:
    assert osd.address is not None
    ok = True
    names = object_names(objects, "demo-")
    direct = await AsyncClient.connect(*osd.address)
    shared = await AsyncClient.connect(*osd.address, route="shared")
    try:
        fsyncs0 = osd.total_stats().get("store", {}).get("fsyncs", 0)
        r = await load(direct, names, size, concurrency=64)
        fsyncs = osd.total_stats().get("store", {}).get("fsyncs", 0) - fsyncs0
        out(
            f"  loaded {r.objects} objects ({r.bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s: "
            f"{r.rate:.0f} PUT/s, each acknowledged once fsynced ({fsyncs} group commits)"
        )
        v = await verify(direct, names, size, concurrency=64)
        hops0 = osd.total_stats().get("hops_out", 0)
        vs = await verify(shared, names, size, concurrency=64)
        hops = osd.total_stats().get("hops_out", 0) - hops0
        good = v.objects - len(v.mismatches) + v.errors
        good_s = vs.objects - len(vs.mismatches) + vs.errors
        out(
            f"  verified {good}/{objects} objects read straight from their shard, "
            f"{good_s}/{objects} through the shared port ({hops} crossed shards)"
        )
        if v.mismatches or vs.mismatches:
            ok = False
            bad = (v.mismatches + vs.mismatches)[:5]
            out(
                f"  MISMATCH or error on {len(v.mismatches) + len(vs.mismatches)} reads, e.g. {bad}"
            )
        cached0, uring0 = _io_counts(osd)
        evicted = evict_page_cache(data_dir)
        shuffled = list(names)
        random.shuffle(shuffled)  # in log order, kernel readahead would fetch it all at once
        vc = await verify(direct, shuffled, size, concurrency=64)
        cached1, uring1 = _io_counts(osd)
        if vc.mismatches:
            ok = False
            out(f"  MISMATCH or error on {len(vc.mismatches)} cold reads")
        note = " (tmpfs: nothing to evict)" if kind == "tmpfs" else ""
        driver = _io_driver(osd)
        via = "io_uring" if driver == "io_uring" else f"the {driver} fallback"
        out(
            f"  evicted {evicted / 2**20:.1f} MiB from the page cache{note}; verified "
            f"{vc.objects - len(vc.mismatches) + vc.errors}/{objects} again in {vc.seconds:.1f} s: "
            f"{uring1 - uring0} reads went through {via}, {cached1 - cached0} hit the page cache "
            "(kernel readahead brings neighbours in)"
        )

        slice_s = seconds / 3
        stats0 = osd.total_stats()
        cached0, uring0 = _io_counts(osd)
        results: list[BenchResult] = []
        results.append(
            await closed_loop(
                direct,
                names,
                seconds=slice_s,
                concurrency=concurrency,
                length=size,
                label=f"direct to owning shard, closed loop ({concurrency})",
            )
        )
        hops0 = osd.total_stats().get("hops_out", 0)
        results.append(
            await closed_loop(
                shared,
                names,
                seconds=slice_s,
                concurrency=concurrency,
                length=size,
                label=f"shared port (hops), closed loop ({concurrency})",
            )
        )
        run_hops = osd.total_stats().get("hops_out", 0) - hops0
        rate = max(100.0, round(results[0].throughput * 0.5, -2))
        results.append(
            await open_loop(
                direct,
                names,
                seconds=slice_s,
                rate=rate,
                length=size,
                label=f"direct, open loop at {rate:.0f}/s (50%)",
            )
        )
        stats1 = osd.total_stats()
        cached1, uring1 = _io_counts(osd)
        out("")
        out(f"{size} B reads of random objects among {objects} (cached), {slice_s:.1f} s per run:")
        out(format_table(results))
        shared_ops = results[1].ops
        out(
            f"cross-shard hops in the shared-port run: {run_hops} of {shared_ops} reads; "
            f"file reads: {cached1 - cached0} page-cache hits (preadv2 RWF_NOWAIT), "
            f"{uring1 - uring0} through {via}"
        )
        open_r = results[2]
        if open_r.service:
            svc = sorted(open_r.service)
            out(
                f"open loop: latency from the intended send time (coordinated omission "
                f"corrected); from the actual send: p50 {svc[len(svc) // 2] * 1e3:.2f} ms, "
                f"p99 {svc[min(len(svc) - 1, int(len(svc) * 0.99))] * 1e3:.2f} ms"
            )
        errors = sum(r.errors for r in results)
        if errors:
            ok = False
            out(f"  {errors} read errors during the latency runs: {results[0].first_error}")
        srv_ops = sum(n for k, n in stats1.get("ops", {}).items() if k.startswith("read/")) - sum(
            n for k, n in stats0.get("ops", {}).items() if k.startswith("read/")
        )
        stalls = [s.get("reactor_stalls", 0) if s else "down" for s in osd.stats()]
        load1 = os.getloadavg()[0]
        out(
            f"server side: {srv_ops} reads served; reactor stalls over 25 ms per shard: {stalls}; "
            f"{len(os.sched_getaffinity(0))} CPUs shared by the shards and this client, "
            f"load average {load1:.1f}"
        )
    finally:
        await direct.close()
        await shared.close()
    return ok


if __name__ == "__main__":  # pragma: no cover - use python -m shardio.osd demo
    sys.exit(run_demo())
