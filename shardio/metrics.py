"""Per-shard Prometheus metrics, gathered over the fabric into one ``/metrics``.

Each shard keeps its own series.  At scrape time the group's owner asks every
shard for its samples over the fabric (all shards at once, with a timeout),
merges them family by family and renders Prometheus text, as seastar does.
Every series carries a ``shard`` label: the shard's number, or ``"outside"``
for the owner endpoint (the threads of the process that started the group).
A shard that does not answer in time, or is dead, shows as
``shardio_shard_up{shard="N"} 0``; a scrape never hangs on it.

Built-in series are read at scrape time from ``reactor.stats`` and the links,
so they cost nothing on the hot path; the shard imports nothing to produce
them (prometheus_client takes ~100 ms to import, a stall on a reactor).

Reactor (``shard`` label): ``shardio_reactor_polls_total``, ``_idle_spins_total``,
``_sleeps_total``, ``_doorbell_wakeups_total``, ``_work_wakeups_total``,
``_sleep_seconds_total``,
``_busy_seconds_total`` (wall time minus sleep), ``_cpu_seconds_total`` (the
reactor thread's CPU time), ``_requests_total``, ``_tasks_started_total``,
``_inbox_items_total``, ``_inbox_length``, ``_batches_total``,
``_batch_messages_total``, ``_stalls_total``.

Fabric (``shard`` and ``peer`` labels; the owner is ``"outside"``):
``shardio_fabric_sent_messages_total``, ``_sent_bytes_total``,
``_received_messages_total``, ``_received_bytes_total``,
``_producer_waits_total``, ``_doorbells_rung_total``, ``_bound_waits_total``,
``_ring_used_bytes`` (the ring from ``shard`` to ``peer``), ``_backlog_messages``,
``_backlog_bytes`` (the queue depth outside the ring), ``_pending_calls``,
``_waiting_calls`` (callers held back by the bound), ``_peer_up``;
``shardio_fabric_ring_capacity_bytes`` (``shard`` only).

External path: ``shardio_external_submissions_total`` (on a shard: calls made
with ``external_submit`` from its non-reactor threads; ``shard="outside"``:
calls the owner submitted, ``group.submit``, scrapes and control calls
included), ``shardio_external_in_flight{shard="outside"}``; and
``shardio_shard_up``.

Adding series from shard code (on the reactor thread)::

    from shardio.metrics import shard_registry

    m = shard_registry()                  # this shard's registry, made on first use
    ops = m.counter("shardio_osd_ops", "OSD operations by type and status.",
                    ["op", "status"])
    read_ok = ops.labels(op="read", status="ok")   # once: labels() costs ~3 us
    read_ok.inc()                                  # per op: ~0.6 us
    latency = m.histogram("shardio_osd_op_latency_seconds", "Time to serve an op.",
                          ["op"]).labels(op="read")
    latency.observe(seconds)                       # ~2 us

    def tame_series():                    # pull-style: called on the reactor at scrape time
        from prometheus_client.core import GaugeMetricFamily
        yield GaugeMetricFamily("shardio_tame_stacks_in_use", "Stacks running a call.",
                                value=in_use())
    m.register_collector(tame_series)

``counter``/``gauge``/``histogram`` create the metric on the first call and
return the same object afterwards, so any module may ask for it at start.
Do not declare a ``shard`` label: it is added when the samples are gathered.
Names follow Prometheus conventions: ``shardio_<part>_<what>``, units in the
name (``_seconds``, ``_bytes``); counters get ``_total`` added.  The first
``shard_registry()`` on a shard imports prometheus_client: call it at start,
not in the middle of serving.

From the owner process: :func:`collect` returns a :class:`Snapshot` (merged
families, ``.text()``, ``.value(name, **labels)``); :func:`serve_group_metrics`
serves ``GET /metrics`` over HTTP (``ShardGroup(metrics_port=P)`` calls it).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ShardDied, ShardioError, WrongThreadError
from .reactor import current_reactor, require_reactor

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram, Metric

    from .fabric.link import Link
    from .group import ShardGroup
    from .reactor import Reactor

__all__ = [
    "LATENCY_BUCKETS",
    "MetricsError",
    "MetricsServer",
    "ShardMetrics",
    "Snapshot",
    "collect",
    "serve_group_metrics",
    "shard_registry",
]

log = logging.getLogger("shardio.metrics")

OUTSIDE = "outside"
"""The ``shard``/``peer`` label value of the group owner's endpoint."""

