"""The connection core: a server connection whose requests run in batches on tame stacks.

Bytes arrive in the loop's protocol callback (``data_received``). The
subclass decodes every request that one socket read delivered and
``admit_all``\\ s them (one clock read for the lot); the core applies the
connection's limits and hands each
admitted request to the subclass's ``start``, which either answers it at
once, sends it elsewhere (another shard) and ``complete``\\ s it later, or
asks to ``run_here``. Requests run here queue on the connection and run in
order on a tame stack (``tame.start``: two greenlet switches for a whole
batch, no coroutine, future or loop callback per request), calling the
subclass's ``execute`` — plain blocking code, e.g. an unmodified store
through the TameEnv. When one parks its stack (a read that misses the page
cache, a write waiting for its sync), the requests behind it continue at
once on another stack. All of it shares the loop turn's tame quota: once
the turn has spent it, a stack yields at its next request and no new one
starts until the loop has run. The replies of one pass leave in one write;
``end_of_pass`` lets the protocol record the pass's statistics in one go
just before it.

The lane: a protocol whose replies leave as they complete may define ``run``
(route, do and encode one request, in one call). The requests of a socket
read are then not admitted one by one: they become the connection's lane,
and a tame stack takes them in order, calling ``run`` for each. A request
is admitted (an ``Entry``: charged, counted in flight, tracked with its
stage) only when it has to wait: its stack parks (the loop sees which
request and carries on with the rest on another stack) or ``run`` hands it
elsewhere with ``hold``. While anything is in flight, or the peer does not
read, the limits are checked as each request is taken; when they say stop,
the rest of the lane waits in the backlog like any request held back. A
stack resumed after parking finishes its request and stops there, so that
the loop starts the next stack and sees every park. (Measured: the lane cut
the OSD's cached read from 593 to 450 bytecodes, against gevent's 398;
``bench/bytecodes.py``.)

A request the protocol can answer at once, in the loop, without blocking
and without holding anything (a command on an in-memory table, a PING) is
not admitted at all when the connection has nothing in flight: a protocol
with ``inline = True`` answers it in ``answer`` and its reply joins the
pass's write directly (no entry, no charge, nothing to track or release),
which costs what a plain ``asyncio.Protocol`` pays. The first request it
cannot answer so, and every one behind it, takes the full path above.

Replies go out as they complete (a protocol whose replies carry a request
id) or, with ``ordered = True``, in request order (a protocol without ids:
each reply waits for those before it).

Limits (``ConnectionLimits``), so that one client cannot take a shard's
memory: at most ``max_inflight`` requests and ``max_inflight_bytes`` of
charged reply bytes are in flight; further requests wait in a backlog and
reading pauses; once the transport's write buffer passes
``write_high_water`` (a client that does not read its replies) reading
stops and no backlog request starts until it drains. A request that has to
wait (throttled, parked, or sent elsewhere) is recorded in the service's
``WaitingRequests`` with its stage; one that completes in the pass that
started it costs nothing to track.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar, Protocol

from shardio import tame
from shardio.tame.stacks import current_runtime

from .waiting import STAGE_RUNNING, STAGE_THROTTLED, WaitingRequests

__all__ = [
    "ConnectionCounters",
    "ConnectionLimits",
    "Entry",
    "Service",
    "TameBatchConnection",
]

log = logging.getLogger("shardio.net")

_perf_counter = time.perf_counter
_JOIN_LIMIT = 256 << 10  # a pass's replies up to this size are joined into one buffer


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection and per-service limits (see the module docstring)."""

    max_inflight: int = 64
    max_inflight_bytes: int = 64 << 20
    write_high_water: int = 1 << 20
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_inflight", "max_inflight_bytes", "write_high_water", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}"
                )


