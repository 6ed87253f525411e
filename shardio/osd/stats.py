"""Per-shard OSD counters: plain ints and fixed-bucket histograms.

One ``OSDStats`` lives on every shard; the messenger and the shard's OSD
service bump it on the hot path (attribute and dict increments only), and
``snapshot()`` turns it into plain data that crosses the fabric and is summed
over shards with ``merge()``. The names follow Prometheus conventions, so a
metrics layer can export them as they are: counters end in ``_total``,
sizes in ``_bytes``, latency histograms are in seconds with cumulative
``le`` buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from shardio.net.connection import ConnectionCounters

from .protocol import Op, Status

__all__ = ["LATENCY_BUCKETS", "Histogram", "OSDStats", "merge", "op_name", "status_name"]

#: Upper bounds (seconds) of the latency buckets (shardio.metrics' own); then +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_OP_NAMES = {int(op): op.name.lower() for op in Op}
_STATUS_NAMES = {int(s): s.name for s in Status}


def op_name(op: int) -> str:
    """'read', 'stat', ... or 'op<N>' for an unknown code."""
    return _OP_NAMES.get(op, f"op{op}")


def status_name(status: int) -> str:
    """'OK', 'ENOENT', ... or 'E<N>' for an errno outside ``Status``."""
    return _STATUS_NAMES.get(status, f"E{status}")


class Histogram:
    """Counts of observations per bucket (not cumulative), their sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """``count`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """[(le, observations <= le)], ending with (inf, count): Prometheus' buckets."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float:
        """An upper bound for the q-quantile (the bucket bound it falls in)."""
        total = self.count
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Histogram:
        h = cls(tuple(d["bounds"]))
        h.counts = list(d["counts"])
        h.sum = float(d["sum"])
        return h