DEFAULT_TIMEOUT = 1.0
"""Seconds a scrape waits for the shards' answers."""

LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Histogram buckets (seconds) from 10 us to 10 s; prometheus_client's start at 5 ms."""


class MetricsError(ShardioError, ValueError):
    """A metric declaration clashes with an existing series or breaks a naming rule."""


# ---------------------------------------------------------------- built-in series

# (family name without _total, ReactorStats attribute, help)
_REACTOR_COUNTERS = (
    ("shardio_reactor_polls", "polls",
     "Loop iterations while awake; each polls the rings, the inbox and the pollers."),
    ("shardio_reactor_idle_spins", "idle_spins",
     "Polls that found no work while waiting idle_poll_us before sleeping."),
    ("shardio_reactor_sleeps", "sleeps", "Times the reactor went to sleep in epoll."),
    ("shardio_reactor_doorbell_wakeups", "doorbell_wakeups",
     "Times a doorbell woke the sleeping reactor."),
    ("shardio_reactor_work_wakeups", "work_wakeups",
     "Times other work (sockets, timers, tasks) woke the sleeping reactor before a doorbell."),
    ("shardio_reactor_sleep_seconds", "sleep_seconds",
     "Time blocked asleep: wall time asleep minus the CPU time the thread used meanwhile."),
    ("shardio_reactor_requests", "requests_run",
     "Calls from other shards and from outside run on this shard."),
    ("shardio_reactor_tasks_started", "tasks_started",
     "Calls that returned an awaitable and ran as a task."),
    ("shardio_reactor_inbox_items", "inbox_items",
     "Callbacks run from the MPSC inbox (external_submit, call_threadsafe)."),
    ("shardio_reactor_batches", "batches", "Non-empty batches taken off inbound rings."),
    ("shardio_reactor_batch_messages", "batch_messages",
     "Messages in those batches; divided by batches, the mean batch size."),
    ("shardio_reactor_stalls", "stalls",
     "Times the reactor thread stayed away from its loop longer than the stall threshold."),
    ("shardio_external_submissions", "external_submissions",
     "Calls submitted by threads that are not reactors (shard: external_submit; "
     "outside: every call the owner submitted, scrapes included)."),
)
# (family name without _total, Link attribute, help)
_LINK_COUNTERS = (
    ("shardio_fabric_sent_messages", "sent_messages", "Messages sent to the peer."),
    ("shardio_fabric_sent_bytes", "sent_bytes", "Bytes of messages sent to the peer."),
    ("shardio_fabric_received_messages", "received_messages",
     "Messages received from the peer."),
    ("shardio_fabric_received_bytes", "received_bytes",
     "Bytes of messages received from the peer."),
    ("shardio_fabric_producer_waits", "producer_waits",
     "Sends that found the ring to the peer full and waited in the backlog."),
    ("shardio_fabric_doorbells_rung", "doorbells_rung",
     "Doorbells rung to wake the sleeping peer."),
    ("shardio_fabric_bound_waits", "bound_waits",
     "Calls to the peer that waited for room under max_calls_per_peer / "
     "max_queued_bytes_per_peer."),
)
_BUILTIN_NAMES = frozenset(
    [name for name, _, _ in _REACTOR_COUNTERS + _LINK_COUNTERS]
    + ["shardio_reactor_busy_seconds", "shardio_reactor_cpu_seconds",
       "shardio_reactor_inbox_length",
       "shardio_fabric_ring_used_bytes", "shardio_fabric_ring_capacity_bytes",
       "shardio_fabric_backlog_messages", "shardio_fabric_pending_calls",
       "shardio_fabric_backlog_bytes", "shardio_fabric_waiting_calls",
       "shardio_fabric_peer_up", "shardio_external_in_flight", "shardio_shard_up"])

