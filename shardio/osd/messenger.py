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
   otherwise it runs here. Either way the owning shard runs the store
   operation on a tame stack.
3. Replies completed during one pass of the loop leave in one
   ``writelines`` (one send for many pipelined replies).

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
on; a fatal one gets an error reply when its tid is known, then the
connection is closed. A connection that ends inside a frame is closed.
Nothing a peer sends can raise out of the protocol callbacks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from shardio import tame
from shardio.errors import ShardDied
from shardio.tame.stacks import checkpoint

from .inflight import STAGE_HOP, STAGE_STORE, STAGE_THROTTLED, OpInFlight, OpsInFlight
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
    encode_frame_parts,
)
from .stats import OSDStats

__all__ = ["Limits", "Node", "OSDConnection", "Result", "listen"]

log = logging.getLogger("shardio.osd.messenger")

#: What an executed request gives back: (status, payload, reply length field, reply flags).
Result = tuple[int, bytes, int, int]

_REPLY_OVERHEAD = 128  # header + bookkeeping charged per request

_perf_counter = time.perf_counter


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-shard limits of the messenger (see the module docstring)."""

    max_inflight: int = 64
    max_inflight_bytes: int = 64 << 20
    write_high_water: int = 1 << 20
    max_connections: int = 1024
    max_payload: int = MAX_PAYLOAD
    max_read: int = 16 << 20
    max_list: int = 1024
    listen_backlog: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "max_inflight", "max_inflight_bytes", "write_high_water", "max_connections",
            "max_read", "max_list", "listen_backlog",
        ):  # fmt: skip
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
    connections: set[OSDConnection]
    ops_in_flight: OpsInFlight

    def enter(self) -> None:
        """A run of store operations starts on a tame stack."""
        ...

    def leave(self) -> None:
        """That run ends."""
        ...

    def run_op(self, op: int, name: bytes, offset: int, length: int, payload: bytes) -> Result:
        """Run a request on this shard's store (the owner of its pg), on a tame stack."""
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