class ConnectionCounters:
    """What the core counts per service (a subclass adds its protocol's counters)."""

    __slots__ = (
        "bytes_received", "bytes_sent", "connections_accepted", "connections_open",
        "connections_refused", "inflight_pauses", "write_pauses", "replies_dropped",
    )  # fmt: skip

    def __init__(self) -> None:
        self.bytes_received = 0  #: request bytes read from sockets
        self.bytes_sent = 0  #: reply bytes written to sockets
        self.connections_accepted = 0
        self.connections_open = 0
        self.connections_refused = 0  #: over the connection limit
        self.inflight_pauses = 0  #: reading paused: too many requests/bytes in flight
        self.write_pauses = 0  #: reading paused: the peer does not read its replies
        self.replies_dropped = 0  #: replies for connections closed meanwhile


class Service(Protocol):
    """What a connection needs from the service (one per shard) that accepted it."""

    limits: ConnectionLimits
    stats: ConnectionCounters
    connections: set[Any]
    waiting: WaitingRequests

    def enter(self) -> None:
        """A run of requests starts on a tame stack (a stopping service waits for it)."""

    def leave(self) -> None:
        """That run ends."""


class Entry:
    """One admitted request: the request, what it is charged, when it started, its reply."""

    __slots__ = ("request", "charge", "started", "parts")

    def __init__(self, request: Any, charge: int, started: float) -> None:
        self.request = request
        self.charge = charge
        self.started = started
        self.parts: list[bytes] | None = None  # the encoded reply, once complete