# A gathered family on the wire: (name, type, help, unit, [(sample name, labels, value)]).
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]
_CREATED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


class _Families:
    """Families being built, in first-seen order; plain data that pickles cheaply."""

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[str, str, str, list]] = {}

    def add(self, name: str, kind: str, help: str, sample: str, labels: dict[str, str],
            value: float) -> None:
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = (kind, help, "", [])
        family[3].append((sample, labels, float(value)))

    def counter(self, name: str, help: str, value: float, **labels: str) -> None:
        self.add(name, "counter", help, name + "_total", labels, value)

    def gauge(self, name: str, help: str, value: float, **labels: str) -> None:
        self.add(name, "gauge", help, name, labels, value)

    def extend(self, metrics: Iterable[Metric], shard: str) -> None:
        """Add prometheus_client families, with the shard label set; drop ``_created``."""
        for metric in metrics:
            known = self.by_name.get(metric.name)
            if known is not None and known[0] != metric.type:
                log.warning("metric family %s on shard %s is both %s and %s; dropped the "
                            "second", metric.name, shard, known[0], metric.type)
                continue
            created = ({metric.name + "_created", metric.name + "_gcreated"}
                       if metric.type in _CREATED_TYPES else ())
            family = known or self.by_name.setdefault(
                metric.name, (metric.type, metric.documentation, metric.unit, []))
            family[3].extend((s.name, {**s.labels, "shard": shard}, float(s.value))
                             for s in metric.samples if s.name not in created)

    def wire(self) -> list[Family]:
        return [(name, *family) for name, family in self.by_name.items()]


def _link_series(out: _Families, link: Link, shard: str, peer: str) -> None:
    for name, attribute, help in _LINK_COUNTERS:
        out.counter(name, help, getattr(link, attribute), shard=shard, peer=peer)
    out.gauge("shardio_fabric_ring_used_bytes",
              "Bytes waiting in the ring from this shard to the peer (a snapshot).",
              link.outbound.used(), shard=shard, peer=peer)
    out.gauge("shardio_fabric_backlog_messages", "Messages to the peer waiting for ring space.",
              len(link.backlog), shard=shard, peer=peer)
    out.gauge("shardio_fabric_backlog_bytes",
              "Bytes of messages to the peer waiting for ring space.",
              link.backlog_bytes, shard=shard, peer=peer)
    out.gauge("shardio_fabric_pending_calls", "Calls to the peer waiting for their result.",
              len(link.pending), shard=shard, peer=peer)
    out.gauge("shardio_fabric_waiting_calls",
              "Calls to the peer held back by the bound, not yet pickled.",
              len(link.waiting), shard=shard, peer=peer)
    out.gauge("shardio_fabric_peer_up", "1 while the peer is alive, 0 once it is known dead.",
              0 if link.dead else 1, shard=shard, peer=peer)


def _reactor_series(out: _Families, reactor: Reactor) -> None:
    stats = reactor.stats
    shard = str(reactor.shard_id)
    for name, attribute, help in _REACTOR_COUNTERS:
        out.counter(name, help, getattr(stats, attribute), shard=shard)
    out.counter("shardio_reactor_busy_seconds",
                "Wall time since the reactor started, minus its sleep.",
                max(0.0, time.monotonic() - stats.started_at - stats.sleep_seconds), shard=shard)
    out.counter("shardio_reactor_cpu_seconds", "CPU time of the reactor thread.",
                stats.cpu_seconds, shard=shard)
    out.gauge("shardio_reactor_inbox_length", "Callbacks waiting in the MPSC inbox.",
              reactor.inbox_length(), shard=shard)
    _tame_series(out, reactor, shard)
    _scheduling_series(out, reactor, shard)
    if reactor.stall_detector is not None:
        out.gauge("shardio_reactor_longest_stall_seconds",
                  "The longest stall that has ended, from its last heartbeat to the next.",
                  reactor.stall_detector.longest, shard=shard)
    links = [link for link in reactor.links if link is not None]
    out.gauge("shardio_fabric_ring_capacity_bytes", "Size of each ring's data area.",
              links[0].outbound.capacity, shard=shard)
    for link in links:
        peer = OUTSIDE if link.peer == reactor.owner_endpoint else str(link.peer)
        _link_series(out, link, shard, peer)


