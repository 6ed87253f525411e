"""The OSD messenger: per-shard listeners and the connection protocol.

Every shard listens on its own port and, with ``SO_REUSEPORT``, on one
shared port (the kernel spreads the shared port's connections over the
shards' sockets). A connection lives on the shard that accepted it:

1. ``data_received`` feeds the incremental ``FrameDecoder``; every complete
   request frame is started at once (pipelining: many requests in flight
   per connection; replies go out as they complete, out of order, matched
   by ``tid``).
2. The request's placement group comes from the OSD map; if another shard
   owns it, the request crosses with ``submit_to`` (a *hop*, counted),
   otherwise it runs here, in a batch on a tame stack that calls the
   unmodified store for each (``shardio.net.connection``, the connection
   core this protocol is built on).
3. Replies completed during one pass of the loop leave in one
   ``writelines`` (one send for many pipelined replies); the pass records
   its requests in the shard's op counters and latency histograms at its
   end, once per (op, status, arrival), the latency ending at that write.

Op semantics beyond ``protocol``'s table: a READ with ``length`` 0 reads to
the end of the object (up to the server's ``max_read``); a request frame
with ``FLAG_REPLY`` set, an unknown pool or a LIST of a pg out of range gets
EINVAL; a request for a pg whose shard has died gets ESHUTDOWN.

Backpressure (per connection, so one client cannot take a shard's memory):

* at most ``max_inflight`` requests and ``max_inflight_bytes`` of expected
  reply bytes (a READ is charged ``min(length or max_read, max_read)``, a
  PUT/WRITE its payload) are in flight; further decoded frames wait in a
  backlog and the transport stops reading until replies complete;
* when the transport's write buffer passes ``write_high_water`` (a client
  that does not read its replies), reading stops and no backlog frame is
  started until the buffer drains.

So a connection holds at most one partial frame (``max_payload``), the
frames of one socket read, ``max_inflight_bytes`` in flight and about as
much again in the write buffer; the number of connections per shard is
capped by ``max_connections`` (further ones are closed at once).

Bad frames follow ``FrameError``: a non-fatal one (bad body CRC, unknown
op, bad flags) gets an error reply with its tid and the connection carries
on; a fatal one gets an error reply when its tid is known, reading stops,
the requests before it are answered and the connection is closed. A connection that ends inside a frame is closed.
Nothing a peer sends can raise out of the protocol callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from shardio.errors import ShardDied
from shardio.net import (
    STAGE_SENT,
    ConnectionLimits,
    Entry,
    TameBatchConnection,
    WaitingRequests,
)

from .objectstore import ObjectStore
from .operations import Result, apply_op as _apply_op
from .osdmap import OSDMap, OSDMapError
from .protocol import (
    FLAG_REPLY,
    MAX_NAME,
    MAX_PAYLOAD,
    OBJECT_OPS as _OBJECT_OPS,
    OP_GET_MAP as _GET_MAP,
    OP_LIST as _LIST,
    OP_PING as _PING,
    OP_READ as _READ,
    Frame,
    FrameDecoder,
    FrameError,
    Op,
    Status,
    Truncated,
    encode_reply_parts as _reply,
)
from .stats import OSDStats

__all__ = ["Limits", "Node", "OSDConnection"]

log = logging.getLogger("shardio.osd.messenger")

_REPLY_OVERHEAD = 128  # header + bookkeeping charged per request

_perf_counter = time.perf_counter


@dataclass(frozen=True)
class Limits(ConnectionLimits):
    """Per-connection and per-shard limits of the messenger (see the module docstring)."""

    max_payload: int = MAX_PAYLOAD
    max_read: int = 16 << 20
    max_list: int = 1024
    listen_backlog: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_read", "max_list", "listen_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_payload <= MAX_PAYLOAD:
            raise ValueError(f"Limits.max_payload must be in 0..{MAX_PAYLOAD}")


class Node(Protocol):
    """What a connection needs from its shard's OSD service (``server.ShardNode``)."""

    shard_id: int
    osdmap: OSDMap
    map_payload: bytes
    stats: OSDStats
    limits: Limits
    connections: set[Any]
    waiting: WaitingRequests
    #: the shard's store while it is open (None before, and once stopped)
    store: ObjectStore | None

    def enter(self) -> None:
        """A run of store operations starts on a tame stack."""
        ...

    def leave(self) -> None:
        """That run ends."""
        ...

    def forward(
        self,
        shard: int,
        op: int,
        name: bytes,
        offset: int,
        length: int,
        payload: bytes,
        pool: int,
    ) -> asyncio.Future[Result]:
        """Run a request on the shard that owns its pg (the cross-shard hop)."""
        ...


