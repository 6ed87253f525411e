"""Load generator of the latency suite: OSD 4 KiB reads, open or closed loop, HDR histograms.

    python bench/loadgen.py --addr HOST:PORT --objects N --plan PLAN.json [--cpus 1]

It speaks the OSD wire protocol (``shardio.osd.protocol``) to any server of
the suite, fetches the OSD map (GET_MAP) and opens ``--connections``
connections spread over the map's endpoints: a shardio OSD gets them on its
shards' own ports and every read goes straight to the owning shard; a peer
announces a one-shard map, so all of them go to its port. Every reply is
verified: status 0 and the exact bytes ``shardio.osd.loadgen.content``
gives for that object.

A plan is a list of points run in order, each printed as one JSON line:

* ``{"mode": "open", "rate": R, "seconds": S}`` -- reads *scheduled* at R per
  second whether or not earlier ones have returned. Latency is measured from
  each request's **intended** send time (wrk2's correction for coordinated
  omission), so a stall of the server shows up in every request that should
  have left during it. The sender sleeps on a timerfd armed at the next
  intended time (nanosecond resolution; asyncio's and uvloop's timers have
  1 ms), and the lag between intended and actual send is reported too, as
  is the service time from the actual send.
* ``{"mode": "closed", "concurrency": N, "seconds": S}`` -- N reads always
  in flight: the server's throughput at that depth; latency from the send.

The first ``--warmup`` seconds of each point are run but not measured.
Latencies go into an ``hdrh`` histogram (ns, 3 significant digits) whose
encoding is part of the output, so a CDF can be drawn at any point later.
Object names come from a seeded generator: every server gets the same
sequence of reads. With ``--server-pids`` the CPU time of those processes
and their descendants is sampled around each point.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import ctypes
import json
import os
import random
import resource
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from shardio.osd.loadgen import content, object_names
from shardio.osd.osdmap import OSDMap
from shardio.osd.protocol import (
    OP_GET_MAP as _GET_MAP,
    OP_READ as _READ,
    Frame,
    FrameDecoder,
    FrameError,
    encode_request,
)

__all__ = ["LoadGenError", "Point", "main", "run_plan", "tree_cpu_seconds"]

HIGHEST_NS = 3600 * 10**9
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LoadGenError(Exception):
    """The load generator cannot run against this server (see the message)."""


# -- CPU accounting -----------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants, now."""
    tree = _children()
    todo = list(roots)
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(tree.get(pid, ()))
    return total