_TAME_COUNTERS = (
    ("shardio_tame_calls", "calls", "tame.call()s run on a tame stack."),
    ("shardio_tame_blocked_calls", "blocked_calls",
     "tame calls that blocked (yielded to the reactor) at least once."),
    ("shardio_tame_stacks_created", "stacks_created", "Greenlet stacks created for the pool."),
    ("shardio_tame_stack_waits", "stack_waits", "tame calls that waited for a free stack."),
    ("shardio_tame_cancellations", "cancellations", "tame calls cancelled while blocked."),
    ("shardio_tame_waits", "waits", "Blocking operations (tame.wait) made on tame stacks."),
)
_URING_COUNTERS = (
    (
        "read_cached",
        "Reads answered by preadv2(RWF_NOWAIT): page-cached data, or a cold read the"
        " probe itself started that finished before it looked again.",
    ),
    ("read_uring", "Reads that went through io_uring."),
    ("read_cold_probed", "Reads sent straight to io_uring after a cache probe said cold."),
    ("read_thread", "Reads done by the thread-pool fallback."),
    ("write", "Writes submitted."),
    ("fsync", "fsyncs submitted."),
    ("fdatasync", "fdatasyncs submitted."),
    ("slot_waits", "Operations that waited for a free queue slot (queue depth bound)."),
    ("submit_calls", "io_uring_submit calls."),
    ("submit_failures", "io_uring_enter failures (their waiting calls failed with UringSubmitError)."),
    ("cancels", "Operations whose caller was cancelled while they were in the kernel."),
    ("metadata", "File metadata operations (open, close, stat, truncate, rename, unlink)."),
    ("metadata_thread", "Metadata operations run on the thread pool (opcode missing)."),
    ("cqes", "Completions reaped."),
)


def _tame_series(out: _Families, reactor: Reactor, shard: str) -> None:
    """Tame stacks and file I/O, if this shard has a tame runtime (never creates one)."""
    stacks = sys.modules.get("shardio.tame.stacks")
    if stacks is None:
        return
    runtime = stacks._runtimes.get(reactor.loop)
    if runtime is None:
        return
    for name, attribute, help in _TAME_COUNTERS:
        out.counter(name, help, getattr(runtime.stats, attribute), shard=shard)
    out.gauge("shardio_tame_stacks", "Greenlet stacks in the pool (busy and free).",
              runtime.n_stacks, shard=shard)
    out.gauge("shardio_tame_stacks_free", "Pooled stacks ready for a call.",
              len(runtime.free), shard=shard)
    out.gauge("shardio_tame_stacks_waiting", "tame calls waiting for a stack.",
              len(runtime.waiters), shard=shard)
    driver = runtime._uring
    if driver is None:
        return
    io = driver.stats()
    for key, help in _URING_COUNTERS:
        if key in io:
            out.counter(f"shardio_file_{key}", help, io[key], shard=shard)
    out.gauge("shardio_file_inflight", "File operations in flight in io_uring.",
              io.get("inflight", 0), shard=shard)
    out.gauge("shardio_file_fallback", "1 when file I/O uses the thread-pool fallback.",
              io["fallback"], shard=shard)


_SCHEDULER_COUNTERS = (
    ("runtime_ms", "CPU time the group's work ran (thread CPU clock; for the default "
     "group, the rest of the reactor thread's CPU time)."),
    ("waittime_ms", "Wall time the group had nothing to run (idle, or waiting on I/O)."),
    ("starvetime_ms", "Wall time the group had work queued but other work ran."),
    ("tasks_processed", "Runnables the group ran: stack starts and resumptions, coroutine "
     "steps, cross-shard calls."),
)