class OSDConnection(asyncio.Protocol):
    """One client connection on the shard that accepted it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.stats = node.stats
        limits = node.limits
        self.max_inflight = limits.max_inflight
        self.max_bytes = limits.max_inflight_bytes
        self.max_read = limits.max_read
        self.list_charge = limits.max_list * (MAX_NAME + 2)
        self.decoder = FrameDecoder(max_payload=limits.max_payload)
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peer: Any = None
        self.inflight = 0
        self.charged = 0
        self.backlog: deque[Frame] = deque()
        self.reading_paused = False
        self.write_paused = False
        self.eof = False
        self.closing = False
        self.refused = False
        self.local: deque[tuple[Frame, int, float]] = deque()  # (frame, charge, started)
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._settle_scheduled = False
        self._in_pass = False  # the loop is inside _feed/_settle: it flushes at the end
        self._stack_wanted = False  # a task waits for a tame stack to run self.local
        self._current: tuple[Frame, int, float] | None = None  # the last request a stack took
        self.high_water = limits.write_high_water

    # -- transport callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        node = self.node
        stats = self.stats
        if len(node.connections) >= node.limits.max_connections:
            stats.connections_refused += 1
            self.refused = True
            transport.abort()
            return
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.peer = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=node.limits.write_high_water)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        node.connections.add(self)
        stats.connections_accepted += 1
        stats.connections_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.node.connections.discard(self)
        self.stats.connections_open -= 1
        self.transport = None
        self.closing = True
        self._drop_backlog()
        self._out.clear()
        self._out_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.stats.bytes_received += len(data)
        try:
            self._feed(data)
        except Exception:  # a bug, not the peer's bytes: keep the shard serving
            log.exception("OSD connection from %s: internal error; closing it", self.peer)
            self.abort()

    def eof_received(self) -> bool:
        """The peer shut down its sending side: finish the requests in flight, then close."""
        try:
            self.decoder.eof()
        except Truncated as exc:
            self._bad_frame(exc)
            return False
        self.eof = True
        if self.inflight == 0 and not self.backlog:
            self._flush()
            return False  # the transport closes itself
        return True  # keep it open to send the replies still due

    def pause_writing(self) -> None:
        """The write buffer is over the high-water mark: the peer does not read."""
        self.write_paused = True
        self.stats.write_pauses += 1
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._drain_backlog()

    # -- requests ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        decoder = self.decoder
        submit = self._submit
        self._in_pass = True
        while True:
            try:
                frames = decoder.feed(data)
            except FrameError as exc:
                for frame in exc.frames:
                    submit(frame)
                self._bad_frame(exc)
                if exc.fatal or self.closing:
                    self._in_pass = False
                    return
                data = b""  # the bad frame was skipped: decode the rest
                continue
            for frame in frames:
                submit(frame)
            break
        self._settle()

    def _charge(self, frame: Frame) -> int:
        op = frame.op
        if op == _READ:
            length = frame.length
            max_read = self.max_read
            return (length if 0 < length < max_read else max_read) + _REPLY_OVERHEAD
        if op == _LIST:
            return self.list_charge
        return len(frame.payload) + len(frame.name) + _REPLY_OVERHEAD

    def _submit(self, frame: Frame) -> None:
        if self.backlog or self.write_paused or not self._has_room(frame):
            self.backlog.append(frame)
            self.node.ops_in_flight.track(id(frame), self._record(frame, STAGE_THROTTLED))
            if not self.reading_paused:
                self.stats.inflight_pauses += 1
            self._pause_reading()
            return
        self._start(frame)

    def _has_room(self, frame: Frame) -> bool:
        if self.inflight == 0:
            return True
        return self.inflight < self.max_inflight and (
            self.charged + self._charge(frame) <= self.max_bytes
        )

    def _record(self, frame: Frame, stage: str, started: float | None = None) -> OpInFlight:
        return OpInFlight(
            frame.op, frame.name, frame.pool, frame.tid, self.peer, stage,
            _perf_counter() if started is None else started,
        )  # fmt: skip

    def _start(self, frame: Frame) -> None:
        op = frame.op
        node = self.node
        if frame.flags & FLAG_REPLY:
            self._reply_now(frame, Status.EINVAL)
            return
        if op in _OBJECT_OPS:
            try:
                owner = node.osdmap.shard_for(frame.name, frame.pool)
            except OSDMapError:  # UnknownPool
                self._reply_now(frame, Status.EINVAL)
                return
        elif op == _LIST:
            try:
                owner = node.osdmap.shard_of_pg(frame.offset, frame.pool)
            except OSDMapError:
                self._reply_now(frame, Status.EINVAL)
                return
        elif op == _GET_MAP:
            self._reply_now(frame, Status.OK, node.map_payload)
            return
        elif op == _PING:
            self._reply_now(frame, Status.OK, frame.payload)
            return
        else:  # the decoder refuses unknown ops; be safe anyway
            self._reply_now(frame, Status.EOPNOTSUPP)
            return
        charge = self._charge(frame)
        self.inflight += 1
        self.charged += charge
        if owner == node.shard_id:
            self.local.append((frame, charge, _perf_counter()))
        else:
            started = _perf_counter()
            node.ops_in_flight.track(
                id(frame), self._record(frame, STAGE_HOP.format(shard=owner), started)
            )
            done = partial(self._hop_finished, frame, charge, started)
            fut = node.forward(
                owner, op, frame.name, frame.offset, frame.length, frame.payload, frame.pool
            )
            fut.add_done_callback(partial(_future_outcome, done))

    def _hop_finished(
        self,
        frame: Frame,
        charge: int,
        started: float,
        result: Any,
        error: BaseException | None,
    ) -> None:
        self.node.ops_in_flight.untrack(id(frame))
        self._finished(frame.op, frame.tid, charge, started, result, error)

    # -- local requests on tame stacks ------------------------------------------

    def _run_local(self) -> None:
        """Run the queued local requests on tame stacks, from the loop.

        One stack takes requests in order and runs the store code for each
        (``_drain_local``). When a request parks that stack (a cold read),
        the next ones go on another stack at once, so one slow request does
        not hold up those behind it. All of it shares the loop turn's tame
        quota: once the turn has spent it, a running stack yields at its
        next request and no new one starts until the loop has run.
        """
        local = self.local
        while local and not self.closing:
            finished = tame.start(self._drain_local)
            if finished is None:  # not now: the turn's quota is spent, or no stack is free
                if tame.turn_spent():
                    self._schedule_settle()
                else:
                    self._waiting_for_stack()
                return
            if finished:
                return
            parked = self._current
            if parked is not None:  # parked inside the store (not between requests)
                frame, _charge, started = parked
                self.node.ops_in_flight.track(
                    id(parked), self._record(frame, STAGE_STORE, started)
                )
            if tame.turn_spent():
                self._schedule_settle()  # the rest after the loop has run
                return
            # a request parked its stack: carry on with the next on another one

    def _drain_local(self) -> None:
        """On a tame stack: run queued local requests in order until none are left
        (yielding to the loop between them whenever the turn's quota is spent)."""
        local = self.local
        node = self.node
        run_op = node.run_op
        finished = self._finished
        waiting = node.ops_in_flight.ops
        node.enter()
        try:
            while local:
                item = self._current = local.popleft()
                frame, charge, started = item
                op = frame.op
                try:
                    result = run_op(op, frame.name, frame.offset, frame.length, frame.payload)
                except Exception as exc:  # apply_op turns store errors into statuses
                    result, error = None, exc
                else:
                    error = None
                self._current = None
                if waiting:  # it may have parked (and been recorded) meanwhile
                    waiting.pop(id(item), None)
                finished(op, frame.tid, charge, started, result, error)
                if local:
                    checkpoint()
        finally:
            node.leave()
        if not self._in_pass:
            self._schedule_settle()  # resumed outside a loop pass: flush, admit, close

    def _waiting_for_stack(self) -> None:
        if not self._stack_wanted:
            self._stack_wanted = True
            task = asyncio.get_running_loop().create_task(tame.call(self._drain_on_granted_stack))
            task.add_done_callback(_log_task_failure)

    def _drain_on_granted_stack(self) -> None:
        self._stack_wanted = False
        self._drain_local()

    def _finished(
        self,
        op: int,
        tid: int,
        charge: int,
        started: float,
        result: Any,
        error: BaseException | None,
    ) -> None:
        self.inflight -= 1
        self.charged -= charge
        if error is None:
            status, payload, length, flags = result
        elif isinstance(error, ShardDied | asyncio.CancelledError):
            status, payload, length, flags = Status.ESHUTDOWN, b"", 0, 0
        else:
            log.error("OSD %s request tid %d failed: %r", Op(op).name, tid, error)
            status, payload, length, flags = Status.EIO, b"", 0, 0
        self.stats.op_done(op, status, _perf_counter() - started)
        if self.transport is None or self.closing:
            self.stats.replies_dropped += 1
        else:
            self._queue_reply(op, tid, status, payload, length, flags)
        if not self._in_pass:
            self._schedule_settle()

    def _schedule_settle(self) -> None:
        if not self._settle_scheduled:
            self._settle_scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self._settle_soon)

    def _settle_soon(self) -> None:
        self._settle_scheduled = False
        self._in_pass = True
        self._settle()

    def _settle(self) -> None:
        """End of a loop pass over this connection: run what is runnable, start
        what the limits now admit, send the replies in one write, close after EOF.
        Called with ``_in_pass`` set; clears it."""
        try:
            backlog = self.backlog
            while True:
                if self.local and not self.closing:
                    self._run_local()
                if not backlog or self.write_paused or self.closing:
                    break
                frame = backlog[0]
                if not self._has_room(frame):
                    break
                backlog.popleft()
                self.node.ops_in_flight.untrack(id(frame))
                self._start(frame)
        finally:
            self._in_pass = False
        if self._out:
            self._flush()
        if not backlog and not self.write_paused and not self.closing:
            if self.eof:
                if self.inflight == 0:
                    self._close_when_flushed()
            elif self.reading_paused:
                self.reading_paused = False
                if self.transport is not None:
                    self.transport.resume_reading()

    def _drain_backlog(self) -> None:
        self._in_pass = True
        self._settle()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.eof:
            self.reading_paused = True
            self.transport.pause_reading()

    # -- replies ----------------------------------------------------------------

    def _reply_now(self, frame: Frame, status: int, payload: bytes = b"") -> None:
        """Reply to a request answered without a store op (GET_MAP, PING, refusals)."""
        self.stats.op_done(frame.op, status, 0.0)
        self._queue_reply(frame.op, frame.tid, status, payload, 0, 0)

    def _queue_reply(
        self, op: int, tid: int, status: int, payload: bytes, length: int, flags: int
    ) -> None:
        head, body = encode_frame_parts(
            op, tid, payload=payload, status=status, length=length, flags=flags | FLAG_REPLY
        )
        out = self._out
        out.append(head)
        self._out_bytes += len(head)
        if body:
            out.append(body)  # type: ignore[arg-type]
            self._out_bytes += len(body)
        if self._out_bytes >= self.high_water:
            # Replies of ops that did not block pile up within one data_received:
            # hand them to the transport now, so that its high-water mark (and
            # pause_writing) bounds them, not the size of the client's pipeline.
            self._flush()
        elif not self._in_pass:
            self._schedule_settle()

    def _flush(self) -> None:
        out = self._out
        transport = self.transport
        if transport is None:
            out.clear()
            self._out_bytes = 0
            return
        self.stats.bytes_sent += self._out_bytes
        self._out_bytes = 0
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        out.clear()

    def _bad_frame(self, exc: FrameError) -> None:
        self.stats.frame_error(type(exc).__name__)
        if exc.tid is not None:
            op = exc.op if exc.op is not None and 0 <= exc.op < 256 else 0
            self.stats.op_done(op, exc.status, 0.0)
            self._queue_reply(op, exc.tid, exc.status, b"", 0, 0)
        if exc.fatal:
            self.stats.protocol_closes += 1
            self._close_when_flushed()

    def _close_when_flushed(self) -> None:
        """Send what is queued, then close (the transport flushes its buffer first)."""
        if self._out:
            self._flush()
        self.closing = True
        self._drop_backlog()
        if self.transport is not None:
            self.transport.close()

    def _drop_backlog(self) -> None:
        untrack = self.node.ops_in_flight.untrack
        for frame in self.backlog:
            untrack(id(frame))
        self.backlog.clear()

    def abort(self) -> None:
        """Drop the connection now (shutdown, internal error)."""
        self.closing = True
        self._drop_backlog()
        self._out.clear()
        self._out_bytes = 0
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        return (
            f"<OSDConnection {self.peer} inflight={self.inflight} backlog={len(self.backlog)} "
            f"paused={self.reading_paused}>"
        )


def _future_outcome(done: Callable[[Any, BaseException | None], None], fut: asyncio.Future) -> None:
    if fut.cancelled():
        done(None, asyncio.CancelledError())
    elif fut.exception() is not None:
        done(None, fut.exception())
    else:
        done(fut.result(), None)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("OSD requests waiting for a tame stack failed", exc_info=task.exception())


async def listen(
    node: Node,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    backlog: int = 1024,
    factory: Callable[[Node], asyncio.Protocol] = OSDConnection,
) -> tuple[asyncio.AbstractServer, int]:
    """Bind a listening socket for ``node`` (not serving yet); return (server, bound port).

    ``port`` 0 binds a free port. With ``reuse_port`` the socket joins an
    ``SO_REUSEPORT`` group: every shard binds the same port and the kernel
    spreads incoming connections over them.
    """
    loop = asyncio.get_running_loop()
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve listen address {host!r}")
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        server = await loop.create_server(
            lambda: factory(node), sock=sock, backlog=backlog, start_serving=False
        )
    except BaseException:
        sock.close()
        raise
    return server, bound
