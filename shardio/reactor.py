"""The per-shard reactor: an asyncio event loop extended with pollers.

While it has work, or for ``idle_poll_us`` after its last work, the reactor
polls its inbound rings, its MPSC inbox and its registered pollers once per
loop iteration (a callback that re-queues itself with ``call_soon``), so a
busy peer reaches it with no system call at all.  When the window passes
with nothing found, it sleeps: it sets its ``sleeping`` flag, issues a full
fence, polls once more, and only then lets the loop block in epoll, where
its doorbell (an eventfd) wakes it.  A producer rings the doorbell only if
it flips that flag from set to clear, so no wake-up is lost and a busy
reactor costs its peers nothing (docs/design.md, section 4).

Asleep means asleep: the loop wakes for sockets and timers too, and the
first callback it schedules after such a wake (every task wake-up and
future completion goes through ``call_soon``) clears the flag and resumes
polling, so a shard busy with other work is not rung for each message.  The
loops shardio makes (``loop="auto"/"uvloop"/"asyncio"``) carry that hook; a
loop from a user's factory does not, and keeps the flag set until its
doorbell rings.  Sleep time is the wall time asleep minus the CPU time the
thread used meanwhile, so work done between wakes counts as busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import os
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from inspect import isawaitable
from typing import Any

from .errors import (
    CannotCrossError,
    NotInShardError,
    RemoteError,
    ShardDied,
    WrongThreadError,
)
from .fabric._ring import (
    dispatch_handovers,
    encode_call,
    encode_result as encode_compact_result,
    ready_mask,
)
from .fabric.link import DEFAULT_MAX_BYTES, DEFAULT_MAX_CALLS, Link
from .fabric.mesh import Mesh
from .fabric.messages import (
    CALL,
    HEADER,
    REPLY_ERROR,
    REPLY_OK,
    REQUEST,
    REQUEST_IN_GROUP,
    REQUEST_WITH_FUNCTION,
    RESULT,
    decode_error,
    decode_in_group,
    decode_request,
    decode_result,
    encode_error,
    encode_in_group,
    encode_request,
    encode_result,
)

log = logging.getLogger("shardio.reactor")

SPIN_SECONDS = 20e-6
"""While idle-polling, how long one poll callback keeps polling before it lets the loop
run (its timers and I/O) again."""

BATCH = 64
"""Messages taken from one inbound ring per poll.  They run back to back, so the
batch bounds how long other work waits behind a burst of calls (64 calls of 30 us
are 2 ms); the per-poll cost it amortizes is about a microsecond."""

INLINE = 1
"""What Reactor._drain answers when all it did completed inside Ring.dispatch."""

_local = threading.local()
_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size
_CoroutineType = types.CoroutineType
_PLAIN_RESULTS = frozenset({type(None), bool, int, float, str, bytes, tuple, list, dict, set})
_INTERNABLE = frozenset({types.FunctionType, types.BuiltinFunctionType})
_perf_counter = time.perf_counter

_serving_shard_request: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "shardio_serving_shard_request", default=False)
"""True in a task that serves a call from another shard: its own calls are nested
and not held back by the bound (docs/design.md, "Bounded cross-shard calls")."""


def current_reactor() -> Reactor | None:
    """The reactor of the calling thread, or None outside a shard."""
    return getattr(_local, "reactor", None)


_process_reactor: Reactor | None = None


def set_process_reactor(reactor: Reactor | None) -> None:
    """Make ``reactor`` the home of every thread of this (shard) process."""
    global _process_reactor
    _process_reactor = reactor


def home_reactor() -> Reactor | None:
    """The shard the calling thread works for: its own reactor, the one it was bound
    to (``bind_thread``, alien and watchdog threads), or its process's shard."""
    return (getattr(_local, "reactor", None) or getattr(_local, "home_reactor", None)
            or _process_reactor)


def require_reactor() -> Reactor:
    reactor = getattr(_local, "reactor", None)
    if reactor is None:
        raise NotInShardError(
            "this call must run on a shard's reactor thread (inside code submitted to a "
            "ShardGroup); from outside use group.submit() or group.call()"
        )
    return reactor