def _scheduling_series(out: _Families, reactor: Reactor, shard: str) -> None:
    """Scheduling groups (Seastar's names), if this shard has used any (never makes one)."""
    scheduler = sys.modules.get("shardio.scheduling.scheduler")
    if scheduler is None:
        return
    found = scheduler.loop_scheduler(reactor.loop)
    if found is None:
        return
    for entry in found.snapshot():
        group = entry["group"]
        for key, help in _SCHEDULER_COUNTERS:
            if key in entry:
                out.counter(f"shardio_scheduler_{key}", help, entry[key], shard=shard,
                            group=group)
        out.gauge("shardio_scheduler_shares", "The group's shares on this shard.",
                  entry["shares"], shard=shard, group=group)
        if "queue_length" in entry:
            out.gauge("shardio_scheduler_queue_length", "Runnables queued in the group.",
                      entry["queue_length"], shard=shard, group=group)


def _shard_families() -> list[Family]:
    """Runs on a shard's reactor, submitted by the gatherer: this shard's families."""
    reactor = require_reactor()
    out = _Families()
    _reactor_series(out, reactor)
    metrics = _registries.get(reactor)
    if metrics is not None:
        out.extend(metrics.registry.collect(), str(reactor.shard_id))
    return out.wire()


# ---------------------------------------------------------------- per-shard registry


class _CallbackCollector:
    """Adapts a ``register_collector`` function; a failing one costs its series only."""

    def __init__(self, collect: Callable[[], Iterable[Metric]], shard: int) -> None:
        self.callback = collect
        self.shard = shard

    def collect(self) -> list[Metric]:
        try:
            return list(self.callback())
        except Exception:
            log.exception("metrics collector %r failed on shard %d", self.callback, self.shard)
            return []