class OSDStats(ConnectionCounters):
    """The counters of one shard's OSD: the connection core's, and the OSD's own."""

    __slots__ = (
        "ops", "latency", "hops_out", "hops_in",
        "frame_errors", "protocol_closes",
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[tuple[int, int], int] = {}  #: (op, status) -> count
        self.latency: dict[int, Histogram] = {}  #: op -> service time on this shard
        self.hops_out = 0  #: requests this shard forwarded to the owning shard
        self.hops_in = 0  #: requests this shard served for another shard
        self.frame_errors: dict[str, int] = {}  #: FrameError class name -> count
        self.protocol_closes = 0  #: connections closed for a fatal frame error

    def op_done(self, op: int, status: int, seconds: float, count: int = 1) -> None:
        """``count`` requests of ``op`` answered with ``status``, each in ``seconds``."""
        key = (op, status)
        ops = self.ops
        ops[key] = ops.get(key, 0) + count
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = Histogram()
        h.observe(seconds, count)

    def frame_error(self, kind: str) -> None:
        self.frame_errors[kind] = self.frame_errors.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain, picklable data: counters by name, ops and latency keyed by names."""
        out: dict[str, Any] = {
            name: getattr(self, name)
            for name in (*ConnectionCounters.__slots__, *OSDStats.__slots__)
            if name not in ("ops", "latency", "frame_errors")
        }
        out["ops"] = {f"{op_name(op)}/{status_name(st)}": n for (op, st), n in self.ops.items()}
        out["latency"] = {op_name(op): h.to_dict() for op, h in self.latency.items()}
        out["frame_errors"] = dict(self.frame_errors)
        return out


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum ``snapshot()`` dicts of several shards (extra int fields are summed too)."""
    total: dict[str, Any] = {}
    for snap in snapshots:
        for key, value in snap.items():
            if key == "shard":
                continue
            if key == "latency":
                hists = total.setdefault("latency", {})
                for op, hd in value.items():
                    h = Histogram.from_dict(hd)
                    if op in hists:
                        acc = hists[op]
                        acc["counts"] = [
                            a + b for a, b in zip(acc["counts"], h.counts, strict=True)
                        ]
                        acc["sum"] += h.sum
                    else:
                        hists[op] = h.to_dict()
            elif isinstance(value, dict):
                acc_d = total.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        acc_d[k] = acc_d.get(k, 0) + v
                    else:
                        acc_d.setdefault(k, v)  # a label such as the I/O driver's kind
            elif isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def prometheus_families(snap: Mapping[str, Any]) -> list[Any]:
    """One shard's ``ShardNode.snapshot()`` as prometheus_client metric families.

    Registered as a pull-style collector on the shard's metrics registry, so
    the hot path only bumps plain ints; the ``shard`` label is added by
    ``shardio.metrics`` when the samples are gathered.
    """
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.utils import floatToGoString

    out: list[Any] = []

    def counter(name: str, help: str, value: float) -> None:
        out.append(CounterMetricFamily(name, help, value=value))

    def gauge(name: str, help: str, value: float) -> None:
        out.append(GaugeMetricFamily(name, help, value=value))

    ops = CounterMetricFamily(
        "shardio_osd_ops",
        "OSD requests answered by this shard, by op and reply status.",
        labels=["op", "status"],
    )
    for key, n in sorted(snap.get("ops", {}).items()):
        op, _, status = key.partition("/")
        ops.add_metric([op, status], n)
    out.append(ops)
    lat = HistogramMetricFamily(
        "shardio_osd_op_latency_seconds",
        "Time from decoding a request to queueing its reply, on the accepting shard "
        "(cross-shard hop included).",
        labels=["op"],
    )
    for op, hd in sorted(snap.get("latency", {}).items()):
        h = Histogram.from_dict(hd)
        buckets = [(floatToGoString(le), n) for le, n in h.cumulative()]
        lat.add_metric([op], buckets, h.sum)
    out.append(lat)
    hops = CounterMetricFamily(
        "shardio_osd_hops",
        "Cross-shard hops: requests forwarded to their pg's shard (out) or served for "
        "another shard (in).",
        labels=["direction"],
    )
    hops.add_metric(["out"], snap.get("hops_out", 0))
    hops.add_metric(["in"], snap.get("hops_in", 0))
    out.append(hops)
    counter(
        "shardio_osd_received_bytes",
        "Request bytes read from client sockets.",
        snap.get("bytes_received", 0),
    )
    counter(
        "shardio_osd_sent_bytes",
        "Reply bytes written to client sockets.",
        snap.get("bytes_sent", 0),
    )
    counter(
        "shardio_osd_read_bytes",
        "Object bytes returned by READ on this shard's store.",
        snap.get("read_bytes", 0),
    )
    counter(
        "shardio_osd_written_bytes",
        "Object bytes PUT/WRITE appended to this shard's store (counted at the append).",
        snap.get("written_bytes", 0),
    )
    counter(
        "shardio_osd_connections_accepted",
        "Client connections accepted.",
        snap.get("connections_accepted", 0),
    )
    counter(
        "shardio_osd_connections_refused",
        "Connections closed at once: over the limit.",
        snap.get("connections_refused", 0),
    )
    gauge(
        "shardio_osd_connections", "Client connections open now.", snap.get("connections_open", 0)
    )
    gauge(
        "shardio_osd_ops_waiting",
        "Requests waiting now: parked in the store, sent to another shard, or throttled.",
        snap.get("ops_waiting", 0),
    )
    gauge(
        "shardio_osd_slow_ops",
        "Requests that have waited longer than the complaint time (see dump_ops_in_flight).",
        snap.get("slow_ops", 0),
    )
    errors = CounterMetricFamily(
        "shardio_osd_frame_errors",
        "Bad request frames, by kind (protocol error class).",
        labels=["kind"],
    )
    for kind, n in sorted(snap.get("frame_errors", {}).items()):
        errors.add_metric([kind], n)
    out.append(errors)
    counter(
        "shardio_osd_protocol_closes",
        "Connections closed for a fatal frame error.",
        snap.get("protocol_closes", 0),
    )
    pauses = CounterMetricFamily(
        "shardio_osd_backpressure_pauses",
        "Times a connection stopped reading: too much in flight, or replies not read.",
        labels=["reason"],
    )
    pauses.add_metric(["inflight"], snap.get("inflight_pauses", 0))
    pauses.add_metric(["write_buffer"], snap.get("write_pauses", 0))
    out.append(pauses)
    counter(
        "shardio_osd_replies_dropped",
        "Replies not sent: their connection had closed.",
        snap.get("replies_dropped", 0),
    )
    store = snap.get("store")
    if store:
        gauge("shardio_osd_store_objects", "Objects in this shard's store.", store["objects"])
        gauge("shardio_osd_store_live_bytes", "Sum of the object sizes.", store["live_bytes"])
        gauge(
            "shardio_osd_store_log_bytes", "Bytes in the store's segment files.", store["log_bytes"]
        )
        gauge("shardio_osd_store_segments", "Segment files.", store["segments"])
        counter("shardio_osd_store_fsyncs", "fsync/fdatasync calls of the store.", store["fsyncs"])
        counter(
            "shardio_osd_store_commit_batches",
            "Group commits (one fsync acknowledging one or more writes).",
            store["commit_batches"],
        )
        counter(
            "shardio_osd_store_corrupt_reads",
            "Reads refused with EIO: a checksum or identity check failed.",
            store["corrupt_reads"],
        )
    return out
