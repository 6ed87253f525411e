"""Load generation for the OSD: verifiable objects, bulk load, read benchmarks.

Object contents are a function of the name (``content``: SHAKE-128 of the
name, as long as asked), so any reader can verify any object without a copy
of what was written, and bytes served for the wrong object never match.

Two read loads, both measuring per-request latency into an exact sample
array (percentiles are computed from every sample, not from buckets):

* **closed loop** (``closed_loop``): ``concurrency`` workers, each sending its
  next read as soon as the previous one returns. Throughput is the OSD's
  capacity at that concurrency; latency is service time under that load.
* **open loop** (``open_loop``): reads are *scheduled* at a fixed rate,
  whether or not earlier ones have returned, and each latency is measured
  from the request's **intended** send time (the correction for coordinated
  omission: a stall of the OSD or of this client shows up in the latency of
  every request that should have been sent during it, instead of silently
  lowering the request rate). The sender wakes on the event loop's timer
  (1 ms resolution under uvloop), so requests leave in small bursts; the
  service time from the actual send is reported alongside.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from .client import AsyncClient, OSDClientError

__all__ = [
    "BenchResult",
    "LoadResult",
    "closed_loop",
    "content",
    "load",
    "object_names",
    "open_loop",
    "percentile",
    "verify",
]


def object_names(count: int, prefix: str = "obj-") -> list[bytes]:
    """The names ``load`` creates: prefix + zero-padded index."""
    return [f"{prefix}{i:08d}".encode() for i in range(count)]


def content(name: str | bytes, size: int) -> bytes:
    """The deterministic content of an object: ``size`` bytes of SHAKE-128(name)."""
    b = name.encode() if isinstance(name, str) else name
    return hashlib.shake_128(b).digest(size)


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted samples (nearest rank); 0.0 if empty."""
    n = len(sorted_samples)
    if not n:
        return 0.0
    rank = min(n - 1, max(0, int(q * n + 0.999999) - 1))
    return sorted_samples[rank]


@dataclass
class LoadResult:
    """What a load or verify pass did."""

    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: int = 0
    mismatches: list[bytes] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.objects / self.seconds if self.seconds else 0.0


@dataclass
class BenchResult:
    """Latency samples (seconds) and counts of one benchmark run."""

    label: str
    latencies: array = field(default_factory=lambda: array("d"))
    service: array = field(default_factory=lambda: array("d"))  #: open loop: from actual send
    ops: int = 0
    errors: int = 0
    seconds: float = 0.0
    target_rate: float = 0.0
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentiles(self, qs: Sequence[float] = (0.5, 0.9, 0.99, 0.999)) -> dict[float, float]:
        s = sorted(self.latencies)
        out = {q: percentile(s, q) for q in qs}
        out[1.0] = s[-1] if s else 0.0
        return out

    def merge(self, other: BenchResult) -> None:
        """Add another client's samples of the same run (seconds: the longer one)."""
        self.latencies.extend(other.latencies)
        self.service.extend(other.service)
        self.ops += other.ops
        self.errors += other.errors
        self.seconds = max(self.seconds, other.seconds)
        self.target_rate += other.target_rate
        self.first_error = self.first_error or other.first_error


async def load(
    client: AsyncClient, names: Sequence[bytes], size: int, *, concurrency: int = 64
) -> LoadResult:
    """PUT every name with its ``content``; stops at the first error (raised)."""
    result = LoadResult()
    it = iter(names)
    start = time.perf_counter()

    async def worker() -> None:
        for name in it:
            await client.put(name, content(name, size))
            result.objects += 1
            result.bytes += size

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


async def verify(
    client: AsyncClient, names: Sequence[bytes], size: int, *, concurrency: int = 64
) -> LoadResult:
    """Read every name back whole and compare with its ``content``.

    Mismatches and errors are counted (mismatching names listed), not raised.
    """
    result = LoadResult()
    it = iter(names)
    start = time.perf_counter()

    async def worker() -> None:
        for name in it:
            try:
                data = await client.get(name)
            except OSDClientError:
                result.errors += 1
                result.mismatches.append(name)
                continue
            result.objects += 1
            result.bytes += len(data)
            if data != content(name, size):
                result.mismatches.append(name)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


async def closed_loop(
    client: AsyncClient,
    names: Sequence[bytes],
    *,
    seconds: float,
    concurrency: int = 16,
    length: int = 4096,
    label: str = "closed loop",
    seed: int | None = None,
) -> BenchResult:
    """``concurrency`` workers reading random names back to back for ``seconds``."""
    res = BenchResult(label)
    rnd = random.Random(seed)
    perf = time.perf_counter
    lat = res.latencies
    start = perf()
    end = start + seconds

    async def worker() -> None:
        choice = rnd.choice
        read = client.read
        while True:
            t0 = perf()
            if t0 >= end:
                return
            try:
                await read(choice(names), 0, length)
            except OSDClientError as exc:
                res.errors += 1
                res.first_error = res.first_error or str(exc)
                continue
            lat.append(perf() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = perf() - start
    res.ops = len(lat)
    return res


async def open_loop(
    client: AsyncClient,
    names: Sequence[bytes],
    *,
    seconds: float,
    rate: float,
    length: int = 4096,
    label: str = "open loop",
    max_outstanding: int = 20000,
    seed: int | None = None,
) -> BenchResult:
    """Reads scheduled at ``rate`` per second; latency from each intended send time.

    If more than ``max_outstanding`` reads are in flight the OSD is not
    keeping up: the run stops scheduling and counts the unsent reads as errors.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    res = BenchResult(label, target_rate=rate)
    rnd = random.Random(seed)
    loop = asyncio.get_running_loop()
    perf = time.perf_counter
    lat = res.latencies
    svc = res.service
    interval = 1.0 / rate
    total = int(seconds * rate)
    outstanding = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(name: bytes, intended: float) -> None:
        nonlocal outstanding
        sent = perf()
        try:
            await client.read(name, 0, length)
        except OSDClientError as exc:
            res.errors += 1
            res.first_error = res.first_error or str(exc)
        else:
            done = perf()
            lat.append(done - intended)
            svc.append(done - sent)
        finally:
            outstanding -= 1

    start = perf()
    i = 0
    while i < total:
        now = perf()
        due = start + i * interval
        if due > now:
            await asyncio.sleep(due - now)
            now = perf()
        while i < total and start + i * interval <= now:
            if outstanding >= max_outstanding:
                res.errors += total - i
                res.first_error = res.first_error or (
                    f"over {max_outstanding} reads in flight: the OSD does not sustain {rate}/s"
                )
                i = total
                break
            outstanding += 1
            t = loop.create_task(one(rnd.choice(names), start + i * interval))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
    if tasks:
        await asyncio.gather(*tasks)
    res.seconds = perf() - start
    res.ops = len(lat)
    return res


def format_table(results: Sequence[BenchResult]) -> str:
    """A fixed-width table: throughput and latency percentiles (ms) per run."""
    head = f"{'run':<44} {'ops/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'errors':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        p = r.percentiles()
        lines.append(
            f"{r.label:<44} {r.throughput:>8.0f} "
            + " ".join(f"{p[q] * 1e3:>7.2f}" for q in (0.5, 0.9, 0.99, 0.999, 1.0))
            + f" {r.errors:>6}"
        )
    lines.append("latencies in ms")
    return "\n".join(lines)