class ShardMetrics:
    """One shard's own series: a private CollectorRegistry, never the global one.

    Get it with :func:`shard_registry`.  ``registry`` is a real
    ``prometheus_client.CollectorRegistry``: anything that takes ``registry=``
    (Summary, Info, Enum...) can be registered there as well.
    """

    def __init__(self, shard: int) -> None:
        from prometheus_client import CollectorRegistry

        self.shard = shard
        self.registry = CollectorRegistry()
        self._metrics: dict[str, tuple[Any, tuple]] = {}
        self._collectors: dict[Callable, _CallbackCollector] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """The counter ``name`` (``_total`` is added); created on first use."""
        from prometheus_client import Counter

        return self._declare(Counter, name.removesuffix("_total"), help, labelnames)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """The gauge ``name``; created on first use (``.set_function(fn)`` makes it pull-style)."""
        from prometheus_client import Gauge

        return self._declare(Gauge, name, help, labelnames)

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        """The histogram ``name``; created on first use, by default with LATENCY_BUCKETS."""
        from prometheus_client import Histogram

        return self._declare(Histogram, name, help, labelnames, buckets=tuple(buckets))

    def _declare(self, cls: type, name: str, help: str, labelnames: Sequence[str],
                 **options: Any) -> Any:
        labelnames = tuple(labelnames)
        if "shard" in labelnames:
            raise MetricsError(f"{name}: do not declare a 'shard' label; every series gets "
                               "one when the shard's samples are gathered")
        if name in _BUILTIN_NAMES:
            raise MetricsError(f"{name} is a built-in shardio series; choose another name")
        spec = (cls, labelnames, options)
        with self._lock:
            known = self._metrics.get(name)
            if known is None:
                try:
                    metric = cls(name, help, labelnames, registry=self.registry, **options)
                except ValueError as error:
                    raise MetricsError(f"cannot declare {name} on shard {self.shard}: {error}")
                self._metrics[name] = (metric, spec)
                return metric
        metric, known_spec = known
        if known_spec != spec:
            raise MetricsError(
                f"{name} is already declared on shard {self.shard} as a "
                f"{known_spec[0].__name__} with labels {known_spec[1]} {known_spec[2] or ''}; "
                f"asked for a {cls.__name__} with labels {labelnames} {options or ''}")
        return metric

    def register_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Call ``collect()`` at every scrape, on the reactor thread, for pull-style series.

        It returns or yields prometheus_client families (``GaugeMetricFamily``,
        ``CounterMetricFamily``...); an exception is logged and drops only its series.
        """
        with self._lock:
            if collect in self._collectors:
                return
            wrapper = self._collectors[collect] = _CallbackCollector(collect, self.shard)
        self.registry.register(wrapper)

    def unregister_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        with self._lock:
            wrapper = self._collectors.pop(collect, None)
        if wrapper is not None:
            self.registry.unregister(wrapper)


_registries: weakref.WeakKeyDictionary[Reactor, ShardMetrics] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def shard_registry(reactor: Reactor | None = None) -> ShardMetrics:
    """This shard's :class:`ShardMetrics` (the calling reactor's, unless one is given).

    Raises NotInShardError off a reactor thread; other threads of a shard
    keep the metric objects they were given instead (they are thread-safe).
    """
    if reactor is None:
        reactor = require_reactor()
    with _registries_lock:
        metrics = _registries.get(reactor)
        if metrics is None:
            metrics = _registries[reactor] = ShardMetrics(reactor.shard_id)
    return metrics


# ---------------------------------------------------------------- gathering


class Snapshot:
    """One gather of a whole group: merged families, one per name, samples of every shard."""

    def __init__(self, families: list[Metric], up: dict[int, bool]) -> None:
        self.families = families
        """prometheus_client ``Metric`` objects, each with the samples of every shard."""
        self.up = up
        """Which shards answered in time."""

    def collect(self) -> list[Metric]:
        """The families (so a Snapshot is a registry for prometheus_client's renderers)."""
        return self.families

    def text(self) -> str:
        """The Prometheus text exposition."""
        from prometheus_client import generate_latest

        return generate_latest(self).decode()

    def value(self, sample: str, **labels: Any) -> float:
        """The sum of the samples named ``sample`` whose labels include ``labels``.

        ``snapshot.value("shardio_fabric_sent_messages_total", shard=0, peer=1)``;
        KeyError if no sample matches.
        """
        wanted = {key: str(value) for key, value in labels.items()}
        found = [s.value for family in self.families for s in family.samples
                 if s.name == sample and wanted.items() <= s.labels.items()]
        if not found:
            raise KeyError(f"no sample {sample} with labels {wanted}")
        return sum(found)


def collect(group: ShardGroup, timeout: float = DEFAULT_TIMEOUT) -> Snapshot:
    """Gather every shard's samples (concurrently, within ``timeout``) and the owner's.

    Call it from any thread of the process that owns ``group``, not from a shard.
    """
    from prometheus_client import Metric

    if current_reactor() is not None:
        raise WrongThreadError("metrics.collect() waits for every shard: call it from a thread "
                               "of the group's owner, not from a reactor")
    up, sources = _gather(group, timeout)
    head, tail = _Families(), _Families()
    for shard, answered in up.items():
        head.gauge("shardio_shard_up",
                   "1 when the shard answered the scrape in time, 0 when it did not or is dead.",
                   1 if answered else 0, shard=str(shard))
    _owner_series(tail, group)
    merged: dict[str, Metric] = {}
    for families in [head.wire(), *sources, tail.wire()]:
        for name, kind, help, unit, samples in families:
            metric = merged.get(name)
            if metric is None:
                metric = merged[name] = Metric(name, help, kind, unit)
            elif metric.type != kind:
                log.warning("metric family %s is both %s and %s on different shards; "
                            "dropped the %s samples", name, metric.type, kind, kind)
                continue
            for sample, labels, value in samples:
                metric.add_sample(sample, labels, value)
    return Snapshot(list(merged.values()), up)


def _gather(group: ShardGroup, timeout: float) -> tuple[dict[int, bool], list[list[Family]]]:
    """Ask every live shard at once; which answered in time, and their families."""
    futures: dict[int, concurrent.futures.Future] = {}
    for shard in range(group.shards):
        if group.is_alive(shard):
            try:
                futures[shard] = group.submit(shard, _shard_families)
            except ShardioError:
                pass  # died or stopping meanwhile: it shows as down
    done, _ = concurrent.futures.wait(futures.values(), timeout)
    up: dict[int, bool] = {}
    sources: list[list[Family]] = []
    for shard in range(group.shards):
        future = futures.get(shard)
        if future is None:
            up[shard] = False
        elif future not in done:
            up[shard] = False
            future.cancel()
            log.warning("shard %d did not answer the metrics scrape within %.3g s",
                        shard, timeout)
        elif future.exception() is not None:
            up[shard] = False
            if not isinstance(future.exception(), ShardDied):
                log.error("gathering the metrics of shard %d failed: %r", shard,
                          future.exception())
        else:
            up[shard] = True
            sources.append(future.result())
    return up, sources


def _owner_series(out: _Families, group: ShardGroup) -> None:
    owner = group._owner
    if owner is None or not group.running:
        return
    out.counter("shardio_external_submissions", _REACTOR_COUNTERS[-1][2],
                sum(link.sent_messages for link in owner.links), shard=OUTSIDE)
    out.gauge("shardio_external_in_flight",
              "Calls submitted from outside that wait for their result.",
              owner.in_flight(), shard=OUTSIDE)
    try:
        for link in owner.links:
            _link_series(out, link, OUTSIDE, str(link.peer))
    except ValueError:
        pass  # the group is closing its rings under us


# ---------------------------------------------------------------- the endpoint


class _GroupView:
    """What prometheus_client's WSGI app renders: one gather per scrape."""

    def __init__(self, group: ShardGroup, timeout: float,
                 names: frozenset[str] | None = None) -> None:
        self.group = group
        self.timeout = timeout
        self.names = names

    def collect(self) -> list[Metric]:
        families = collect(self.group, self.timeout).families
        if self.names is None:
            return families
        return [f for f in families
                if f.name in self.names or any(s.name in self.names for s in f.samples)]

    def restricted_registry(self, names: Iterable[str]) -> _GroupView:
        """For ``/metrics?name[]=...``."""
        return _GroupView(self.group, self.timeout, frozenset(names))


class MetricsServer:
    """The group's ``/metrics`` over HTTP, on threads of the owner process."""

    def __init__(self, group: ShardGroup, port: int, host: str = "127.0.0.1",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        from wsgiref.simple_server import make_server

        from prometheus_client import make_wsgi_app

        server, server6, handler = _server_classes()
        try:
            self._httpd = make_server(host, port, make_wsgi_app(_GroupView(group, timeout)),
                                      server6 if ":" in host else server, handler_class=handler)
        except OSError as error:
            raise OSError(error.errno, f"cannot serve /metrics on {host}:{port}: "
                                       f"{error.strerror}") from error
        self.host = host
        self.port: int = self._httpd.server_address[1]
        """The bound port (useful when 0 was asked for)."""
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="shardio-metrics", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, wait for scrapes in progress, release the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()  # joins the request threads (block_on_close)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def serve_group_metrics(group: ShardGroup, port: int, host: str = "127.0.0.1",
                        timeout: float = DEFAULT_TIMEOUT) -> MetricsServer:
    """Serve ``GET /metrics`` for ``group`` on ``host:port`` (0: any free port)."""
    return MetricsServer(group, port, host, timeout)


@functools.cache
def _server_classes() -> tuple[type, type, type]:
    """Made on first use: shards import this module and never serve HTTP."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        block_on_close = True  # close() waits for scrapes in progress (bounded by the timeout)

    class Server6(Server):
        address_family = socket.AF_INET6

    class QuietHandler(WSGIRequestHandler):
        timeout = 10  # seconds a silent client may hold a request thread (and close())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Server, Server6, QuietHandler