class OSDConnection(TameBatchConnection):
    """One client connection on the shard that accepted it: the OSD's wire protocol."""

    __slots__ = ("max_read", "max_list", "list_charge", "decoder", "_lane_done", "_done")

    service: Node

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        limits = node.limits
        self.max_read = limits.max_read
        self.max_list = limits.max_list
        self.list_charge = limits.max_list * (MAX_NAME + 2)
        self.decoder = FrameDecoder(max_payload=limits.max_payload)
        # Requests answered since the pass began, recorded in the shard's counters at
        # its end, once per key: the lane's (all arrived at _lane_started) keyed by
        # ``status << 8 | op`` (an int hashes and compares for a fraction of what a
        # tuple with a float costs: ~800 instructions per read), the others by
        # (op, status, started).
        self._lane_done: defaultdict[int, int] = defaultdict(int)
        self._done: defaultdict[tuple[int, int, float], int] = defaultdict(int)

    # -- decoding -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        decoder = self.decoder
        while True:
            try:
                frames = decoder.feed(data)
            except FrameError as exc:
                self.admit_all(exc.frames)
                self._bad_frame(exc)
                if exc.fatal or self.closing:
                    return
                data = b""  # the bad frame was skipped: decode the rest
                continue
            self.admit_all(frames)
            return

    def feed_eof(self) -> None:
        try:
            self.decoder.eof()
        except Truncated as exc:
            self._bad_frame(exc)

    def _bad_frame(self, exc: FrameError) -> None:
        self.stats.frame_error(type(exc).__name__)
        if exc.tid is not None:
            op = exc.op if exc.op is not None and 0 <= exc.op < 256 else 0
            self.stats.op_done(op, exc.status, 0.0)
            self.reply_now(_reply(op, exc.tid, exc.status, b"", 0, 0))
        if exc.fatal:
            self.stats.protocol_closes += 1
            self.close_when_answered()

    # -- requests -------------------------------------------------------------------

    def charge(self, frame: Frame) -> int:
        op = frame.op
        if op == _READ:
            length = frame.length
            max_read = self.max_read
            return (length if 0 < length < max_read else max_read) + _REPLY_OVERHEAD
        if op == _LIST:
            return self.list_charge
        return len(frame.payload) + len(frame.name) + _REPLY_OVERHEAD

    def details(self, frame: Frame) -> dict[str, Any]:
        try:
            op_name = Op(frame.op).name
        except ValueError:
            op_name = str(frame.op)
        return {
            "op": op_name,
            "object": frame.name.decode("utf-8", "backslashreplace"),
            "pool": frame.pool,
            "tid": frame.tid,
        }

    def start(self, entry: Entry) -> None:
        # (an entry from the backlog: routed on the stack too, by serve)
        self.local.append(entry)  # run_here

    def serve(self, entry: Entry) -> list[bytes] | None:
        """An admitted entry, on a tame stack: ``run`` it with its own entry."""
        return self.run(entry.request, entry.started, entry)

    def run(
        self, frame: Frame, started: float, entry: Entry | None = None
    ) -> list[bytes] | None:
        """On a tame stack: route ``frame`` by the OSD map, run it on this shard's store
        (or send it to the shard that owns its pg) and encode its reply: the
        connection core's hot path, one call per request."""
        op, flags, tid, _status, pool, offset, length, name, payload = frame
        if flags & FLAG_REPLY:
            return self._answer(op, tid, Status.EINVAL)
        node = self.service
        if op in _OBJECT_OPS:
            try:
                owner = node.osdmap.shard_for(name, pool)
            except OSDMapError:  # UnknownPool
                return self._answer(op, tid, Status.EINVAL)
        elif op == _LIST:
            try:
                owner = node.osdmap.shard_of_pg(offset, pool)
            except OSDMapError:
                return self._answer(op, tid, Status.EINVAL)
        elif op == _GET_MAP:
            return self._answer(op, tid, Status.OK, node.map_payload)
        elif op == _PING:
            return self._answer(op, tid, Status.OK, payload)
        else:  # the decoder refuses unknown ops; be safe anyway
            return self._answer(op, tid, Status.EOPNOTSUPP)
        if owner == node.shard_id:
            # The store call itself, with no frame between (measured: ~700 instructions
            # per cached read; ShardNode.run_op is the same for other shards' hops).
            store = node.store
            if store is None:  # not open yet, or stopped
                status, payload, length, flags = Status.ESHUTDOWN, b"", 0, 0
            else:
                status, payload, length, flags = _apply_op(
                    store, op, name, offset, length, payload, self.max_list
                )
            if started == self._lane_started:
                self._lane_done[status << 8 | op] += 1  # (op: a u8)
            else:
                self._done[op, status, started] += 1
            return _reply(op, tid, status, payload, length, flags)
        stage = STAGE_SENT.format(shard=owner)
        if entry is None:
            entry = self.hold(frame, started, stage)
        else:
            self.wait_for(entry, stage)
        fut = node.forward(owner, op, name, offset, length, payload, pool)
        fut.add_done_callback(lambda fut: self._hop_done(entry, fut))
        return None

    def _hop_done(self, entry: Entry, fut: asyncio.Future[Result]) -> None:
        if fut.cancelled():
            result, error = None, asyncio.CancelledError()
        else:
            error = fut.exception()
            result = None if error is not None else fut.result()
        self.complete(entry, self.finish(entry, result, error))

    def finish(self, entry: Entry, result: Any, error: BaseException | None) -> list[bytes]:
        frame: Frame = entry.request
        op = frame[0]  # (frame.op: a descriptor call)
        if error is None:
            status, payload, length, flags = result
        elif isinstance(error, ShardDied | asyncio.CancelledError):
            status, payload, length, flags = Status.ESHUTDOWN, b"", 0, 0
        else:
            log.error("OSD %s request tid %d failed: %r", Op(op).name, frame.tid, error)
            status, payload, length, flags = Status.EIO, b"", 0, 0
        self._done[op, status, entry.started] += 1
        return _reply(op, frame[2], status, payload, length, flags)  # (frame[2]: its tid)

    def end_of_pass(self) -> None:
        lane_done = self._lane_done
        done = self._done
        if lane_done or done:
            # Each reply leaves in this pass's write: its latency ends now.
            now = _perf_counter()
            op_done = self.stats.op_done
            if lane_done:
                seconds = now - self._lane_started
                for key, count in lane_done.items():
                    op_done(key & 0xFF, key >> 8, seconds, count)
                lane_done.clear()
            for (op, status, started), count in done.items():
                op_done(op, status, now - started, count)
            done.clear()

    def _answer(self, op: int, tid: int, status: int, payload: bytes = b"") -> list[bytes]:
        """The reply to a request answered without a store op (GET_MAP, PING, refusals)."""
        self.stats.op_done(op, status, 0.0)
        return _reply(op, tid, status, payload, 0, 0)
