"""The per-shard reactor: an asyncio event loop extended with pollers.

While it has work, or for ``idle_poll_us`` after its last work, the reactor
polls its inbound rings, its MPSC inbox and its registered pollers once per
loop iteration (a callback that re-queues itself with ``call_soon``), so a
busy peer reaches it with no system call at all.  When the window passes
with nothing found, it sleeps: it sets its ``sleeping`` flag, issues a full
fence, polls once more, and only then lets the loop block in epoll, where
its doorbell (an eventfd) wakes it.  A producer rings the doorbell only if
it flips that flag from set to clear, so no wake-up is lost and a busy
reactor costs its peers nothing (DESIGN.md, section 4).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pickle
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from inspect import isawaitable
from typing import Any

from .errors import (
    NotInShardError,
    RemoteError,
    ShardDied,
    WrongThreadError,
)
from .fabric.link import Link
from .fabric.mesh import Mesh
from .fabric.messages import (
    HEADER,
    REPLY_ERROR,
    REPLY_OK,
    REQUEST,
    CannotCrossError,
    decode_error,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)

log = logging.getLogger("shardio.reactor")

BATCH = 64
"""Messages taken from one inbound ring per poll.  They run back to back, so the
batch bounds how long other work waits behind a burst of calls (64 calls of 30 us
are 2 ms); the per-poll cost it amortizes is about a microsecond."""

_local = threading.local()
_loads = pickle.loads
_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size
_CoroutineType = types.CoroutineType
_perf_counter = time.perf_counter


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
        "polls", "idle_spins", "sleeps", "doorbell_wakeups", "sleep_seconds",
        "requests_run", "tasks_started", "external_submissions", "inbox_items",
        "batches", "batch_messages", "started_at", "stalls",
    )

    def __init__(self) -> None:
        self.polls = 0
        self.idle_spins = 0
        self.sleeps = 0
        self.doorbell_wakeups = 0
        self.sleep_seconds = 0.0
        self.requests_run = 0
        self.tasks_started = 0
        self.external_submissions = 0
        self.inbox_items = 0
        self.batches = 0
        self.batch_messages = 0
        self.started_at = time.monotonic()
        self.stalls = 0


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
            return uvloop.new_event_loop()
    elif kind != "asyncio":
        raise ValueError(f"loop must be 'auto', 'uvloop' or 'asyncio', got {kind!r}")
    return asyncio.new_event_loop()


class Reactor:
    """One shard: its loop, its side of the fabric, its local services."""

    def __init__(self, shard_id: int, shard_count: int, mesh: Mesh, *,
                 idle_poll_us: float, loop: str | Callable = "auto",
                 max_message_bytes: int = 256 << 20,
                 stall_threshold_ms: float | None = 25.0,
                 warm_up_tame: bool = False) -> None:
        self.shard_id = shard_id
        self.shard_count = shard_count
        self.owner_endpoint = mesh.layout.endpoints - 1
        self.mesh = mesh
        self.loop_kind = loop
        self.idle_poll_seconds = idle_poll_us / 1e6
        self.max_message_bytes = max_message_bytes
        self.stall_threshold_ms = stall_threshold_ms
        self.warm_up_tame = warm_up_tame
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
                                   mesh.sleeping_flag(peer), mesh.doorbells[peer].fd))
        self._active_links = [link for link in self.links if link is not None]
        self._inbound = [(link, link.inbound.get, link.inbound.take_space_waiter)
                         for link in self._active_links]
        self._backlogged: set[Link] = set()
        self._inbox: deque[tuple[Callable, tuple]] = deque()
        self._pollers: list[Callable[[], bool]] = []
        self._shutdown_hooks: list[Callable[[], Any]] = []
        self._next_request_id = 1
        self._idle_since = 0.0
        self._asleep = False
        self._asleep_since = 0.0
        self._exit: asyncio.Future | None = None
        self._call_soon: Callable | None = None

    # ------------------------------------------------------------ running

    def run(self) -> None:
        """Run the reactor on the calling thread until it is told to exit."""
        loop = new_event_loop(self.loop_kind)
        self.loop = loop
        self.thread_id = threading.get_ident()
        self._call_soon = loop.call_soon
        asyncio.set_event_loop(loop)
        _local.reactor = self
        self.sleeping.clear()
        try:
            self._exit = loop.create_future()
            if self.warm_up_tame:  # before the stall detector: a known, one-off cost
                loop.run_until_complete(_warm_up_tame())
            if self.stall_threshold_ms:
                from .stall import StallDetector

                self.stall_detector = StallDetector(self, self.stall_threshold_ms / 1000.0)
                self.stall_detector.start()
            loop.add_reader(self.doorbell.fd, self._on_doorbell)
            loop.call_soon(self._poll)
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
        self.sleeping.close()

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
            self._call_soon(self._poll)
            return
        now = _perf_counter()
        if not self._idle_since:
            self._idle_since = now
        if now - self._idle_since < self.idle_poll_seconds:
            stats.idle_spins += 1
            self._call_soon(self._poll)
            return
        # Sleep protocol: flag, full fence (inside set()), one more poll.
        self.sleeping.set()
        if self._drain():
            self.sleeping.clear()
            self._idle_since = 0.0
            self._call_soon(self._poll)
            return
        self._asleep = True
        self._asleep_since = now
        stats.sleeps += 1

    def _on_doorbell(self) -> None:
        self.doorbell.drain()
        if self._asleep:
            self._asleep = False
            self.sleeping.clear()
            stats = self.stats
            stats.doorbell_wakeups += 1
            stats.sleep_seconds += _perf_counter() - self._asleep_since
            self._idle_since = 0.0
            self._poll()

    def _drain(self) -> bool:
        """Poll everything once; True if any work was found."""
        did = False
        for link, get, take_space_waiter in self._inbound:
            messages = get(BATCH)
            if messages is None:
                continue
            did = True
            if take_space_waiter():
                link.wake_peer()
            if messages:
                self._handle_batch(link, messages)
        if self._inbox:
            did = True
            self._run_inbox()
        if self._backlogged:
            for link in list(self._backlogged):
                if link.flush():
                    did = True
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

    def _handle_batch(self, link: Link, messages: list) -> None:
        stats = self.stats
        stats.batches += 1
        stats.batch_messages += len(messages)
        link.received_messages += len(messages)
        handle = self._handle
        for message in messages:
            link.received_bytes += len(message)
            try:
                handle(link, message)
            except Exception:  # one bad message must not stop the poll loop
                log.exception("shard %d could not handle a message of %d bytes from endpoint %d",
                              self.shard_id, len(message), link.peer)

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
        if kind == REPLY_OK:
            future = link.pending.pop(request_id, None)
            if future is not None and not future.done():
                try:
                    future.set_result(_loads(body))
                except Exception as error:
                    future.set_exception(RemoteError(
                        f"the result from endpoint {link.peer} could not be unpickled: {error!r}"))
        elif kind == REQUEST:
            try:
                func, args, kwargs = decode_request(body, link.functions)
            except Exception as error:
                self._send(link, encode_error(request_id, CannotCrossError(
                    f"shard {self.shard_id} could not unpickle the call: {error!r} (is the "
                    "function importable in the shard process?)"), self.shard_id))
                return
            self._execute(link, request_id, func, args, kwargs)
        elif kind == REPLY_ERROR:
            future = link.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(decode_error(body))
        else:
            log.error("shard %d dropped a message of unknown kind %d from endpoint %d",
                      self.shard_id, kind, link.peer)

    def _execute(self, link: Link, request_id: int, func: Callable, args: tuple,
                 kwargs: dict | None) -> None:
        self.stats.requests_run += 1
        try:
            result = func(*args, **kwargs) if kwargs else func(*args)
        except BaseException as error:
            self._send(link, encode_error(request_id, error, self.shard_id))
            return
        # Cheaper than inspect.isawaitable (measured 0.25 us less per call).
        if type(result) is _CoroutineType or (
                result is not None and hasattr(type(result), "__await__")):
            self.stats.tasks_started += 1
            task = asyncio.ensure_future(result, loop=self.loop)
            task.add_done_callback(lambda done: self._reply_from_task(link, request_id, done))
            return
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
            payload = encode_result(request_id, result)
        except Exception as error:
            payload = encode_error(request_id, CannotCrossError(
                f"the result ({type(result).__name__}) cannot be pickled to cross back from "
                f"shard {self.shard_id}: {error}"), self.shard_id)
        self._send(link, payload)

    def _send(self, link: Link, payload: bytes) -> None:
        if link.dead:
            return
        if link.send(payload):
            self._backlogged.add(link)

    # ------------------------------------------------------------ public API

    def submit_to(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
                  ) -> asyncio.Future:
        """Run ``func(*args, **kwargs)`` on ``shard``; an awaitable for its result."""
        if shard == self.shard_id:
            return self._run_local(func, args, kwargs)
        if not 0 <= shard < self.shard_count:
            raise ValueError(f"no shard {shard}: this group has shards 0..{self.shard_count - 1}")
        if self.interceptor is not None:
            return self.interceptor.submit(self, shard, func, args, kwargs)
        return self.send_call(shard, func, args, kwargs)

    def send_call(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
                  ) -> asyncio.Future:
        """Put a call on the ring to another shard (no interception)."""
        link = self.links[shard]
        future = self.loop.create_future()
        if link.dead:
            future.set_exception(ShardDied(shard))
            return future
        request_id = self._next_request_id
        self._next_request_id = request_id + 1
        payload = encode_request(request_id, func, args, kwargs, f"shard {shard}",
                                 link.interned, self.max_message_bytes)
        link.pending[request_id] = future
        if link.send(payload):
            self._backlogged.add(link)
        return future

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

    def add_shutdown_hook(self, hook: Callable[[], Any]) -> None:
        """Run ``hook()`` (sync or async) when the shard stops; last added runs first."""
        self._shutdown_hooks.append(hook)

    def peer_died(self, shard: int, detail: str = "") -> None:
        """Fail every call waiting on ``shard`` and refuse new ones (reactor thread)."""
        link = self.links[shard]
        if link is None or link.dead:
            return
        link.dead = True
        pending, link.pending = link.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ShardDied(shard, detail))
        link.backlog.clear()
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
        return sum(len(link.pending) for link in self._active_links)


async def _warm_up_tame() -> None:
    """Pay for tame's imports and io_uring set-up before the shard reports ready."""
    from . import tame

    tame.warm_up()


def assert_reactor_thread(owner: Reactor, what: str) -> None:
    """Raise WrongThreadError unless called on ``owner``'s reactor thread."""
    if threading.get_ident() != owner.thread_id:
        raise WrongThreadError(
            f"{what} belongs to shard {owner.shard_id}'s reactor thread and was used from "
            f"thread {threading.current_thread().name!r} (pid {os.getpid()})")
