"""The group owner's endpoint: submissions from any thread outside the shards.

Any number of threads in the process that started the group submit calls
(multi-producer): each submission is serialized onto the owner's SPSC ring
to the target shard under a lock, and a concurrent ``Future`` is returned at
once.  One receiver thread sleeps on the owner's doorbell (it never spins),
takes the replies off the rings and completes the futures.  The same thread
watches the shard processes: a shard that dies fails every call waiting on
it with :class:`~shardio.errors.ShardDied` and tells the other shards.

Submissions are bounded per shard like a shard's own calls: beyond the
link's bound a call waits, not yet pickled, and the receiver thread sends it
(in submission order) when replies make room; a call that then turns out
not to pickle fails its future instead of raising at ``submit``.

Replies need no thread hop when their caller waits for them itself.  An
asyncio loop that awaits :meth:`OwnerEndpoint.call` drains the inbound rings
on its own thread until ``call_poll_us`` have passed since the last reply it
saw (the reply resumes the awaiting task inside the poll, as a shard's
replies do); past that window it sleeps on the doorbell
through the loop's own ``add_reader`` while calls are in flight.  A thread blocked in
``future.result()`` polls the same way for the same window before it
blocks.  While a caller polls, the endpoint's ``sleeping`` flag stays clear,
so shards reply without a system call; a caller that stops polling sets the
flag and drains once more (the sleep protocol of docs/design.md, section 4),
and the receiver thread takes over the rings from a poller that stopped
making progress (a loop that blocks, or closed) within ``STALE_POLLER``.

Calls and replies cross as between shards: compact calls of interned
functions, compact results, taken off the rings with ``Ring.dispatch`` (which
resolves a compact result's future in C) by whichever of the above is the
consumer; ``consume_lock`` makes it one at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import select
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from typing import Any

from .attach_protocol import LINK_FAILED_REQUEST
from .errors import GroupStateError, RemoteError, ShardDied
from .fabric._ring import Flag, any_ready, encode_call as _encode_call
from .fabric.doorbell import Doorbell
from .fabric.endpoint import EndpointSegment
from .fabric.link import DEFAULT_MAX_BYTES, DEFAULT_MAX_CALLS, Link
from .fabric.mesh import Mesh
from .fabric.messages import (
    HEADER,
    REPLY_ERROR,
    REPLY_OK,
    RESULT,
    decode_error,
    decode_result,
    encode_request,
)

log = logging.getLogger("shardio.group")

_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size
_perf_counter = time.perf_counter
_get_ident = threading.get_ident
_InvalidStateError = concurrent.futures.InvalidStateError
_INTERNABLE = frozenset({types.FunctionType, types.BuiltinFunctionType})
_REPLY_KINDS = frozenset({REPLY_OK, RESULT, REPLY_ERROR})
_NO_FUNCTIONS: dict[int, Any] = {}
"""An endpoint's function table for Ring.dispatch: it runs no calls (one that arrives
goes to ``_complete``, which drops it)."""
BATCH = 256
"""Messages one dispatch takes from one ring at most."""

DEFAULT_CALL_POLL_US = 200.0
"""How long a caller waiting for its reply polls the rings itself, by default, after the
last reply it saw (ShardGroup's ``call_poll_us``; 0 for thread shards, which need the GIL)."""
SPIN_SECONDS = 20e-6
"""How long one poll callback of an asyncio loop polls before it lets the loop run again."""
STALE_POLLER = 0.005
"""A poller that has not polled for this long is taken over by the receiver thread."""


def _refuse_call(request_id: int, func: Callable, args: tuple) -> None:
    """Ring.dispatch's ``on_call`` for an endpoint: never called (no function table)."""
    raise AssertionError("an endpoint was asked to run a call")


def _fail_waiting(failed: list[tuple[concurrent.futures.Future, Exception]]) -> None:
    """Fail the calls that could not be sent (outside the lock: callbacks may submit)."""
    for future, error in failed:
        try:
            future.set_exception(error)
        except _InvalidStateError:
            pass


def _peer_died(shard: int, detail: str) -> None:
    """Runs on every surviving shard when ``shard`` dies."""
    from .reactor import require_reactor

    require_reactor().peer_died(shard, detail)


class PolledFuture(concurrent.futures.Future):
    """A concurrent Future whose ``result()`` first polls the endpoint's rings itself.

    The calling thread then takes its own reply off the ring (no receiver
    thread wake-up, no condition variable); past the endpoint's poll window it
    blocks like any Future.
    """

    _endpoint: OwnerEndpoint | None = None
    settled = False
    """Set as the result or the exception goes in, or once the future is cancelled:
    what a polling caller checks (``done()`` would take the future's condition)."""
    succeeded = False
    """Set (after ``value``) once a result is in: ``result()`` then returns it
    without the condition."""
    value: Any = None

    def set_result(self, result: Any) -> None:
        # settled first: the done callbacks run inside super().set_result(), and one
        # that asks this future for its result must not poll for it.
        self.settled = True
        super().set_result(result)  # raises if done already: nothing below changes then
        self.value = result
        self.succeeded = True

    def set_exception(self, exception: BaseException | None) -> None:
        self.settled = True  # before the done callbacks, as in set_result
        super().set_exception(exception)

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self.settled = True
        return cancelled

    def result(self, timeout: float | None = None) -> Any:
        if not self.settled:
            endpoint = self._endpoint
            if endpoint is not None:
                endpoint.poll_until_done(self, timeout)
        if self.succeeded:
            return self.value
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        endpoint = self._endpoint
        if endpoint is not None and not self.settled:
            endpoint.poll_until_done(self, timeout)
        return super().exception(timeout)


class _Poller:
    """One caller polling the rings (a thread in ``result()``); the receiver thread
    reads ``heartbeat`` to find pollers that stopped."""

    __slots__ = ("heartbeat",)

    def __init__(self) -> None:
        self.heartbeat = _perf_counter()

    def gone(self) -> bool:
        return False


class _LoopCall:
    """A call awaited in an asyncio loop: what ``link.pending`` holds for it.

    It completes the loop's future directly when the reply is taken off the
    ring on the loop's own thread, through ``call_soon_threadsafe`` otherwise.
    It never raises for a future already done (the caller cancelled it).
    """

    __slots__ = ("future", "driver")

    def __init__(self, future: asyncio.Future, driver: _LoopDriver) -> None:
        self.future = future
        self.driver = driver

    def set_result(self, value: Any) -> None:
        driver = self.driver
        if _get_ident() == driver.thread_id:
            driver.calls.discard(self)
            if driver.deferring:  # the loop's poll resolves it once the rings are let go
                driver.resolved.append((self.future, value))
            elif not self.future.done():
                self.future.set_result(value)
        else:
            driver.deliver_threadsafe(self, value, None)

    def set_exception(self, error: BaseException) -> None:
        driver = self.driver
        if _get_ident() == driver.thread_id:
            driver.calls.discard(self)
            if not self.future.done():
                self.future.set_exception(error)
        else:
            driver.deliver_threadsafe(self, None, error)

    def cancelled(self) -> bool:
        return self.future.cancelled()

    def done(self) -> bool:
        return self.future.done()


class _LoopDriver:
    """The rings, as drained by one asyncio loop for the calls it awaits.

    From a call on, the loop polls (a callback that spins for up to
    SPIN_SECONDS while a call is in flight, looks once otherwise, then
    re-queues itself) until ``call_poll_seconds`` have passed without a reply;
    then, while calls are in flight, it sleeps on the doorbell with
    ``add_reader`` until the next ring, and polls again.  Past the window with
    no call in flight it does nothing at all.  Replies taken by the poll are
    resolved after it lets the rings go (``resolved``), eagerly where the loop
    allows: the awaiting task runs inside the poll, never under the consume lock.
    """

    def __init__(self, endpoint: OwnerEndpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.loop = loop
        self.thread_id = _get_ident()
        self.window = endpoint.call_poll_seconds
        self.calls: set[_LoopCall] = set()
        self.polling = False
        self.reading = False
        self.reader_fd = -1
        self.last_work = 0.0
        self.heartbeat = 0.0
        self.polls = 0
        """Poll callbacks run (each spins at most SPIN_SECONDS)."""
        self.hops = 0
        """Replies another thread took off the ring for this loop (call_soon_threadsafe)."""
        self.eager = 0
        """Replies whose awaiting task this loop's poll resumed at once (no loop iteration)."""
        self.deferring = False
        self.resolved: list[tuple[asyncio.Future, Any]] = []
        """Replies this loop's poll took, to resolve after it lets the rings go."""
        # Eager wake-up shadows loop.call_soon with an instance attribute for the length
        # of one set_result (Ring.resolve_eagerly): only for a loop object that takes
        # instance attributes (asyncio's and uvloop.Loop do), while nothing else shadows it.
        self.loop_attributes: dict | None = getattr(loop, "__dict__", None)
        self.resolve_eagerly = endpoint.links[0].inbound.resolve_eagerly

    def gone(self) -> bool:
        return self.loop.is_closed()

    def begin(self, call: _LoopCall) -> None:
        """A call of this loop was sent (loop thread)."""
        self.calls.add(call)
        if self.polling:
            return
        if self.window:
            self._start_polling()
        elif not self.reading:
            self._start_reading()

    def deliver_threadsafe(self, call: _LoopCall, value: Any, error: BaseException | None
                           ) -> None:
        self.hops += 1
        try:
            self.loop.call_soon_threadsafe(self._deliver, call, value, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits for it any more

    def _deliver(self, call: _LoopCall, value: Any, error: BaseException | None) -> None:
        self.calls.discard(call)
        future = call.future
        if future.done():
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def _start_polling(self) -> None:
        endpoint = self.endpoint
        self.polling = True
        self.last_work = self.heartbeat = _perf_counter()
        endpoint.add_poller(self)
        self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        endpoint = self.endpoint
        if endpoint.closed:
            self._forget()
            return
        self.polls += 1
        now = self.heartbeat = _perf_counter()
        if endpoint.sleeping.is_set():
            # The receiver thread took the rings over while this loop did not poll (it
            # was descheduled or busy) and set the flag: shards need not ring again.
            endpoint.sleeping.clear()
        poll_once = endpoint.poll_once
        if self.calls:
            spin_end = min(now + SPIN_SECONDS, self.last_work + self.window)
            while True:
                self.deferring = True
                try:
                    did = poll_once()
                except BaseException:
                    self.deferring = False
                    if self.resolved:  # what it took before it failed is not lost
                        self._resolve()
                    raise
                self.deferring = False
                if did:
                    self.last_work = now = _perf_counter()
                    if not self.resolved or not self._resolve() or not self.calls:
                        break  # let the loop run what the replies woke
                    # Every task woken has run already and called again: keep polling.
                now = _perf_counter()
                if now >= spin_end:
                    break
        elif poll_once():  # nothing of ours in flight: one look per loop iteration
            self.last_work = now
        # The window runs from the last reply, not the last call in flight: a loop
        # that calls again right after a reply finds the poll running (no sleeping
        # flag to clear, no receiver thread to poke).
        if now - self.last_work < self.window:
            self.loop.call_soon(self._poll)
            return
        self.polling = False
        endpoint.pollers.pop(self, None)
        endpoint.stop_polling()
        self.calls = {call for call in self.calls if not call.future.done()}
        if self.calls:
            if not self.reading:
                self._start_reading()
        elif self.reading:
            self.reading = False
            self.loop.remove_reader(self.reader_fd)

    def _resolve(self) -> bool:
        """Resolve the replies the poll took (outside the consume lock: a task resumed
        here may do anything); True if every awaiting task resumed at once."""
        resolved, self.resolved = self.resolved, []
        attributes = self.loop_attributes
        eager = attributes is not None and "call_soon" not in attributes
        all_ran = eager
        for future, value in resolved:
            if future.done():
                continue  # cancelled meanwhile
            if eager:
                try:
                    if self.resolve_eagerly(self.loop, future, value):
                        self.eager += 1  # the awaiting task ran here, not a loop turn later
                    else:
                        all_ran = False
                    continue
                except Exception:  # the loop refused the shadow: resolve it plainly
                    log.exception("eager wake-up failed; the reply is delivered plainly")
                    eager = all_ran = False
                    if future.done():
                        continue
            future.set_result(value)
        return all_ran

    def _start_reading(self) -> None:
        self.reading = True
        self.reader_fd = self.endpoint.doorbell.fd
        self.loop.add_reader(self.reader_fd, self._on_doorbell)

    def _forget(self) -> None:
        """The endpoint was closed under this loop: stop polling and reading, quietly."""
        self.polling = False
        self.calls.clear()
        if self.reading:
            self.reading = False
            with contextlib.suppress(Exception):  # its doorbell may be closed already
                self.loop.remove_reader(self.reader_fd)

    def _on_doorbell(self) -> None:
        endpoint = self.endpoint
        if endpoint.closed:
            self._forget()
            return
        endpoint.doorbell.drain()
        if self.polling:
            return  # the poll in progress re-arms the sleeping flag when it stops
        self.calls = {call for call in self.calls if not call.future.done()}
        if self.calls and self.window:
            self._start_polling()  # replies are arriving: poll for the next ones
            return
        # This loop took the doorbell's wake-up (the shard cleared the sleeping flag to
        # ring it): re-arm the flag and drain once more, or the next reply rings nobody.
        endpoint.stop_polling()
        self.calls = {call for call in self.calls if not call.future.done()}
        if not self.calls:
            self.reading = False
            self.loop.remove_reader(self.reader_fd)


class OwnerEndpoint:
    """An endpoint outside the shards, driven by plain threads.

    The group's owner is one (the last endpoint of the mesh: it also watches
    the shard processes and tells the shards of a death); an endpoint added
    to a running group (:meth:`ShardGroup.add_endpoint`) is another, made
    with :meth:`attached`.
    """

    def __init__(self, links: list[Link], sleeping: Flag, doorbell: Doorbell, *,
                 max_message_bytes: int, alive: list[Flag] | None = None,
                 on_death: Callable[[int, str], None] | None = None,
                 name: str = "owner", call_poll_us: float = DEFAULT_CALL_POLL_US) -> None:
        self.shard_count = len(links)
        self.name = name
        self.call_poll_seconds = call_poll_us / 1e6
        self.consume_lock = threading.RLock()
        """Held by whoever takes messages off the inbound rings (one consumer at a time)."""
        self.pollers: dict[Any, None] = {}
        """Callers polling the rings with the sleeping flag clear (see the module's doc)."""
        self._drivers: dict[asyncio.AbstractEventLoop, _LoopDriver] = {}
        self.untimed_sleep = False
        """The receiver thread sleeps without a timeout: a new poller must poke it."""
        self.closed = False
        self.receiver_messages = 0
        """Messages the receiver thread took off the rings (the rest, their callers did)."""
        self.max_message_bytes = max_message_bytes
        self.links = links
        self.inbound_rings = tuple(link.inbound for link in links)
        self.backlogged = False
        """Some link has a backlog to flush (its outbound ring was full)."""
        self._draining = False  # a dispatch is in progress (on the consume lock's holder)
        self._receivers = [(link, link.inbound.dispatch, self._reply_handler(link))
                           for link in links]
        self.alive = alive or []
        self.is_owner = alive is not None
        self.sleeping = sleeping
        self.doorbell = doorbell
        self.on_death = on_death
        self.lock = threading.Lock()
        self._next_request_id = 1
        self._watch: dict[int, tuple[int, Callable[[], str]]] = {}
        self._deaths: list[tuple[int, str]] = []
        self._expected_exit = False
        self._closing = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._receive, name=f"shardio-{name}-receiver",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def of_mesh(cls, mesh: Mesh, shard_count: int, *, max_message_bytes: int,
                max_calls_per_peer: int = DEFAULT_MAX_CALLS,
                max_queued_bytes_per_peer: int = DEFAULT_MAX_BYTES,
                on_death: Callable[[int, str], None] | None = None,
                call_poll_us: float = DEFAULT_CALL_POLL_US) -> OwnerEndpoint:
        """The group owner's endpoint: the mesh's last."""
        me = mesh.layout.endpoints - 1
        links = [Link(shard, mesh.ring(me, shard), mesh.ring(shard, me),
                      mesh.sleeping_flag(shard), mesh.doorbells[shard].fd,
                      max_calls=max_calls_per_peer, max_bytes=max_queued_bytes_per_peer)
                 for shard in range(shard_count)]
        return cls(links, mesh.sleeping_flag(me), mesh.doorbells[me],
                   max_message_bytes=max_message_bytes, on_death=on_death,
                   alive=[mesh.alive_flag(shard) for shard in range(shard_count)],
                   call_poll_us=call_poll_us)

    @classmethod
    def attached(cls, mesh: Mesh, segment: EndpointSegment, *, max_message_bytes: int,
                 max_calls_per_peer: int, max_queued_bytes_per_peer: int,
                 call_poll_us: float = DEFAULT_CALL_POLL_US) -> OwnerEndpoint:
        """The client side of an endpoint added to a running group, in this process."""
        shard_count = segment.layout.shard_count
        links = [Link(shard, segment.to_shard(shard), segment.from_shard(shard),
                      mesh.sleeping_flag(shard), mesh.doorbells[shard].fd,
                      max_calls=max_calls_per_peer, max_bytes=max_queued_bytes_per_peer)
                 for shard in range(shard_count)]
        return cls(links, segment.sleeping_flag(), segment.doorbell,
                   max_message_bytes=max_message_bytes, name=f"endpoint-{segment.number}",
                   call_poll_us=call_poll_us)
    # ------------------------------------------------------------ submitting

    def submit(self, shard: int, func: Callable, args: tuple, kwargs: dict | None,
               *, control: bool = False) -> concurrent.futures.Future:
        """Send a call to ``shard``; a Future of its result. A call beyond the bound waits
        unpickled in ``link.waiting``; a ``control`` call (shardio's own: the stop protocol,
        the test clock's probes) is never held back, so the bound cannot hold up what
        waits on it, and it goes behind every waiting call that has room now."""
        future = PolledFuture()
        if self.call_poll_seconds:
            future._endpoint = self
        self._submit(shard, func, args, kwargs, future, control)
        return future

    def call(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
             ) -> asyncio.Future:
        """Send a call to ``shard`` from the running asyncio loop; a future of that loop.

        The loop takes the reply off the ring itself (see the module's doc).
        """
        loop = asyncio.get_running_loop()
        driver = self._drivers.get(loop)
        if driver is None:
            driver = self._drivers[loop] = _LoopDriver(self, loop)
            for other in [other for other in self._drivers if other.is_closed()]:
                del self._drivers[other]
        future = loop.create_future()
        call = _LoopCall(future, driver)
        self._submit(shard, func, args, kwargs, call, False)
        if not future.done():
            driver.begin(call)
        return future

    def _submit(self, shard: int, func: Callable, args: tuple, kwargs: dict | None,
                future: Any, control: bool) -> None:
        if self._closing:
            raise GroupStateError("cannot submit: this endpoint was closed")
        if not 0 <= shard < self.shard_count:
            raise ValueError(f"no shard {shard}: this group has shards 0..{self.shard_count - 1}")
        link = self.links[shard]
        if link.dead:
            future.set_exception(ShardDied(shard, link.death_detail))
            return
        with self.lock:
            if link.dead:
                future.set_exception(ShardDied(shard, link.death_detail))
                return
            failed = self._admit_locked(link) if control and link.waiting else []
            if not control and not link.has_room():
                link.waiting.append((future, func, args, kwargs))
                link.bound_waits += 1
                return
            self._send_call(link, future, func, args, kwargs)
        _fail_waiting(failed)  # outside the lock, as _admit does

    def _send_call(self, link: Link, future: concurrent.futures.Future, func: Callable,
                   args: tuple, kwargs: dict | None) -> None:
        """Encode and send one call (under the lock)."""
        request_id = self._next_request_id
        self._next_request_id = request_id + 1
        # The common call, as a shard sends it: an interned function and plain positional
        # arguments go compact (encode_call answers None otherwise); the rest, and every
        # function's first call (which interns it), through encode_request.
        number = link.interned.get(func) if not kwargs and type(func) in _INTERNABLE else None
        payload = _encode_call(request_id, number, args) if number is not None else None
        if payload is None or len(payload) > self.max_message_bytes:
            payload = encode_request(request_id, func, args, kwargs, f"shard {link.peer}",
                                     link.interned, self.max_message_bytes)
        link.pending[request_id] = future
        if link.send(payload):
            self.backlogged = True

    def _admit(self, link: Link) -> None:
        """Send waiting calls, oldest first, while the bound allows (receiver thread)."""
        with self.lock:
            failed = self._admit_locked(link)
        _fail_waiting(failed)

    def _admit_locked(self, link: Link) -> list[tuple[concurrent.futures.Future, Exception]]:
        """Send waiting calls that have room (under the lock); those that failed to go."""
        failed = []
        waiting = link.waiting
        while waiting and link.room_for_waiting() and not link.dead:
            future, func, args, kwargs = waiting.popleft()
            if future.cancelled():
                continue
            try:
                self._send_call(link, future, func, args, kwargs)
            except Exception as error:  # cannot be pickled, too large
                failed.append((future, error))
        return failed

    def in_flight(self) -> int:
        """Calls submitted from outside that wait for their result (sent or held back)."""
        with self.lock:
            return sum(len(link.pending) + len(link.waiting) for link in self.links)

    # ------------------------------------------------------------ polling callers

    def poll_once(self) -> bool:
        """Take what the inbound rings hold, unless another thread is at it; True if any."""
        if not self.backlogged and not any_ready(self.inbound_rings):
            return False  # the common case while a caller spins: one C call, no lock
        lock = self.consume_lock
        if not lock.acquire(blocking=False):
            return False
        try:
            return self._drain()
        finally:
            lock.release()

    def add_poller(self, poller: Any) -> None:
        """A caller starts polling: shards need not ring while it does.  The receiver
        thread must then wake now and then to take over from a poller that stops
        making progress, so one sleeping without a timeout is poked."""
        self.pollers[poller] = None
        self.sleeping.clear()
        if self.untimed_sleep:
            self._poke()

    def stop_polling(self) -> None:
        """A poller stops: set the sleeping flag, then drain once more (the sleep
        protocol), so a reply published from now on rings the doorbell."""
        self.sleeping.set()
        if self.backlogged or any_ready(self.inbound_rings):
            with self.consume_lock:
                self._drain()

    def poll_until_done(self, future: concurrent.futures.Future, timeout: float | None) -> None:
        """Poll the rings from the calling thread until ``future`` is done, for at most
        the endpoint's poll window (and ``timeout``)."""
        window = self.call_poll_seconds
        if timeout is not None:
            window = min(window, max(0.0, timeout))
        poller = _Poller()
        self.add_poller(poller)
        try:
            end = poller.heartbeat + window
            poll_once = self.poll_once
            # ``settled`` rather than done(): done() takes the future's condition.
            while not future.settled:
                if not poll_once():
                    now = poller.heartbeat = _perf_counter()
                    if now >= end:
                        break
        finally:
            self.pollers.pop(poller, None)
            self.stop_polling()

    def _messages_received(self) -> int:
        return sum(link.received_messages for link in self.links)

    def loop_counters(self, loop: asyncio.AbstractEventLoop) -> dict[str, int]:
        """How ``loop`` took its replies: poll callbacks run, replies handed over by
        another thread (``hops``), replies whose task resumed inside the poll
        (``eager``); zeros for a loop that never called."""
        driver = self._drivers.get(loop)
        if driver is None:
            return {"polls": 0, "hops": 0, "eager": 0}
        return {"polls": driver.polls, "hops": driver.hops, "eager": driver.eager}

    def _fresh_pollers(self) -> bool:
        """Is a poller still polling (receiver thread)?  Forgets the ones that are gone."""
        now = _perf_counter()
        fresh = False
        for poller in list(self.pollers):
            if poller.gone():
                self.pollers.pop(poller, None)
            elif now - poller.heartbeat < STALE_POLLER:
                fresh = True
        return fresh

    # ------------------------------------------------------------ watching

    def watch(self, fd: int, shard: int, describe: Callable[[], str]) -> None:
        """Treat ``fd`` becoming readable (a process sentinel) as the death of ``shard``."""
        self._watch[fd] = (shard, describe)
        self._poke()

    def report_death(self, shard: int, detail: str) -> None:
        """Declare ``shard`` dead from any thread (the thread backend uses this)."""
        with self.lock:
            self._deaths.append((shard, detail))
        self._poke()

    def expect_exit(self) -> None:
        """From now on shards exiting is the plan (stop), not a death."""
        self._expected_exit = True

    def _poke(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass

    # ------------------------------------------------------------ receiving

    def _receive(self) -> None:
        poller = select.poll()
        poller.register(self.doorbell.fd, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        watched: set[int] = set()
        while not self._closing:
            for fd in self._watch.keys() - watched:
                poller.register(fd, select.POLLIN)
                watched.add(fd)
            # Sleep protocol of the owner's receiver: it never spins.  While a caller
            # polls, the flag stays clear (the caller sets it when it stops); one that
            # stopped polling without doing so is taken over after STALE_POLLER.
            self.untimed_sleep = True  # a poller that registers now pokes us
            fresh = False
            if self.pollers:
                self.untimed_sleep = False
                timeout: float | None = STALE_POLLER * 1000
                fresh = self._fresh_pollers()
            else:
                timeout = None
            if not fresh:  # a fresh poller drains every ring itself: leave them to it
                self.sleeping.set()
                with self.consume_lock:
                    before = self._messages_received()
                    did = self._drain()
                    self.receiver_messages += self._messages_received() - before
                if did:
                    self.untimed_sleep = False
                    continue
            events = poller.poll(timeout)
            self.untimed_sleep = False
            for fd, _events in events:
                if fd == self.doorbell.fd:
                    self.doorbell.drain()
                elif fd == self._wake_read:
                    try:
                        os.read(self._wake_read, 4096)
                    except BlockingIOError:
                        pass
                elif fd in self._watch:
                    poller.unregister(fd)
                    shard, describe = self._watch.pop(fd)
                    watched.discard(fd)
                    if not self._expected_exit:
                        self._shard_died(shard, describe())
            with self.lock:
                deaths, self._deaths = self._deaths, []
            for shard, detail in deaths:
                self._shard_died(shard, detail)

    def _reply_handler(self, link: Link) -> Callable[[bytes], None]:
        """What Ring.dispatch calls for a message it does not resolve itself (a pickled
        result, an error, the shard's notice that it dropped this endpoint's link)."""
        complete = self._complete

        def on_message(message: bytes) -> None:
            try:
                complete(link, message)
            except Exception:  # one bad reply must not stop the receiver
                log.exception("the owner could not handle a reply of %d bytes from shard %d",
                              len(message), link.peer)

        return on_message

    def _drain(self) -> bool:
        """Take the replies off every inbound ring (the caller holds ``consume_lock``).

        ``Ring.dispatch`` resolves a compact result's future in C: it pops the
        future from ``link.pending`` (a dict operation, atomic under the GIL: the
        submitting threads only add to it, under ``self.lock``) and sets its result.
        """
        if self.closed:
            return False
        if self._draining:
            return self._drain_nested()
        self._draining = True
        try:
            return self._dispatch_all()
        finally:
            self._draining = False

    def _drain_nested(self) -> bool:
        """``_drain`` from a done callback that a dispatch in progress runs on this
        thread (the callback waits on another reply): dispatch() cannot be re-entered,
        so take the rings with get(); the outer dispatch reads on after them."""
        did = False
        for link, _dispatch, on_message in self._receivers:
            messages = link.inbound.get(BATCH)
            if messages is None:
                continue
            did = True
            link.received_messages += len(messages)
            link.received_bytes += sum(map(len, messages))
            for message in messages:
                on_message(message)
        return did

    def _dispatch_all(self) -> bool:
        did = False
        for link, dispatch, on_message in self._receivers:
            while True:
                try:
                    got = dispatch(BATCH, link.pending, _NO_FUNCTIONS, _refuse_call, on_message)
                except _InvalidStateError:
                    # Another thread finished the future first (a death or close
                    # failed it; the caller cancelled it): the message was consumed.
                    did = True
                    continue
                break
            if got is None:
                continue
            did = True
            if link.inbound.take_space_waiter():
                link.wake_peer()
            # A submitter that saw the bound full before this dispatch made room may be
            # about to hold its call back: the lock orders us after it, so it is admitted.
            if link.waiting or len(link.pending) + got >= link.max_calls:
                with self.lock:
                    failed = self._admit_locked(link) if link.waiting else []
                _fail_waiting(failed)
        if self.backlogged:
            self.backlogged = False
            for link in self.links:
                if link.backlog:
                    with self.lock:
                        moved = link.flush()
                        if link.backlog:
                            self.backlogged = True
                    if moved:
                        did = True
                        if link.waiting:
                            self._admit(link)
        return did

    def _complete(self, link: Link, message: bytes) -> None:
        kind, request_id = _unpack_header(message)
        if kind not in _REPLY_KINDS:
            log.error("the %s endpoint dropped a message of kind %d from shard %d: endpoints "
                      "take only replies", self.name, kind, link.peer)
            return
        with self.lock:
            future = link.pending.pop(request_id, None)
        if future is None:
            if request_id == LINK_FAILED_REQUEST and kind == REPLY_ERROR:
                # The shard dropped this (attached) endpoint's link: see attach_protocol.
                error = decode_error(memoryview(message)[_HEADER_SIZE:])
                self._shard_died(link.peer, getattr(error, "detail", None) or str(error))
            return
        body = memoryview(message)[_HEADER_SIZE:]
        try:
            if kind in (REPLY_OK, RESULT):
                try:
                    value = decode_result(kind, body)
                except Exception as error:
                    future.set_exception(RemoteError(
                        f"the result from shard {link.peer} could not be decoded: {error!r}"))
                else:
                    future.set_result(value)
            else:
                future.set_exception(decode_error(body))
        except _InvalidStateError:
            pass  # the caller cancelled it

    def _shard_died(self, shard: int, detail: str) -> None:
        link = self.links[shard]
        if link.dead:
            return
        log.error("shard %d died: %s", shard, detail)
        with self.lock:
            link.death_detail = detail  # before dead: a submit that sees dead reads it
            link.dead = True
            pending, link.pending = link.pending, {}
            waiting, link.waiting = link.waiting, deque()
            link.drop_backlog()
        if self.is_owner:
            self.alive[shard].clear()
        with self.consume_lock:
            link.inbound.reset_consumer()
        for future in [*pending.values(), *(entry[0] for entry in waiting)]:
            try:
                future.set_exception(ShardDied(shard, detail))
            except concurrent.futures.InvalidStateError:
                pass
        for other in range(self.shard_count if self.is_owner else 0):
            if other != shard and not self.links[other].dead:
                self.submit(other, _peer_died, (shard, detail), None)
        if self.on_death is not None:
            try:
                self.on_death(shard, detail)
            except Exception:
                log.exception("on_death callback failed")

    def is_dead(self, shard: int) -> bool:
        return self.links[shard].dead

    # ------------------------------------------------------------ closing

    def close(self, reason: str = "the group stopped before the call returned") -> None:
        """Stop the receiver thread, fail what is left, release the rings."""
        self._closing = True
        self.closed = True  # loops polling or reading for it let go at their next callback
        self._poke()
        self._thread.join(timeout=5)
        with self.lock:
            leftovers = [f for link in self.links for f in link.pending.values()]
            leftovers += [entry[0] for link in self.links for entry in link.waiting]
            for link in self.links:
                link.pending = {}
                link.waiting = deque()
        for future in leftovers:
            try:
                future.set_exception(ShardDied(-1, reason))
            except concurrent.futures.InvalidStateError:
                pass
        with self.consume_lock:  # no poller is in the middle of a dispatch
            for link in self.links:
                link.close()
        for flag in self.alive:
            flag.close()
        self.sleeping.close()
        os.close(self._wake_read)
        os.close(self._wake_write)


def describe_exit(process: Any) -> Callable[[], str]:
    """A callable that says how a shard process ended (for ShardDied)."""

    def describe() -> str:
        process.join(timeout=1)
        code = process.exitcode
        if code is None:
            return "its process is gone"
        if code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"killed by {name}"
        return f"exited with code {code}"

    return describe