class ReactorStats:
    """Plain counters, read by the metrics layer at scrape time."""

    __slots__ = (
        "polls", "idle_spins", "sleeps", "doorbell_wakeups", "work_wakeups", "asleep_seconds",
        "requests_in_python", "served_rings", "tasks_started", "external_submissions",
        "inbox_items", "batches", "batch_messages", "started_at", "stalls", "cpu_clock",
    )

    def __init__(self) -> None:
        self.polls = 0
        self.idle_spins = 0
        self.sleeps = 0
        self.doorbell_wakeups = 0
        self.work_wakeups = 0
        self.asleep_seconds = 0.0  # wall time from sleeping to waking, summed
        self.cpu_clock: int | None = None  # the reactor thread's CPU-time clock, once it runs
        self.requests_in_python = 0  # calls run by Reactor._execute
        self.served_rings: tuple = ()  # rings whose dispatch runs calls itself (serve path)
        self.tasks_started = 0
        self.external_submissions = 0
        self.inbox_items = 0
        self.batches = 0
        self.batch_messages = 0
        self.started_at = time.monotonic()
        self.stalls = 0

    @property
    def requests_run(self) -> int:
        """Calls from other endpoints this shard ran."""
        return self.requests_in_python + sum(ring.served_calls for ring in self.served_rings)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the reactor thread (readable from any thread)."""
        return 0.0 if self.cpu_clock is None else time.clock_gettime(self.cpu_clock)

    @property
    def sleep_seconds(self) -> float:
        """Time the reactor slept: from setting its sleeping flag to waking, but never
        more than the time its thread did not use the CPU (callbacks the loop ran
        before the reactor noticed it was awake are not sleep). Both clocks are
        read here, not at every sleep: a thread CPU-time read is a system call."""
        idle = time.monotonic() - self.started_at - self.cpu_seconds
        return max(0.0, min(self.asleep_seconds, idle))


def new_event_loop(kind: str | Callable[[], asyncio.AbstractEventLoop] = "auto"
                   ) -> asyncio.AbstractEventLoop:
    """A fresh loop: uvloop when installed (``"auto"``), as named, or from a factory.

    A factory must be picklable (a module-level function) for process shards.
    """
    if callable(kind):
        return kind()
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return _wake_hooked(uvloop.Loop)()
    elif kind != "asyncio":
        raise ValueError(f"loop must be 'auto', 'uvloop' or 'asyncio', got {kind!r}")
    return _wake_hooked(asyncio.SelectorEventLoop)()


_hookable_classes: dict[type, type] = {}


def _wake_hooked(base: type) -> type:
    """``base`` with an instance ``__dict__``, so a reactor can shadow ``call_soon``.

    While the reactor sleeps (or confirms it is idle) it sets the instance
    attribute ``call_soon`` to a hook that schedules the callback and then
    tells the reactor it is awake; awake, the attribute is deleted and
    ``call_soon`` is the loop's own method again, at no cost.
    """
    hookable = _hookable_classes.get(base)
    if hookable is None:
        hookable = type(f"Shard{base.__name__}", (base,), {
            "__doc__": f"{base.__name__} whose call_soon a sleeping shardio reactor can hook.",
            "shardio_hookable": True})
        _hookable_classes[base] = hookable
    return hookable


class Reactor:
    """One shard: its loop, its side of the fabric, its local services."""

    def __init__(self, shard_id: int, shard_count: int, mesh: Mesh, *,
                 idle_poll_us: float, loop: str | Callable = "auto",
                 max_message_bytes: int = 256 << 20,
                 stall_threshold_ms: float | None = 25.0,
                 max_calls_per_peer: int = DEFAULT_MAX_CALLS,
                 max_queued_bytes_per_peer: int = DEFAULT_MAX_BYTES) -> None:
        self.shard_id = shard_id
        self.shard_count = shard_count
        self.owner_endpoint = mesh.layout.endpoints - 1
        self.mesh = mesh
        self.loop_kind = loop
        self.idle_poll_seconds = idle_poll_us / 1e6
        self.max_message_bytes = max_message_bytes
        self.stall_threshold_ms = stall_threshold_ms
        self.stall_detector: Any = None
        self.interceptor: Any = None
        """When set (shardio.testing), sees every outgoing cross-shard call first."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread_id = 0
        self.stats = ReactorStats()
        self.services: dict[Any, Any] = {}
        self.sleeping = mesh.sleeping_flag(shard_id)
        self.doorbell = mesh.doorbells[shard_id]
        self.links: list[Link | None] = []
        for peer in range(mesh.layout.endpoints):
            if peer == shard_id:
                self.links.append(None)
                continue
            self.links.append(Link(peer, mesh.ring(shard_id, peer), mesh.ring(peer, shard_id),
                                   mesh.sleeping_flag(peer), mesh.doorbells[peer].fd,
                                   max_calls=max_calls_per_peer,
                                   max_bytes=max_queued_bytes_per_peer))
        self.max_calls_per_peer = max_calls_per_peer
        self.max_queued_bytes_per_peer = max_queued_bytes_per_peer
        self.control_socket: Any = None
        """Process backend: the socket the owner passes descriptors on (added endpoints)."""
        self._endpoints: dict[int, Any] = {}
        self._inbound_guards: dict[int, Callable[..., Any]] = {}
        self._serving_context: contextvars.Context | None = None
        self._rebuild_links()
        self._backlogged: set[Link] = set()
        self._inbox: deque[tuple[Callable, tuple]] = deque()
        self._pollers: list[Callable[[], bool]] = []
        self._start_hooks: list[Callable[[Reactor], Any]] = []
        self._shutdown_hooks: list[Callable[[], Any]] = []
        self._next_request_id = 1
        self._idle_since = 0.0
        self._asleep = False
        self._asleep_since = 0.0
        self._wake_hook = False
        self._on_wake: Callable[[], None] | None = None
        self._confirming = False  # one idle loop iteration away from sleeping
        self._inline_dispatch = False  # the last dispatch could complete work inside it
        self._quiet_link: Link | None = None  # replies to it wait for one wake check
        self._root_context: contextvars.Context | None = None
        self._exit: asyncio.Future | None = None
        self._call_soon: Callable | None = None
        self._create_future: Callable[[], asyncio.Future] | None = None
        self.running_group: Any = None
        """The scheduling group whose slice runs now (shardio.scheduling sets it): calls
        sent meanwhile run in the same-named group on the receiving shard."""

    # ------------------------------------------------------------ running

    def run(self) -> None:
        """Run the reactor on the calling thread until it is told to exit."""
        loop = new_event_loop(self.loop_kind)
        self.loop = loop
        self._create_future = loop.create_future
        self.thread_id = threading.get_ident()
        self.stats.cpu_clock = time.pthread_getcpuclockid(self.thread_id)
        self._wake_hook = getattr(type(loop), "shardio_hookable", False)
        # Bound now: the reactor's own re-polls never go through the wake hook.
        self._call_soon = loop.call_soon
        # The reactor's own callbacks run in a context of their own: scheduled from
        # wherever (the wake hook runs inside other code's callbacks), they would
        # otherwise inherit that code's context, _serving_shard_request included.
        self._root_context = contextvars.copy_context()
        self._root_context.run(_serving_shard_request.set, False)
        self._serving_context = self._root_context.copy()
        self._serving_context.run(_serving_shard_request.set, True)
        self._rebuild_links()  # the serve path needs the serving context
        asyncio.set_event_loop(loop)
        _local.reactor = self
        self.sleeping.clear()
        try:
            self._exit = loop.create_future()
            if self.stall_threshold_ms:
                from .stall import StallDetector

                self.stall_detector = StallDetector(self, self.stall_threshold_ms / 1000.0)
            loop.run_until_complete(self._run_start_hooks())  # before the stall detector runs
            if self.stall_detector is not None:
                self.stall_detector.start()
            loop.add_reader(self.doorbell.fd, self._on_doorbell)
            loop.call_soon(self._poll, context=self._root_context)
            loop.run_until_complete(self._exit)
            loop.run_until_complete(self.run_shutdown_hooks())
            self._cancel_remaining_tasks()
            self._flush_all()
        finally:
            if self.stall_detector is not None:
                self.stall_detector.stop()
            try:
                loop.remove_reader(self.doorbell.fd)
            except Exception:
                pass
            _local.reactor = None
            asyncio.set_event_loop(None)
            loop.close()

    def request_exit(self) -> None:
        """Leave ``run()`` after the current iteration (reactor thread only)."""
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(None)

    def close(self) -> None:
        """Release this reactor's views of the shared segment."""
        for link in self._active_links:
            link.close()
        for endpoint in self._endpoints.values():
            endpoint.close()
        self._endpoints.clear()
        self.sleeping.close()
        if self.control_socket is not None:
            self.control_socket.close()

    async def _run_start_hooks(self) -> None:
        for hook in self._start_hooks:
            result = hook(self)
            if isawaitable(result):
                await result

    async def run_shutdown_hooks(self) -> None:
        """Run (and forget) the shutdown hooks, last added first."""
        while self._shutdown_hooks:
            hook = self._shutdown_hooks.pop()
            try:
                result = hook()
                if isawaitable(result):
                    await result
            except Exception:
                log.exception("shutdown hook %r failed on shard %d", hook, self.shard_id)

    def _cancel_remaining_tasks(self) -> None:
        loop = self.loop
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    def _flush_all(self) -> None:
        """Push out backlogged replies before exit, as far as peers take them (1 s)."""
        deadline = time.monotonic() + 1.0
        while self._backlogged and time.monotonic() < deadline:
            for link in list(self._backlogged):
                link.flush()
                if not link.backlog or link.dead:
                    self._backlogged.discard(link)
            if self._backlogged:
                time.sleep(0.001)

    # ------------------------------------------------------------ polling

    def _poll(self) -> None:
        stats = self.stats
        stats.polls += 1
        if self._drain():
            self._idle_since = 0.0
            if self._confirming:
                self._confirming = False
                self._unhook()
            self._call_soon(self._poll, context=self._root_context)
            return
        now = _perf_counter()
        if not self._idle_since:
            self._idle_since = now
        window_end = self._idle_since + self.idle_poll_seconds
        if now < window_end:
            stats.idle_spins += 1
            # Poll again right here for a few microseconds before going round the
            # loop: a reply that is on its way is handled without the cost of a
            # loop iteration (an epoll call and a handle), and I/O waits at most
            # SPIN_SECONDS for its turn.
            # Work that completed inside the dispatch (compact replies that resumed
            # their tasks at once, calls served in C, nothing handed to the loop)
            # does not end the spin: only work that left callbacks for the loop does.
            spin_end = min(now + SPIN_SECONDS, window_end)
            drain = self._drain
            while _perf_counter() < spin_end:
                found = drain()
                if found:
                    self._idle_since = 0.0
                    if found is not INLINE:
                        break
            self._call_soon(self._poll, context=self._root_context)
            return
        if self._wake_hook and not self._confirming:
            # Callbacks queued before this poll still run after it.  Go round the
            # loop once more (a zero-timeout epoll): if nothing calls call_soon
            # meanwhile, the next poll is the last callback before the loop blocks.
            self._confirming = True
            self._hook(self._saw_work)
            self._call_soon(self._poll, context=self._root_context)
            return
        self._confirming = False
        # Sleep protocol: flag, full fence (inside set()), one more poll.
        self.sleeping.set()
        if self._drain():
            self.sleeping.clear()
            self._idle_since = 0.0
            self._unhook()
            self._call_soon(self._poll, context=self._root_context)
            return
        self._asleep = True
        self._asleep_since = _perf_counter()
        stats.sleeps += 1
        if self._wake_hook:
            self._hook(self._woken_by_work)

    def _hook(self, on_wake: Callable[[], None]) -> None:
        """Run ``on_wake`` after the loop's next ``call_soon`` (see :func:`_wake_hooked`)."""
        if self._on_wake is None:
            self.loop.call_soon = self._hooked_call_soon
        self._on_wake = on_wake

    def _unhook(self) -> None:
        if self._on_wake is not None:
            self._on_wake = None
            del self.loop.call_soon

    def _hooked_call_soon(self, callback: Callable, *args: Any,
                          context: contextvars.Context | None = None) -> asyncio.Handle:
        handle = self._call_soon(callback, *args, context=context)
        on_wake = self._on_wake
        if on_wake is not None:  # after the callback: the poll then follows its work
            self._unhook()
            on_wake()
        return handle

    def _saw_work(self) -> None:
        """Something was scheduled while the reactor confirmed it is idle: not yet."""
        self._confirming = False

    def _wake(self) -> None:
        """Leave the sleep state: clear the flag, account the time truly asleep."""
        self._asleep = False
        self.sleeping.clear()
        self._unhook()
        # Socket and timer callbacks may have run before anything woke the reactor:
        # ReactorStats.sleep_seconds takes their CPU time out when it is read.
        self.stats.asleep_seconds += _perf_counter() - self._asleep_since
        self._idle_since = 0.0

    def _on_doorbell(self) -> None:
        self.doorbell.drain()
        if self._asleep:
            self._wake()
            self.stats.doorbell_wakeups += 1
            self._poll()

    def _woken_by_work(self) -> None:
        """The loop scheduled a callback while the reactor slept: it is awake, so poll."""
        if self._asleep:
            self._wake()
            self.stats.work_wakeups += 1
            self._call_soon(self._poll, context=self._root_context)

    def _drain(self) -> bool | int:
        """Poll everything once; true if any work was found: ``INLINE`` when it was all
        messages that Ring.dispatch completed without handing anything to Python or the
        loop, True otherwise."""
        did: bool | int = False
        ready = ready_mask(self._inbound_rings)
        if ready:
            handovers = dispatch_handovers()
            did = self._dispatch_links(ready)
            if did and dispatch_handovers() == handovers and self._inline_dispatch:
                did = INLINE
        if self._inbox:
            did = True
            self._run_inbox()
        if self._backlogged:
            for link in list(self._backlogged):
                if link.flush():
                    did = True
                    if link.waiting:
                        self._admit(link)
                if not link.backlog:
                    self._backlogged.discard(link)
        for poller in self._pollers:
            try:
                if poller():
                    did = True
            except Exception:
                log.exception("poller %r failed on shard %d; it is removed", poller, self.shard_id)
                self._pollers.remove(poller)
                return True
        return did

    def _dispatch_links(self, ready: int = -1) -> bool:
        """Act on the messages waiting in the inbound rings (Ring.dispatch, in C);
        ``ready``: which rings have some (``ready_mask``), all by default."""
        did = False
        stats = self.stats
        # A reply resumes its awaiting task right here, not one loop iteration later
        # (Ring.dispatch's eager wake-up), unless the wake hook shadows call_soon.
        eager_loop = self.loop if self._wake_hook and self._on_wake is None else None
        self._inline_dispatch = eager_loop is not None
        try:
            for (bit, link, dispatch, take_space_waiter, functions, on_call, on_message,
                 serve) in self._inbound:
                if not ready & bit:
                    continue
                # Replies to this link's calls are published without a wake check
                # each; one check after the dispatch covers them all (see Link.send).
                self._quiet_link = link
                sent = link.sent_messages
                try:
                    if serve is None:
                        got = dispatch(BATCH, link.pending, functions, on_call, on_message,
                                       eager_loop)
                    else:
                        got = dispatch(BATCH, link.pending, functions, on_call, on_message,
                                       eager_loop, serve)
                except Exception:  # one bad message must not stop the poll loop
                    log.exception("shard %d could not handle a message from endpoint %d",
                                  self.shard_id, link.peer)
                    got = 1
                if got is None:
                    continue
                did = True
                stats.batches += 1
                stats.batch_messages += got  # the link's counts are the ring's own
                if take_space_waiter() or link.sent_messages != sent:
                    link.wake_peer()
                if link.waiting:  # replies made room
                    self._admit(link)
        finally:
            self._quiet_link = None
        return did

    def _run_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            func, args = inbox.popleft()
            self.stats.inbox_items += 1
            try:
                func(*args)
            except Exception:
                log.exception("inbox callback %r failed on shard %d", func, self.shard_id)

    # ------------------------------------------------------------ messages

    def _handle(self, link: Link, message: bytes) -> None:
        kind, request_id = _unpack_header(message)
        # Slicing copies, which is cheaper than a memoryview for small messages.
        body = message[_HEADER_SIZE:] if len(message) < 65536 else memoryview(message)[_HEADER_SIZE:]
        if kind in (REPLY_OK, RESULT):
            future = link.pending.pop(request_id, None)
            if future is not None and not future.done():
                try:
                    future.set_result(decode_result(kind, body))
                except Exception as error:
                    future.set_exception(RemoteError(
                        f"the result from endpoint {link.peer} could not be unpickled: {error!r}"))
        elif kind in (REQUEST, REQUEST_WITH_FUNCTION, CALL):
            try:
                func, args, kwargs = decode_request(kind, body, link.functions)
            except Exception as error:
                self._refuse_undecodable(link, request_id, error)
                return
            self._execute(link, request_id, func, args, kwargs)
        elif kind == REPLY_ERROR:
            future = link.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(decode_error(body))
        elif kind == REQUEST_IN_GROUP:
            self._execute_in_group(link, request_id, body)
        else:
            log.error("shard %d dropped a message of unknown kind %d from endpoint %d",
                      self.shard_id, kind, link.peer)

    def _refuse_undecodable(self, link: Link, request_id: int, error: Exception) -> None:
        """Answer a call whose bytes could not be turned back into a function call."""
        self._send(link, encode_error(request_id, CannotCrossError(
            f"shard {self.shard_id} could not unpickle the call: {error!r} (is the "
            "function importable in the shard process?)"), self.shard_id))

    def _execute_in_group(self, link: Link, request_id: int, body: Any) -> None:
        """A call made in a scheduling group: queued in the same-named group here."""
        try:
            name, shares, kind, inner = decode_in_group(body)
            func, args, kwargs = decode_request(kind, inner, link.functions)
        except Exception as error:
            self._refuse_undecodable(link, request_id, error)
            return
        from .scheduling.calls import run_in_group  # scheduling builds on tame: loaded on use

        run_in_group(self, name, shares, link, request_id, func, args, kwargs)

    def _execute(self, link: Link, request_id: int, func: Callable, args: tuple,
                 kwargs: dict | None = None) -> None:
        self.stats.requests_in_python += 1
        from_shard = link.peer < self.shard_count
        try:
            if from_shard:  # in the serving context: its calls, and its tasks', are nested
                result = self._serving_context.run(func, *args, **kwargs) if kwargs else \
                    self._serving_context.run(func, *args)
            else:
                result = func(*args, **kwargs) if kwargs else func(*args)
        except BaseException as error:
            self._send(link, encode_error(request_id, error, self.shard_id))
            return
        # Cheaper than inspect.isawaitable (measured 0.25 us less per call); plain
        # values skip even that.
        if type(result) not in _PLAIN_RESULTS and (type(result) is _CoroutineType or (
                result is not None and hasattr(type(result), "__await__"))):
            self._serve_awaitable(link, request_id, result, from_shard)
            return
        # _reply(), inlined: this is every call's path.  Every peer reads the compact
        # result in C (Ring.dispatch): shards and endpoints alike.
        payload = encode_compact_result(request_id, result)
        if payload is None:
            self._reply(link, request_id, result)
        elif not link.dead and link.send(payload, link is not self._quiet_link):
            self._backlogged.add(link)

    def _serve_awaitable(self, link: Link, request_id: int, result: Any, from_shard: bool
                         ) -> None:
        """A call returned an awaitable: run it as a task and reply when it is done."""
        self.stats.tasks_started += 1
        if type(result) is _CoroutineType:
            # The task and the tasks it starts know whether they serve another shard.
            task = self.loop.create_task(result, context=(
                self._serving_context if from_shard else self._root_context).copy())
        else:
            task = asyncio.ensure_future(result, loop=self.loop)
        task.add_done_callback(lambda done: self._reply_from_task(link, request_id, done))

    def _send_served_reply(self, link: Link, payload: bytes) -> None:
        """Ring.dispatch's serve path: a compact result for another shard's call.  Sent
        during the dispatch of ``link``, so its wake-up check comes after the batch."""
        if not link.dead and link.send(payload, False):
            self._backlogged.add(link)

    def _finish_served(self, link: Link, request_id: int, result: Any,
                       error: BaseException | None) -> None:
        """Ring.dispatch's serve path ran another shard's call, which raised or returned
        something that is not a compact plain value: finish it as _execute would."""
        if error is not None:
            self._send(link, encode_error(request_id, error, self.shard_id))
        elif type(result) not in _PLAIN_RESULTS and (type(result) is _CoroutineType or (
                result is not None and hasattr(type(result), "__await__"))):
            self._serve_awaitable(link, request_id, result, True)
        else:
            self._reply(link, request_id, result)

    def _reply_from_task(self, link: Link, request_id: int, task: asyncio.Future) -> None:
        if task.cancelled():
            error: BaseException = asyncio.CancelledError(
                f"the call was cancelled on shard {self.shard_id}")
            self._send(link, encode_error(request_id, error, self.shard_id))
            return
        error = task.exception()
        if error is not None:
            self._send(link, encode_error(request_id, error, self.shard_id))
        else:
            self._reply(link, request_id, task.result())

    def _reply(self, link: Link, request_id: int, result: Any) -> None:
        try:
            payload = encode_result(request_id, result, True)
        except Exception as error:
            payload = encode_error(request_id, CannotCrossError(
                f"the result ({type(result).__name__}) cannot be pickled to cross back from "
                f"shard {self.shard_id}: {error}"), self.shard_id)
        self._send(link, payload)

    def _send(self, link: Link, payload: bytes) -> None:
        if link.dead:
            return
        if link.send(payload, link is not self._quiet_link):
            self._backlogged.add(link)

    # ------------------------------------------------------------ public API

    def submit_to(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
                  ) -> asyncio.Future:
        """Run ``func(*args, **kwargs)`` on ``shard``; an awaitable for its result."""
        # The common call in one frame: to another shard, nothing intercepting, no
        # scheduling group, room under the bound, an interned function and arguments
        # the compact encoding takes.  Anything else goes the general way below.
        link = self._shard_links.get(shard)
        if (link is not None and not kwargs and self.interceptor is None
                and self.running_group is None and not link.waiting and not link.dead
                and len(link.pending) < link.max_calls and link.backlog_bytes < link.max_bytes
                and type(func) in _INTERNABLE):
            number = link.interned.get(func)
            if number is not None:
                request_id = self._next_request_id
                payload = encode_call(request_id, number, args)
                if payload is not None and len(payload) <= self.max_message_bytes:
                    self._next_request_id = request_id + 1
                    future = self._create_future()
                    link.pending[request_id] = future
                    if link.send(payload):
                        self._backlogged.add(link)
                    return future
        return self._submit_in_general(shard, func, args, kwargs)

    def _submit_in_general(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
                           ) -> asyncio.Future:
        if shard == self.shard_id:
            return self._run_local(func, args, kwargs)
        if not 0 <= shard < self.shard_count:
            raise ValueError(f"no shard {shard}: this group has shards 0..{self.shard_count - 1}")
        if self.interceptor is not None:
            return self.interceptor.submit(self, shard, func, args, kwargs)
        return self.send_call(shard, func, args, kwargs)

    def send_call(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
                  ) -> asyncio.Future:
        """Put a call on the ring to another shard (no interception).

        Beyond the link's bound the call waits, unpickled, behind the calls
        already waiting; a call nested in the handling of another shard's
        request never waits (docs/design.md explains why).
        """
        link = self.links[shard]
        future = self.loop.create_future()
        if link.dead:
            future.set_exception(ShardDied(shard, link.death_detail))
            return future
        if (link.waiting or len(link.pending) >= link.max_calls
                or link.backlog_bytes >= link.max_bytes  # link.has_room(), inlined
                ) and not _serving_shard_request.get():
            link.waiting.append((future, func, args, kwargs, self.running_group))
            link.bound_waits += 1
            return future
        self._send_call(link, future, func, args, kwargs, self.running_group)
        return future

    def _send_call(self, link: Link, future: asyncio.Future, func: Callable, args: tuple,
                   kwargs: dict | None, group: Any) -> None:
        """Encode and send one call; ``group``: the scheduling group it was made in
        (the receiver runs it there), or None."""
        request_id = self._next_request_id
        self._next_request_id = request_id + 1
        # The common call, without encode_request's generality: an interned
        # function, positional plain arguments (encode_call answers None otherwise).
        number = link.interned.get(func) if not kwargs and type(func) in _INTERNABLE else None
        payload = encode_call(request_id, number, args) if number is not None else None
        if payload is None or len(payload) > self.max_message_bytes:
            payload = encode_request(request_id, func, args, kwargs, f"shard {link.peer}",
                                     link.interned, self.max_message_bytes)
        if group is not None:
            payload = encode_in_group(payload, group.encoded_name, group.shares)
        link.pending[request_id] = future
        if link.send(payload):
            self._backlogged.add(link)

    def _admit(self, link: Link) -> None:
        """Send waiting calls, oldest first, while the bound allows."""
        waiting = link.waiting
        while waiting and link.room_for_waiting():
            future, func, args, kwargs, group = waiting.popleft()
            if future.done():  # cancelled while it waited: it never crosses
                continue
            try:
                self._send_call(link, future, func, args, kwargs, group)
            except Exception as error:  # cannot be pickled, too large
                future.set_exception(error)

    def _run_local(self, func: Callable, args: tuple, kwargs: dict | None) -> asyncio.Future:
        try:
            result = func(*args, **kwargs) if kwargs else func(*args)
        except Exception as error:
            future = self.loop.create_future()
            future.set_exception(error)
            return future
        if isawaitable(result):
            return asyncio.ensure_future(result, loop=self.loop)
        future = self.loop.create_future()
        future.set_result(result)
        return future

    def call_threadsafe(self, func: Callable, *args: Any) -> None:
        """Queue ``func(*args)`` to run on the reactor thread; callable from any thread."""
        self._inbox.append((func, args))
        if self.sleeping.test_and_clear():
            try:
                self.doorbell.ring()
            except OSError:
                pass

    def external_submit(self, func: Callable, args: tuple, kwargs: dict | None
                        ) -> concurrent.futures.Future:
        """From a non-reactor thread: run func on this reactor; a concurrent Future."""
        if threading.get_ident() == self.thread_id:
            raise WrongThreadError(
                "external_submit() was called on the reactor thread itself; there, call the "
                "function directly or use submit_to()")
        result: concurrent.futures.Future = concurrent.futures.Future()
        self.stats.external_submissions += 1
        self.call_threadsafe(self._run_external, result, func, args, kwargs)
        return result

    def _run_external(self, result: concurrent.futures.Future, func: Callable, args: tuple,
                      kwargs: dict | None) -> None:
        if not result.set_running_or_notify_cancel():
            return
        future = self._run_local(func, args, kwargs)

        def done(finished: asyncio.Future) -> None:
            if finished.cancelled():
                result.set_exception(concurrent.futures.CancelledError())
            elif finished.exception() is not None:
                result.set_exception(finished.exception())
            else:
                result.set_result(finished.result())

        future.add_done_callback(done)

    def add_poller(self, poller: Callable[[], bool]) -> None:
        """Call ``poller()`` on every iteration while awake; True means it did work."""
        self._pollers.append(poller)

    def remove_poller(self, poller: Callable[[], bool]) -> None:
        self._pollers.remove(poller)

    def add_start_hook(self, hook: Callable[[Reactor], Any]) -> None:
        """Run ``hook(reactor)`` (sync or async) on the reactor thread once its loop
        exists, before the shard serves and before its stall detector starts."""
        self._start_hooks.append(hook)

    def adopt_thread(self) -> None:
        """Make the calling helper thread (a watchdog, an alien thread) work for this
        shard: home_reactor() finds it there and its log records name the shard."""
        _local.home_reactor = self

    def add_shutdown_hook(self, hook: Callable[[], Any]) -> None:
        """Run ``hook()`` (sync or async) when the shard stops; last added runs first."""
        self._shutdown_hooks.append(hook)

    def _rebuild_links(self) -> None:
        # A new list each time: a _drain() in progress keeps iterating the old one.
        self._active_links = [link for link in self.links if link is not None]
        guards = self._inbound_guards
        self._inbound = [(1 << min(index, 62), link, guards.get(link.peer, link.inbound.dispatch),
                          link.inbound.take_space_waiter, link.functions,
                          functools.partial(self._execute, link),
                          functools.partial(self._handle, link), self._serve_for(link))
                         for index, link in enumerate(self._active_links)]
        self.stats.served_rings = tuple(link.inbound for link in self.links
                                        if link is not None and link.peer < self.shard_count)
        self._inbound_rings = tuple(link.inbound for link in self._active_links)
        # submit_to's fast path: the links to the other shards, by shard number.
        self._shard_links = {link.peer: link for link in self._active_links
                             if link.peer < self.shard_count}

    def _serve_for(self, link: Link) -> tuple | None:
        """Ring.dispatch's ``serve`` argument for ``link``: other shards' compact calls
        run inside the dispatch (C), in the serving context; None: through _execute."""
        if (link.peer >= self.shard_count or link.peer in self._inbound_guards
                or self._serving_context is None):
            return None
        return (self._serving_context, functools.partial(self._send_served_reply, link),
                functools.partial(self._finish_served, link))

    def attach_endpoint(self, endpoint: Any) -> None:
        """Serve an endpoint added to the running group (an ``EndpointSegment`` it now owns)."""
        number = endpoint.number
        while len(self.links) <= number:
            self.links.append(None)
        if self.links[number] is not None:
            raise ValueError(f"endpoint {number} is already attached to shard {self.shard_id}")
        self.links[number] = Link(
            number, endpoint.from_shard(self.shard_id), endpoint.to_shard(self.shard_id),
            endpoint.sleeping_flag(), endpoint.doorbell.fd, max_calls=self.max_calls_per_peer,
            max_bytes=self.max_queued_bytes_per_peer)
        self._endpoints[number] = endpoint
        self._rebuild_links()

    def guard_inbound(self, number: int, dispatch: Callable[..., Any] | None) -> None:
        """Read endpoint ``number``'s inbound ring through ``dispatch`` (same contract as
        ``Ring.dispatch``) instead of the ring itself; None removes the guard.  Attached
        clients' rings are read this way: bounds per client, a corrupt ring fails the link."""
        if dispatch is None:
            self._inbound_guards.pop(number, None)
        else:
            self._inbound_guards[number] = dispatch
        self._rebuild_links()

    def add_doorbell(self, fd: int) -> None:
        """Wake on ``fd`` (an eventfd) as on the shard's own doorbell: each attached
        client rings one of its own, so it cannot take the shard's wake-ups."""
        self.loop.add_reader(fd, self._on_extra_doorbell, fd)

    def remove_doorbell(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    def _on_extra_doorbell(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except OSError:
            pass
        if self._asleep:
            self._wake()
            self.stats.doorbell_wakeups += 1
            self._poll()

    def detach_endpoint(self, number: int) -> None:
        """Stop serving an added endpoint and release its rings (reactor thread)."""
        endpoint = self._endpoints.pop(number, None)
        if endpoint is None:
            raise ValueError(f"endpoint {number} is not attached to shard {self.shard_id}")
        self.peer_died(number, "the endpoint was removed")
        link = self.links[number]
        self.links[number] = None
        self._rebuild_links()

        def release() -> None:  # after the _drain() that may still hold the old list
            link.close()
            endpoint.close()

        self._call_soon(release, context=self._root_context)

    def peer_died(self, shard: int, detail: str = "") -> None:
        """Fail every call waiting on ``shard`` and refuse new ones (reactor thread)."""
        link = self.links[shard]
        if link is None or link.dead:
            return
        link.death_detail = detail
        link.dead = True
        pending, link.pending = link.pending, {}
        waiting, link.waiting = link.waiting, deque()
        for future in [*pending.values(), *(entry[0] for entry in waiting)]:
            if not future.done():
                future.set_exception(ShardDied(shard, detail))
        link.drop_backlog()
        self._backlogged.discard(link)
        link.inbound.reset_consumer()

    def is_idle(self) -> bool:
        """True when the fabric gives this shard nothing to do right now (reactor thread).

        Its MPSC inbox is empty, no send waits for ring space, and no message
        waits in an inbound ring.  The loop's own callbacks and timers are not
        looked at.  shardio.testing's ``settle()`` and ``stop()`` ask this.
        """
        return not self._inbox and not self._backlogged and not any(
            link.inbound.ready() for link in self._active_links)

    def inbox_length(self) -> int:
        """Callbacks waiting in the MPSC inbox (a snapshot, from any thread)."""
        return len(self._inbox)

    def pending_calls(self) -> int:
        """Calls this shard made that wait for their result (sent or held by the bound)."""
        return sum(len(link.pending) + len(link.waiting) for link in self._active_links)


def assert_reactor_thread(owner: Reactor, what: str) -> None:
    """Raise WrongThreadError unless called on ``owner``'s reactor thread."""
    if threading.get_ident() != owner.thread_id:
        raise WrongThreadError(
            f"{what} belongs to shard {owner.shard_id}'s reactor thread and was used from "
            f"thread {threading.current_thread().name!r} (pid {os.getpid()})")