class TameBatchConnection(asyncio.Protocol):
    """One client connection on the shard that accepted it; subclass it for a protocol.

    Override ``feed`` (decode, then ``admit_all`` the requests), ``charge``,
    ``start``, ``finish``, and ``execute`` or ``serve`` (``execute`` and ``finish``
    in one call); optionally ``run`` (the lane), ``feed_eof``, ``details`` and
    ``end_of_pass``, and ``answer`` with ``inline = True``.
    """

    # Slots: a connection has more attributes than an instance dict shares keys for
    # (30 in CPython), and the hot path reads them on every request (measured: the
    # generic attribute lookups it would cost, bench/README.md). A subclass may add
    # its own ``__slots__``; one that does not gets a ``__dict__`` for its own.
    __slots__ = (
        "service", "stats", "max_inflight", "max_bytes", "high_water", "transport",
        "loop", "peer", "inflight", "charged", "backlog", "local", "replies",
        "reading_paused", "write_paused", "eof", "closing", "refused", "_out",
        "_out_bytes", "_settle_scheduled", "_in_pass", "_stack_wanted", "_current",
        "_lane", "_lane_started", "_lane_blocked", "_held", "_draining", "_waiting",
        "_records_passes", "_has_lane",
    )  # fmt: skip

    #: replies in request order (protocols without request ids), else as they complete
    ordered: ClassVar[bool] = False
    #: ``answer`` is asked first for each request that arrives with nothing in flight
    inline: ClassVar[bool] = False

    def __init__(self, service: Service) -> None:
        self.service = service
        self.stats = service.stats
        limits = service.limits
        self.max_inflight = limits.max_inflight
        self.max_bytes = limits.max_inflight_bytes
        self.high_water = limits.write_high_water
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peer: Any = None
        self.inflight = 0
        self.charged = 0
        self.backlog: deque[Entry] = deque()
        self.local: deque[Entry] = deque()  # admitted, to run here on a tame stack
        self.replies: deque[Entry] = deque()  # ordered: every entry in flight, in order
        self.reading_paused = False
        self.write_paused = False
        self.eof = False
        self.closing = False
        self.refused = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._settle_scheduled = False
        self._in_pass = False  # the loop is inside a pass: it settles (and writes) at the end
        self._stack_wanted = False  # a task waits for a tame stack to run self.local
        self._current: Any = None  # the entry (or lane request) a stack is running now
        self._lane: Iterator[Any] | None = None  # requests run() takes, unadmitted
        self._lane_started = 0.0  # when the lane's requests arrived
        self._lane_blocked = False  # the limits stopped the lane: _settle holds the rest back
        self._held: dict[int, Entry] = {}  # id(lane request) -> its entry, once it parked
        self._draining = 0  # stacks inside _drain_local
        self._waiting = service.waiting.entries  # (read on every completion: empty is cheap)
        self._records_passes = type(self).end_of_pass is not TameBatchConnection.end_of_pass
        self._has_lane = not self.ordered and type(self).run is not TameBatchConnection.run

    # -- the protocol: override these ---------------------------------------------

    def feed(self, data: bytes) -> None:
        """Decode ``data``; ``admit_all`` the complete requests, in order."""
        raise NotImplementedError

    def feed_eof(self) -> None:
        """The peer stopped sending (a request cut short: answer it as the protocol says;
        the connection closes once every request is answered)."""

    def charge(self, request: Any) -> int:
        """The bytes ``request`` may hold while in flight (its reply, mostly)."""
        raise NotImplementedError

    def start(self, entry: Entry) -> None:
        """An admitted request: ``complete`` it now, ``run_here``, or send it elsewhere
        and ``complete`` it when the answer comes back."""
        raise NotImplementedError

    def execute(self, request: Any) -> Any:
        """On a tame stack: do the request's work (blocking code is fine); called by
        the default ``serve``."""
        raise NotImplementedError

    def finish(self, entry: Entry, result: Any, error: BaseException | None) -> list[bytes]:
        """The reply to a request run here (or sent elsewhere): its encoded parts."""
        raise NotImplementedError

    def serve(self, entry: Entry) -> list[bytes] | None:
        """On a tame stack: ``execute`` the request, then ``finish`` it, in one call.

        A protocol may override it to do both without the two calls between them;
        an exception it lets out goes to ``finish`` as the request's error. None:
        the request was sent elsewhere with ``wait_for`` (``complete`` it later)."""
        return self.finish(entry, self.execute(entry.request), None)

    def run(self, request: Any, started: float) -> list[bytes] | None:
        """On a tame stack: route, do and encode ``request`` in one call (a protocol whose
        replies leave as they complete may define it: the lane, see the module
        docstring). Return its reply parts, or None once it was handed elsewhere with
        ``hold`` (then ``complete`` that entry); an exception goes to ``finish``."""
        raise NotImplementedError

    def answer(self, request: Any) -> bytes | None:
        """With ``inline = True``: ``request``'s encoded reply if it can be given now, in
        the loop (no blocking, nothing held, no other shard); None to admit it."""
        return None

    def details(self, request: Any) -> dict[str, Any]:
        """What a dump of waiting requests says about ``request``."""
        return {}

    def end_of_pass(self) -> None:
        """A pass over this connection ends, its replies about to leave in one write:
        e.g. record the pass's per-request statistics in one go."""

    # -- what subclasses call -------------------------------------------------------

    def admit(self, request: Any) -> None:
        """A decoded request: start it, or hold it back while the limits are reached."""
        self.admit_all((request,))

    def admit_all(self, requests: Sequence[Any]) -> None:
        """Every request one socket read completed, in order: ``admit`` each (one
        clock read for all of them: they arrived together)."""
        if self.inline and not self.inflight and not self.backlog and not self.write_paused:
            # Nothing in flight: these replies are next in order. Answer while the
            # protocol can; the rest, from the first it cannot, take the path below.
            answer = self.answer
            out = self._out
            size = self._out_bytes
            for index, request in enumerate(requests):
                reply = answer(request)
                if reply is None:
                    requests = requests[index:]
                    break
                out.append(reply)
                size += len(reply)
                if size >= self.high_water:
                    self._out_bytes = size
                    self._flush()  # see _queue
                    size = 0
                    if self.closing:
                        return
                    if self.write_paused:  # the peer does not read: hold the rest back
                        requests = requests[index + 1 :]
                        break
            else:
                self._out_bytes = size
                return
            self._out_bytes = size
        started = _perf_counter()
        if self._has_lane and self._lane is None and not self.backlog and not self.write_paused:
            if self._settle_scheduled and self._records_passes:
                # A lane finished on a stack resumed outside a pass, its settle still
                # due: what it answered is recorded with its own arrival time first.
                self.end_of_pass()
            self._lane = iter(requests)  # (checked against the limits as each is taken)
            self._lane_started = started
            return
        charge = self.charge
        start = self.start
        max_inflight = self.max_inflight
        max_bytes = self.max_bytes
        replies = self.replies if self.ordered else None
        for request in requests:
            entry = Entry(request, charge(request), started)
            inflight = self.inflight
            if (
                self.backlog
                or self.write_paused
                or (
                    inflight
                    and (inflight >= max_inflight or self.charged + entry.charge > max_bytes)
                )
            ):
                self._hold(entry)
                continue
            self.inflight = inflight + 1
            self.charged += entry.charge
            if replies is not None:
                replies.append(entry)
            start(entry)

    def _hold(self, entry: Entry) -> None:
        self.backlog.append(entry)
        self._track(entry, STAGE_THROTTLED)
        if not self.reading_paused:
            self.stats.inflight_pauses += 1
        self._pause_reading()

    def run_here(self, entry: Entry) -> None:
        """Run ``entry`` on this shard, on a tame stack, in order with the others."""
        self.local.append(entry)

    def wait_for(self, entry: Entry, stage: str) -> None:
        """``entry`` waits elsewhere (``stage`` says where) until ``complete``\\ d."""
        self._track(entry, stage)

    def hold(self, request: Any, started: float, stage: str) -> Entry:
        """From ``run``: ``request`` waits elsewhere (``stage`` says where) until its entry
        is ``complete``\\ d; it holds its charge in flight until then."""
        entry = self._held.pop(id(request), None)  # (it parked first: already charged)
        if entry is None:
            entry = Entry(request, self.charge(request), started)
            self.inflight += 1
            self.charged += entry.charge
        self._track(entry, stage)
        return entry

    def complete(self, entry: Entry, parts: list[bytes]) -> None:
        """``entry``'s reply: send it (now, or in order) and release what it held."""
        if self._waiting:
            self._waiting.pop(id(entry), None)
        self.inflight -= 1
        self.charged -= entry.charge
        if self.closing:  # (closed by either side: connection_lost sets it too)
            self.stats.replies_dropped += 1
        elif not self.ordered:
            self._out += parts
            size = self._out_bytes
            for part in parts:
                size += len(part)
            self._out_bytes = size
            if size >= self.high_water:
                self._flush()  # see _queue
        else:
            entry.parts = parts
            replies = self.replies
            if replies[0] is entry:  # else it waits for the replies before it
                out = self._out
                size = self._out_bytes
                while replies and replies[0].parts is not None:
                    for part in replies.popleft().parts:  # type: ignore[union-attr]
                        out.append(part)
                        size += len(part)
                self._out_bytes = size
                if size >= self.high_water:
                    self._flush()  # see _queue
        if not self._in_pass:
            self._schedule_settle()

    def reply_now(self, parts: list[bytes]) -> None:
        """Send a reply that answers no admitted request (a protocol error, say)."""
        if self.ordered and self.replies:  # behind the replies still due
            entry = Entry(None, 0, _perf_counter())
            entry.parts = parts
            self.replies.append(entry)
        elif self.transport is not None and not self.closing:
            self._queue(parts)

    def close_after_replies(self) -> None:
        """Send what is queued, then close (the transport flushes its buffer first)."""
        if self._out:
            self._flush()
        self.closing = True
        self._drop_backlog()
        if self.transport is not None:
            self.transport.close()

    def close_when_answered(self) -> None:
        """Stop reading; answer every request decoded so far (running, queued or held
        back), then close: how a protocol ends a stream it can no longer decode."""
        if self.transport is not None and not self.reading_paused and not self.eof:
            self.reading_paused = True
            self.transport.pause_reading()
        self.eof = True  # (as if the peer had stopped sending: _settle closes once idle)
        if not self._in_pass:
            self._schedule_settle()

    def abort(self) -> None:
        """Drop the connection now (shutdown, internal error)."""
        self.closing = True
        self._drop_backlog()
        self._out.clear()
        self._out_bytes = 0
        if self.transport is not None:
            self.transport.abort()

    # -- transport callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        service = self.service
        stats = self.stats
        if len(service.connections) >= service.limits.max_connections:
            stats.connections_refused += 1
            self.refused = True
            transport.abort()
            return
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.peer = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=self.high_water)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        service.connections.add(self)
        stats.connections_accepted += 1
        stats.connections_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.service.connections.discard(self)
        self.stats.connections_open -= 1
        self.end_of_pass()  # what completed since the last pass still counts
        self.transport = None
        self.closing = True
        self._drop_backlog()
        self.replies.clear()
        self._out.clear()
        self._out_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.closing or self.eof:
            return
        self.stats.bytes_received += len(data)
        self._in_pass = True
        try:
            self.feed(data)
        except Exception:  # a bug, not the peer's bytes: keep the shard serving
            log.exception("connection from %s: internal error; closing it", self.peer)
            self._in_pass = False
            self.abort()
            return
        if self.closing:
            self._in_pass = False
            return
        if (
            self._lane is not None
            or self.local
            or self.backlog
            or self.reading_paused
            or self.write_paused
            or self.eof
        ):
            self._settle()
            return
        # (what _settle does when nothing waits: the pass's statistics, its one write)
        self._in_pass = False
        if self._records_passes:
            self.end_of_pass()
        if self._out:
            self._flush()

    def eof_received(self) -> bool:
        """The peer shut down its sending side: finish the requests in flight, then close."""
        self.feed_eof()
        self.eof = True
        if self._idle():
            if self._out:
                self._flush()
            return False  # the transport closes itself
        self._schedule_settle()  # (_settle closes once the replies due have left)
        return True  # keep it open to send them

    def pause_writing(self) -> None:
        """The write buffer is over the high-water mark: the peer does not read."""
        self.write_paused = True
        self.stats.write_pauses += 1
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._in_pass = True
        self._settle()

    # -- admission ------------------------------------------------------------------

    def _idle(self) -> bool:
        """Nothing in flight, held back, queued or running: the connection may close."""
        return (
            self.inflight == 0
            and not self.backlog
            and self._lane is None
            and not self.local
            and not self._draining
        )

    def _has_room(self, entry: Entry) -> bool:
        if self.inflight == 0:
            return True
        return self.inflight < self.max_inflight and (
            self.charged + entry.charge <= self.max_bytes
        )

    def _begin(self, entry: Entry) -> None:
        self.inflight += 1
        self.charged += entry.charge
        if self.ordered:
            self.replies.append(entry)
        self.start(entry)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.eof:
            self.reading_paused = True
            self.transport.pause_reading()

    def _track(self, entry: Entry, stage: str) -> None:
        self.service.waiting.track(
            id(entry), stage, entry.started, {**self.details(entry.request), "client": self.peer}
        )

    def _drop_backlog(self) -> None:
        self._lane = None  # (its stacks see closing and stop)
        untrack = self.service.waiting.untrack
        for entry in self.backlog:
            untrack(id(entry))
        self.backlog.clear()

    # -- requests run here, on tame stacks ------------------------------------------

    def _run_local(self) -> None:
        """Run the lane and the queued local requests on tame stacks, from the loop (see
        the module docstring): when one parks its stack, carry on with the next on
        another."""
        local = self.local
        while (local or (self._lane is not None and not self._lane_blocked)) and not self.closing:
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
            if parked is not None:  # parked inside serve or run (not between requests)
                if type(parked) is not Entry:  # a lane request: admitted now, as it waits
                    entry = Entry(parked, self.charge(parked), self._lane_started)
                    self.inflight += 1
                    self.charged += entry.charge
                    self._held[id(parked)] = parked = entry
                self._track(parked, STAGE_RUNNING)
            if tame.turn_spent():
                self._schedule_settle()  # the rest after the loop has run
                return

    def _drain_local(self) -> None:
        """On a tame stack: run the lane, then the queued local requests in order, until
        none are left (yielding to the loop between them whenever the turn's quota is
        spent)."""
        self.service.enter()
        self._draining += 1
        try:
            lane = self._lane
            if lane is None or self._drain_lane(lane):
                self._drain_entries()
        finally:
            self._draining -= 1
            self.service.leave()
            if not self._in_pass:
                self._schedule_settle()  # resumed outside a loop pass: flush, admit, close

    def _drain_lane(self, lane: Iterator[Any]) -> bool:
        """On a tame stack: ``run`` the lane's requests (see the module docstring). True
        when the lane is done; False when this stack stops here: it was resumed after
        parking (the loop's next pass starts a new stack for the rest, so that each
        park is seen) or it yielded to the loop by the quota."""
        run = self.run
        held = self._held
        out = self._out
        high_water = self.high_water
        started = self._lane_started
        runtime = current_runtime()
        assert runtime is not None
        # The deadline moves only with the loop's turns, and this loop stops at a park:
        # once read, it can only be early (a stack resumed in a later turn), never late.
        deadline = runtime.deadline
        # Between two requests, only this stack's own calls change what the limits see:
        # hold() (run handed one elsewhere) and a flush (pause_writing). Checked as each
        # request is taken from then on.
        limited = bool(self.inflight or self.write_paused or self.closing)
        for request in lane:
            if limited and self._spill(request, lane, started):
                return True
            self._current = request
            try:
                parts = run(request, started)
            except Exception as exc:
                entry = held.get(id(request)) or Entry(request, 0, started)
                parts = self.finish(entry, None, exc)
            if held:
                entry = held.pop(id(request), None)  # type: ignore[assignment]
                if entry is not None:  # it parked: this stack was resumed outside a pass
                    self._current = None
                    if parts is not None:
                        self.complete(entry, parts)
                    return False
            if parts is None:  # handed elsewhere with hold(): now in flight
                limited = True
            else:  # complete() without an entry: the hot path
                out += parts
                size = self._out_bytes
                for part in parts:  # (len here is specialized; sum(map(len, ...)) costs more)
                    size += len(part)
                self._out_bytes = size
                if size >= high_water:
                    self._flush()  # see _queue
                    limited = bool(self.inflight or self.write_paused or self.closing)
            if _perf_counter() > deadline:
                self._current = None
                runtime.yield_now()  # the turn's quota is spent: let the loop run
                return False
        if self._lane is lane:
            self._lane = None
        self._current = None
        return True

    def _spill(self, request: Any, lane: Iterator[Any], started: float) -> bool:
        """Whether the limits stop the lane at ``request`` (True: the lane is over for
        this stack; the loop's ``_settle`` holds the rest back, see ``_hold_lane``)."""
        if self.closing:
            if self._lane is lane:
                self._lane = None
            return True
        if not self.write_paused and (
            self.inflight < self.max_inflight
            and self.charged + self.charge(request) <= self.max_bytes
        ):
            return False
        if self._lane is lane:
            self._lane = chain((request,), lane)
            self._lane_blocked = True
        return True

    def _hold_lane(self) -> None:
        """In the loop: the rest of a lane the limits stopped waits in the backlog."""
        lane, started, charge = self._lane, self._lane_started, self.charge
        self._lane = None
        self._lane_blocked = False
        for request in lane or ():
            self._hold(Entry(request, charge(request), started))

    def _drain_entries(self) -> None:
        """On a tame stack: run the queued local entries in order until none are left."""
        local = self.local
        serve = self.serve
        finish = self.finish
        complete = self.complete
        out = self._out
        high_water = self.high_water
        as_completed = not self.ordered
        runtime = current_runtime()
        assert runtime is not None
        while local:
            entry = self._current = local.popleft()
            try:
                parts = serve(entry)
            except Exception as exc:
                parts = finish(entry, None, exc)
            # (self._current stays: it is read only when this stack parks, and it
            # parks only inside serve or at the yield below, which clears it)
            if parts is None:  # handed elsewhere (run's hold): complete()d later
                pass
            elif as_completed and not self._waiting and not self.closing:
                # complete(entry, parts) inline: the hot path's common case
                self.inflight -= 1
                self.charged -= entry.charge
                out += parts
                size = self._out_bytes
                for part in parts:  # (as in _drain_lane)
                    size += len(part)
                self._out_bytes = size
                if size >= high_water:
                    self._flush()  # see _queue
            else:
                complete(entry, parts)
            if local and _perf_counter() > runtime.deadline:
                self._current = None
                runtime.yield_now()  # the turn's quota is spent: let the loop run
        self._current = None

    def _waiting_for_stack(self) -> None:
        if not self._stack_wanted:
            self._stack_wanted = True
            task = asyncio.get_running_loop().create_task(tame.call(self._drain_on_granted_stack))
            task.add_done_callback(_log_task_failure)

    def _drain_on_granted_stack(self) -> None:
        self._stack_wanted = False
        self._drain_local()

    # -- the end of a pass ------------------------------------------------------------

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
        """End of a loop pass over this connection: run what is runnable, start what
        the limits now admit, send the replies in one write, close after EOF.
        Called with ``_in_pass`` set; clears it."""
        try:
            backlog = self.backlog
            untrack = self.service.waiting.untrack
            while True:
                if (self.local or self._lane is not None) and not self.closing:
                    self._run_local()
                    if self._lane_blocked:
                        self._hold_lane()
                if not backlog or self.write_paused or self.closing:
                    break
                entry = backlog[0]
                if not self._has_room(entry):
                    break
                backlog.popleft()
                untrack(id(entry))
                self._begin(entry)
        finally:
            self._in_pass = False
        self.end_of_pass()
        if self._out:
            self._flush()
        if not backlog and not self.write_paused and not self.closing:
            if self.eof:
                if self._idle():
                    self.close_after_replies()
            elif self.reading_paused:
                self.reading_paused = False
                if self.transport is not None:
                    self.transport.resume_reading()

    def _queue(self, parts: list[bytes]) -> None:
        out = self._out
        size = self._out_bytes
        for part in parts:
            if part:
                out.append(part)
                size += len(part)
        self._out_bytes = size
        if size >= self.high_water:
            # Replies that did not block pile up within one pass: hand them to the
            # transport now, so that its high-water mark (and pause_writing) bounds
            # them, not the size of the client's pipeline.
            self._flush()

    def _flush(self) -> None:
        out = self._out
        transport = self.transport
        if transport is None:
            out.clear()
            self._out_bytes = 0
            return
        size = self._out_bytes
        self.stats.bytes_sent += size
        self._out_bytes = 0
        if len(out) == 1:
            transport.write(out[0])
        elif size <= _JOIN_LIMIT:
            transport.write(b"".join(out))  # one buffer: cheaper than writelines' several
        else:
            transport.writelines(out)  # (big payloads: no copy)
        out.clear()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.peer} inflight={self.inflight} "
            f"backlog={len(self.backlog)} paused={self.reading_paused}>"
        )


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("requests waiting for a tame stack failed", exc_info=task.exception())