def _own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- timerfd ------------------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFD:
    """A CLOCK_MONOTONIC timerfd armed at absolute ``time.monotonic_ns()`` deadlines."""

    _CLOCK_MONOTONIC = 1
    _TFD_TIMER_ABSTIME = 1

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(self._CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self._spec = _Itimerspec()

    def arm(self, deadline_ns: int) -> None:
        """Fire once at deadline_ns (a deadline in the past fires at once)."""
        deadline_ns = max(1, deadline_ns)  # 0 would disarm
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(deadline_ns, 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, self._TFD_TIMER_ABSTIME, ctypes.byref(self._spec),
                                      None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


# -- connections --------------------------------------------------------------------------


class LoadConn(asyncio.Protocol):
    """One connection: frames out in batches, replies handed to the generator."""

    def __init__(self, on_frame: Callable[[Frame], None], on_lost: Callable[[str], None],
                 after_batch: Callable[[], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.after_batch = after_batch
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self.on_lost(f"bad reply frame: {exc}")
            if self.transport is not None:
                self.transport.abort()
            return
        on_frame = self.on_frame
        for frame in frames:
            on_frame(frame)
        self.after_batch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.on_lost(f"connection lost: {exc or 'closed by the server'}")

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            self.transport.writelines(out)
        out.clear()


# -- results ------------------------------------------------------------------------------


def _us(ns: float) -> float:
    return round(ns / 1000.0, 2)


def _summary(samples: array.array) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in µs of raw ns samples (for the secondary series)."""
    if not samples:
        return {}
    s = sorted(samples)
    n = len(s)
    out = {f"p{q:g}": _us(s[min(n - 1, int(q / 100.0 * n))]) for q in PERCENTILES}
    out["max"] = _us(s[-1])
    out["mean"] = _us(sum(s) / n)
    return out


@dataclass
class Point:
    """One measured point of a plan, and what it measured."""

    mode: str
    seconds: float
    rate: float = 0.0
    concurrency: int = 0
    # filled by the run
    requests: int = 0  #: measured requests (intended/sent inside the window)
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    overloaded: bool = False
    first_error: str = ""
    completions_in_window: int = 0
    window: float = 0.0
    latency: array.array = field(default_factory=lambda: array.array("q"))
    service: array.array = field(default_factory=lambda: array.array("q"))
    lag: array.array = field(default_factory=lambda: array.array("q"))
    server_cpu: float | None = None
    client_cpu: float = 0.0
    loadavg: tuple[float, float] = (0.0, 0.0)

    def error(self, why: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = why

    def to_json(self) -> dict[str, Any]:
        hist = HdrHistogram(1, HIGHEST_NS, 3)
        for v in self.latency:
            hist.record_value(min(max(v, 1), HIGHEST_NS))
        lat: dict[str, float] = {}
        if hist.get_total_count():
            for q in PERCENTILES:
                lat[f"p{q:g}"] = _us(hist.get_value_at_percentile(q))
            lat["max"] = _us(max(self.latency))
            lat["mean"] = _us(hist.get_mean_value())
        throughput = self.completions_in_window / self.window if self.window else 0.0
        done = self.ok or 1
        return {
            "mode": self.mode,
            "offered": self.rate if self.mode == "open" else None,
            "concurrency": self.concurrency if self.mode == "closed" else None,
            "seconds": round(self.window, 3),
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "overloaded": self.overloaded,
            "first_error": self.first_error,
            "throughput": round(throughput, 1),
            "latency_us": lat,
            "service_us": _summary(self.service),
            "send_lag_us": _summary(self.lag),
            "server_cpu_us_per_read": (
                round(self.server_cpu / done * 1e6, 1) if self.server_cpu is not None else None
            ),
            "client_cpu_us_per_read": round(self.client_cpu / done * 1e6, 1),
            "loadavg": [round(x, 2) for x in self.loadavg],
            "hdr": hist.encode().decode() if hist.get_total_count() else "",
        }


# -- the generator ------------------------------------------------------------------------


class LoadGen:
    """Connections to one server and the runs over them."""

    def __init__(self, names: list[bytes], size: int, seed: int) -> None:
        self.names = names
        self.size = size
        self.expected = [content(n, size) for n in names]
        self.rng = random.Random(seed)
        self.by_shard: list[list[LoadConn]] = []
        self.shard_of: list[int] = []
        self.next_tid = 1
        # per-request state, indexed by tid - base of the current point
        self.base = 0
        self.intended = array.array("q")
        self.sent = array.array("q")
        self.which = array.array("l")
        self.done = bytearray()
        self.point: Point | None = None
        self.outstanding = 0
        self.measure_from = 0
        self.measure_to = 0
        self.lost: str = ""
        self.dirty: set[LoadConn] = set()
        self.on_complete: Callable[[int], None] | None = None

    # connections

    async def connect(self, host: str, port: int, connections: int, route: str) -> OSDMap:
        """Fetch the map and open ``connections`` connections over its endpoints."""
        loop = asyncio.get_running_loop()
        got: asyncio.Future[Frame] = loop.create_future()

        def on_map(frame: Frame) -> None:
            if not got.done():
                got.set_result(frame)

        def lost(why: str) -> None:
            if not got.done():
                got.set_exception(LoadGenError(f"GET_MAP from {host}:{port}: {why}"))

        tr, boot = await loop.create_connection(lambda: LoadConn(on_map, lost, lambda: None),
                                                host, port)
        boot.transport.write(encode_request(_GET_MAP, 0))  # type: ignore[union-attr]
        try:
            reply = await asyncio.wait_for(got, 10)
        finally:
            boot.closing = True
            tr.close()
        if reply.status:
            raise LoadGenError(f"GET_MAP from {host}:{port} failed with status {reply.status}")
        osdmap = OSDMap.decode(reply.payload)
        endpoints = list(osdmap.addrs) if route == "direct" and osdmap.addrs else [(host, port)]
        if connections < len(endpoints):
            raise LoadGenError(f"{connections} connections cannot reach {len(endpoints)} shards")
        self.by_shard = [[] for _ in endpoints]
        for i in range(connections):
            shard = i % len(endpoints)
            h, p = endpoints[shard]
            _, conn = await loop.create_connection(
                lambda: LoadConn(self._reply, self._lost, self._flush), h, p
            )
            self.by_shard[shard].append(conn)
        if len(endpoints) == 1:
            self.shard_of = [0] * len(self.names)
        else:
            self.shard_of = [osdmap.shard_for(n) for n in self.names]
        return osdmap

    def close(self) -> None:
        for conns in self.by_shard:
            for c in conns:
                c.closing = True
                if c.transport is not None:
                    c.transport.close()

    def _lost(self, why: str) -> None:
        self.lost = self.lost or why

    # requests

    def _send(self, which: int, intended: int, now: int) -> None:
        tid = self.next_tid
        self.next_tid = tid + 1
        self.intended.append(intended)
        self.sent.append(now)
        self.which.append(which)
        self.done.append(0)
        conns = self.by_shard[self.shard_of[which]]
        conn = conns[tid % len(conns)]
        conn.out.append(encode_request(_READ, tid, self.names[which], length=self.size))
        self.dirty.add(conn)
        self.outstanding += 1

    def _flush(self) -> None:
        if self.dirty:
            for conn in self.dirty:
                conn.flush()
            self.dirty.clear()

    def _reply(self, frame: Frame) -> None:
        now = time.monotonic_ns()
        i = frame.tid - self.base
        if i < 0 or i >= len(self.done) or self.done[i]:
            return  # a late reply of an earlier point
        self.done[i] = 1
        self.outstanding -= 1
        point = self.point
        assert point is not None
        if self.measure_from <= now <= self.measure_to:
            point.completions_in_window += 1
        intended = self.intended[i]
        if intended >= self.measure_from:
            if frame.status:
                point.error(f"status {frame.status} for {self.names[self.which[i]]!r}")
            elif frame.payload != self.expected[self.which[i]]:
                point.error(f"wrong bytes for {self.names[self.which[i]]!r}")
            else:
                point.ok += 1
                point.latency.append(now - intended)
                if point.mode == "open":
                    point.service.append(now - self.sent[i])
        if self.on_complete is not None:
            self.on_complete(now)

    def _begin(self, point: Point, warmup: float) -> int:
        self.point = point
        self.base = self.next_tid
        self.intended = array.array("q")
        self.sent = array.array("q")
        self.which = array.array("l")
        self.done = bytearray()
        self.outstanding = 0
        start = time.monotonic_ns()
        self.measure_from = start + int(warmup * 1e9)
        self.measure_to = self.measure_from + int(point.seconds * 1e9)
        point.window = point.seconds
        return start

    async def _drain(self, point: Point, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < deadline and not self.lost:
            await asyncio.sleep(0.005)
        if self.outstanding:
            late = sum(
                1 for i, d in enumerate(self.done) if not d and self.intended[i] >= self.measure_from
            )
            point.timeouts = late
            if late and not point.first_error:
                point.first_error = f"{late} reads unanswered {timeout:g} s after the run"
        if self.lost and not point.first_error:
            point.first_error = self.lost
        point.requests = sum(1 for t in self.intended if t >= self.measure_from)
        self.on_complete = None

    async def run_closed(self, point: Point, warmup: float, drain: float) -> None:
        """``point.concurrency`` reads always in flight until the window ends."""
        self._begin(point, warmup)
        rng = self.rng.randrange
        n = len(self.names)
        end = self.measure_to
        finished = asyncio.get_running_loop().create_future()

        def refill(now: int) -> None:
            if now < end:
                self._send(rng(n), now, now)
            elif not self.outstanding and not finished.done():
                finished.set_result(None)

        self.on_complete = refill
        now = time.monotonic_ns()
        for _ in range(point.concurrency):
            self._send(rng(n), now, now)
        self._flush()
        try:
            await asyncio.wait_for(finished, point.seconds + warmup + drain)
        except TimeoutError:
            pass
        await self._drain(point, drain)

    async def run_open(self, point: Point, warmup: float, drain: float,
                       max_outstanding: int) -> None:
        """Reads at ``point.rate``/s from a fixed schedule; latency from the intended time."""
        loop = asyncio.get_running_loop()
        interval = 1e9 / point.rate
        total = int((warmup + point.seconds) * point.rate)
        schedule = [self.rng.randrange(len(self.names)) for _ in range(total)]
        start = self._begin(point, warmup)
        timer = TimerFD()
        finished = loop.create_future()
        lag = point.lag
        measure_from = self.measure_from
        k = 0

        def tick() -> None:
            nonlocal k
            timer.clear()
            now = time.monotonic_ns()
            while k < total:
                intended = start + int(k * interval)
                if intended > now:
                    break
                if self.outstanding >= max_outstanding:
                    point.overloaded = True
                    point.error(f"over {max_outstanding} reads in flight: "
                                f"the server does not sustain {point.rate:g}/s")
                    k = total
                    break
                self._send(schedule[k], intended, now)
                if intended >= measure_from:
                    lag.append(now - intended)
                k += 1
            self._flush()
            if k < total and not self.lost:
                timer.arm(start + int(k * interval))
            elif not finished.done():
                finished.set_result(None)

        loop.add_reader(timer.fd, tick)
        try:
            timer.arm(start)
            await finished
        finally:
            loop.remove_reader(timer.fd)
            timer.close()
        await self._drain(point, drain)


async def run_plan(
    host: str, port: int, names: list[bytes], plan: Sequence[dict[str, Any]], *,
    size: int = 4096, connections: int = 8, warmup: float = 0.5, drain: float = 2.0,
    seed: int = 1, route: str = "direct", server_pids: Sequence[int] = (),
    stop_when_saturated: bool = False, max_outstanding: int = 20000,
    emit: Callable[[dict[str, Any]], None] = lambda d: None,
) -> list[dict[str, Any]]:
    """Run the points of ``plan`` against one server; emit and return each point's JSON."""
    gen = LoadGen(names, size, seed)
    await gen.connect(host, port, connections, route)
    results: list[dict[str, Any]] = []
    try:
        for spec in plan:
            point = Point(mode=spec["mode"], seconds=float(spec["seconds"]),
                          rate=float(spec.get("rate", 0)),
                          concurrency=int(spec.get("concurrency", 0)))
            load0 = os.getloadavg()[0]
            cpu0 = tree_cpu_seconds(server_pids) if server_pids else None
            own0 = _own_cpu_seconds()
            if point.mode == "open":
                await gen.run_open(point, warmup, drain, max_outstanding)
            elif point.mode == "closed":
                await gen.run_closed(point, warmup, drain)
            else:
                raise LoadGenError(f"unknown mode {point.mode!r} in the plan")
            point.client_cpu = _own_cpu_seconds() - own0
            if cpu0 is not None:
                point.server_cpu = tree_cpu_seconds(server_pids) - cpu0
            point.loadavg = (load0, os.getloadavg()[0])
            out = point.to_json()
            out.update({k: v for k, v in spec.items() if k not in out})
            results.append(out)
            emit(out)
            if gen.lost:
                break
            if stop_when_saturated and point.mode == "open" and saturated(out):
                break
            await asyncio.sleep(0.2)  # let late replies and queues settle between points
    finally:
        gen.close()
    return results


def saturated(point: dict[str, Any]) -> bool:
    """True when an open-loop point was not sustained: overload, errors, or < 95% achieved."""
    if point["overloaded"] or point["errors"] or point["timeouts"]:
        return True
    return bool(point["offered"]) and point["throughput"] < 0.95 * point["offered"]


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", type=_addr, required=True, help="host:port of the server")
    p.add_argument("--objects", type=int, required=True, help="working set: names PREFIX0..")
    p.add_argument("--prefix", default="lat-")
    p.add_argument("--size", type=int, default=4096, help="bytes per object and per read")
    p.add_argument("--plan", required=True, help="a JSON list of points, or @FILE")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--drain", type=float, default=2.0,
                   help="seconds to wait for replies after a point before counting timeouts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--route", choices=("direct", "shared"), default="direct",
                   help="direct: to each object's shard; shared: all to --addr")
    p.add_argument("--server-pids", default="", help="comma separated: sample their CPU time")
    p.add_argument("--cpus", default="", help="pin this process to these CPUs (e.g. 1)")
    p.add_argument("--stop-when-saturated", action="store_true")
    p.add_argument("--max-outstanding", type=int, default=20000)
    args = p.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    plan_text = args.plan
    if plan_text.startswith("@"):
        with open(plan_text[1:]) as f:
            plan_text = f.read()
    plan = json.loads(plan_text)
    pids = [int(x) for x in args.server_pids.split(",") if x]
    names = object_names(args.objects, args.prefix)

    def emit(d: dict[str, Any]) -> None:
        print(json.dumps(d), flush=True)

    import uvloop

    uvloop.run(run_plan(
        args.addr[0], args.addr[1], names, plan, size=args.size, connections=args.connections,
        warmup=args.warmup, drain=args.drain, seed=args.seed, route=args.route,
        server_pids=pids, stop_when_saturated=args.stop_when_saturated,
        max_outstanding=args.max_outstanding, emit=emit,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
