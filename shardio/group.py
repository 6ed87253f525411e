"""ShardGroup: start a set of shards, submit work to them, stop them cleanly."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from inspect import isawaitable
from typing import Any, Literal

from .errors import GroupStateError, ShardDied, ShardStartError
from .external import DEFAULT_CALL_POLL_US, OwnerEndpoint, describe_exit
from .fabric.endpoint import EndpointLayout, EndpointSegment
from .fabric.link import DEFAULT_MAX_BYTES, DEFAULT_MAX_CALLS
from .fabric.mesh import Mesh, default_ring_bytes
from .launch import ShardOptions, start_process, start_thread
from .reactor import require_reactor

log = logging.getLogger("shardio.group")

DEFAULT_IDLE_POLL_US = {"process": 200.0, "thread": 0.0}
_running_groups: weakref.WeakSet[ShardGroup] = weakref.WeakSet()


class ShardGroup:
    """A group of shards, each a reactor; one per CPU by default.

    ``ring_bytes`` is the size of each ring; by default it follows the shard
    count (1 MiB each for up to 10 shards, less beyond, so that the N x N
    rings stay near 128 MiB in all).  ``max_calls_per_peer`` and
    ``max_queued_bytes_per_peer`` bound what one endpoint queues toward one
    peer: calls waiting for their result, and pickled bytes waiting for ring
    space; a call beyond either waits, not yet pickled, in submission order
    (docs/design.md, "Bounded cross-shard calls").

    ``warm_up_tame=True`` imports :mod:`shardio.tame` and sets up each shard's
    io_uring ring before the shard reports ready (~100 ms per shard), so that
    the first tame call does not stall the reactor for it.  ``tame_quota_ms``
    is the tame stacks' quota (default 0.5 ms; None turns preemption off):
    after it, a stack yields at its next tamed call (docs/tame.md).  ``preload`` names
    modules each shard imports before its reactor starts, for the same reason.

    ``call_poll_us`` is how long a caller waiting for its reply (an asyncio
    loop awaiting :meth:`call`, a thread in ``future.result()``) polls the
    rings itself after the last reply it saw, before it sleeps on the
    doorbell (default 200 us for process shards, 0 for thread shards).
    ``listen`` is a socket path other processes attach to with
    :func:`shardio.connect` (in a directory of mode 0700; peers with the same
    uid, or those in ``listen_allow_uids``): docs/external.md.

    Usable as a context manager (``with`` or ``async with``), which starts the
    shards and stops them on the way out.  From any thread of the owning
    process, :meth:`submit` runs a function on a shard and returns a
    :class:`concurrent.futures.Future`; :meth:`call` awaits the same from an
    asyncio loop.  Functions may be plain or coroutine functions.
    """

    def __init__(
        self,
        shards: int | None = None,
        *,
        backend: Literal["process", "thread"] = "process",
        idle_poll_us: float | None = None,
        ring_bytes: int | None = None,
        loop: Literal["auto", "uvloop", "asyncio"] | Callable[[], asyncio.AbstractEventLoop]
        = "auto",
        pin: bool | None = None,
        max_message_bytes: int = 256 << 20,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        log_level: int = logging.WARNING,
        metrics_port: int | None = None,
        stall_threshold_ms: float | None = 25.0,
        warm_up_tame: bool = False,
        tame_quota_ms: float | None = 0.5,
        preload: tuple[str, ...] | list[str] = (),
        max_calls_per_peer: int = DEFAULT_MAX_CALLS,
        max_queued_bytes_per_peer: int = DEFAULT_MAX_BYTES,
        call_poll_us: float | None = None,
        listen: str | None = None,
        listen_allow_uids: Iterable[int] | None = None,
    ) -> None:
        if shards is None:
            shards = len(os.sched_getaffinity(0))
        if not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a positive integer, got {shards!r}")
        if backend not in DEFAULT_IDLE_POLL_US:
            raise ValueError(f"backend must be 'process' or 'thread', got {backend!r}")
        if idle_poll_us is None:
            from_environment = os.environ.get("SHARDIO_IDLE_POLL_US")
            idle_poll_us = (float(from_environment) if from_environment
                            else DEFAULT_IDLE_POLL_US[backend])
        if not callable(loop) and loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError(f"loop must be 'auto', 'uvloop', 'asyncio' or a factory, got {loop!r}")
        if idle_poll_us < 0:
            raise ValueError(f"idle_poll_us must be >= 0, got {idle_poll_us}")
        if tame_quota_ms is not None and not (
                isinstance(tame_quota_ms, int | float) and 0 < tame_quota_ms < float("inf")):
            raise ValueError(f"tame_quota_ms must be a positive number of milliseconds or None "
                             f"(no preemption), got {tame_quota_ms!r}")
        for name, value in (("max_calls_per_peer", max_calls_per_peer),
                            ("max_queued_bytes_per_peer", max_queued_bytes_per_peer)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if call_poll_us is None:  # thread shards need the GIL a polling caller holds
            call_poll_us = DEFAULT_CALL_POLL_US if backend == "process" else 0.0
        if not isinstance(call_poll_us, int | float) or not 0 <= call_poll_us <= 100_000:
            raise ValueError(f"call_poll_us must be between 0 and 100000 microseconds, got "
                             f"{call_poll_us!r}")
        self.call_poll_us = float(call_poll_us)
        if listen is not None:
            from .attach import check_socket_path

            check_socket_path(listen)  # checked again when the group starts
        self.listen = listen
        self.listen_allow_uids = None if listen_allow_uids is None else frozenset(
            listen_allow_uids)
        self._attach_server: Any = None
        if ring_bytes is None:
            ring_bytes = default_ring_bytes(shards + 1)
        self.shards = shards
        self.backend = backend
        self.ring_bytes = ring_bytes
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.metrics_port = metrics_port
        cpus = sorted(os.sched_getaffinity(0))
        if pin is None:
            pin = backend == "process" and shards <= len(cpus)
        self.options = ShardOptions(
            shard_count=shards, idle_poll_us=idle_poll_us, loop=loop,
            max_message_bytes=max_message_bytes, cpus=cpus if pin else None,
            log_level=log_level, stall_threshold_ms=stall_threshold_ms,
            warm_up_tame=warm_up_tame, tame_quota_ms=tame_quota_ms, preload=tuple(preload),
            max_calls_per_peer=max_calls_per_peer,
            max_queued_bytes_per_peer=max_queued_bytes_per_peer,
        )
        self._state = "new"
        self._mesh: Mesh | None = None
        self._owner: OwnerEndpoint | None = None
        self._processes: list[Any] = []
        self._lifelines: list[int] = []
        self._controls: list[socket.socket] = []
        self._endpoints: dict[int, Endpoint] = {}
        self._next_endpoint = shards + 1  # 0..shards-1 are the shards, `shards` the owner
        self._free_endpoints: list[int] = []  # numbers of removed endpoints, reused
        self._endpoint_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._metrics_server: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> ShardGroup:
        """Start every shard and wait until each one answers."""
        with self._lock:
            if self._state != "new":
                raise GroupStateError(f"this group was already started (state: {self._state})")
            self._state = "starting"
        try:
            self._mesh = Mesh.create(self.shards + 1, self.ring_bytes)
            self._owner = OwnerEndpoint.of_mesh(
                self._mesh, self.shards, max_message_bytes=self.options.max_message_bytes,
                max_calls_per_peer=self.options.max_calls_per_peer,
                max_queued_bytes_per_peer=self.options.max_queued_bytes_per_peer,
                on_death=self._tell_endpoints, call_poll_us=self.call_poll_us)
            for shard in range(self.shards):
                if self.backend == "process":
                    process, lifeline, control = start_process(shard, self._mesh, self.options)
                    self._processes.append(process)
                    self._lifelines.append(lifeline)
                    self._controls.append(control)
                    self._owner.watch(process.sentinel, shard, describe_exit(process))
                else:
                    thread, _ = start_thread(shard, self._mesh, self.options,
                                             self._owner.report_death)
                    self._threads.append(thread)
            self._await_ready()
            self._state = "running"
            _running_groups.add(self)
            if self.listen is not None:
                from .attach import AttachServer

                self._attach_server = AttachServer(self, self.listen, self.listen_allow_uids)
            if self.metrics_port is not None:
                from .metrics import serve_group_metrics

                self._metrics_server = serve_group_metrics(self, self.metrics_port)
        except BaseException:
            self._teardown()
            raise
        return self

    def _await_ready(self) -> None:
        futures = [self._owner.submit(shard, _ready, (), None, control=True)
                   for shard in range(self.shards)]
        deadline = time.monotonic() + self.start_timeout
        for shard, future in enumerate(futures):
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                raise ShardStartError(
                    f"shard {shard} did not start within {self.start_timeout} s") from None
            except ShardDied as died:
                raise ShardStartError(
                    f"shard {shard} failed to start: {died.detail}; its stderr above says why"
                ) from None

    def stop(self, timeout: float | None = None) -> None:
        """Drain calls in flight, stop Sharded services, join the shards, free everything.

        Safe to call more than once, after a shard crash, and from an exception
        handler.  Calls in flight get at most half of ``timeout`` (default
        ``stop_timeout``) to finish, less if they cannot: on a virtual clock
        that is paused, draining ends once no shard has anything left to run.
        What is still pending then fails with :class:`GroupStateError`, the
        clock runs again (so the stop protocol's own timers fire), and the
        shards stop.  Past ``timeout`` the remaining shards are killed.
        """
        with self._lock:
            if self._state in ("new", "stopped", "stopping"):
                return
            self._state = "stopping"
        timeout = self.stop_timeout if timeout is None else timeout
        started = time.monotonic()
        deadline = started + timeout
        try:
            if self._attach_server is not None:  # attached clients' calls fail with ShardDied
                self._attach_server.close(deadline)
            for endpoint in list(self._endpoints.values()):
                self._remove_endpoint(endpoint, deadline)
            why = self._drain(started + timeout / 2)
            if why:
                self._fail_pending(why)
            resume = getattr(self.options.loop, "resume", None)
            if getattr(self.options.loop, "paused", False) and resume is not None:
                resume()  # a paused virtual clock must not hold up the stop protocol's timers
            self._call_all(_stop_shard_services, deadline)
            self._owner.expect_exit()
            self._call_all(_exit_shard, deadline)
        finally:
            self._teardown(deadline)

    def _drain(self, until: float) -> str:
        """Wait for the calls in flight until ``until``; why some are left ("" if none)."""
        owner = self._owner
        clock = self.options.loop  # a virtual clock (shardio.testing.VirtualTime) has `paused`
        started = time.monotonic()
        while owner.in_flight():
            if getattr(clock, "paused", False) and self._shards_at_rest(until):
                return "it waits on a paused virtual clock or on a lost message"
            if time.monotonic() >= until:
                return f"stop() waited {until - started:.1f} s for it"
            time.sleep(0.002)
        return ""

    def _shards_at_rest(self, until: float) -> bool:
        """One probe round: every shard idle, every message between shards received."""
        owner = self._owner
        if any(owner.is_dead(shard) for shard in range(self.shards)):
            return False
        futures = [owner.submit(shard, _rest_report, (), None, control=True)
                   for shard in range(self.shards)]
        try:
            reports = [future.result(timeout=max(0.0, until - time.monotonic()))
                       for future in futures]
        except Exception:
            return False
        if any(busy for busy, _, _ in reports):
            return False
        return all(reports[src][1][dst] == reports[dst][2][src]
                   for src in range(self.shards) for dst in range(self.shards))

    def _fail_pending(self, why: str) -> None:
        """Fail the owner's calls still in flight: stop() goes on without them."""
        owner = self._owner
        with owner.lock:
            pending = [(link.peer, future) for link in owner.links
                       for future in link.pending.values()]
            pending += [(link.peer, entry[0]) for link in owner.links
                        for entry in link.waiting]  # held back by the bound, never sent
            for link in owner.links:
                link.pending = {}
                link.waiting.clear()
        for shard, future in pending:
            try:
                future.set_exception(GroupStateError(
                    f"the group was stopped before this call to shard {shard} returned ({why})"))
            except concurrent.futures.InvalidStateError:
                pass  # the caller cancelled it

    def _call_all(self, func: Callable, deadline: float) -> None:
        owner = self._owner
        futures = [owner.submit(shard, func, (), None, control=True)
                   for shard in range(self.shards) if not owner.is_dead(shard)]
        for future in futures:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as error:
                log.warning("while stopping: %s failed: %r", func.__name__, error)

    def _teardown(self, deadline: float | None = None) -> None:
        """Release everything, killing what did not exit in time. Never raises."""
        if deadline is None:
            deadline = time.monotonic() + 2.0
        if self._owner is not None:
            self._owner.expect_exit()
        if self._attach_server is not None:
            self._attach_server.close(deadline)
            self._attach_server = None
        if self._metrics_server is not None:
            try:
                self._metrics_server.close()
            except Exception:
                log.exception("closing the metrics server failed")
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("shard process %s did not exit in time; killing it", process.pid)
                process.kill()
                process.join(timeout=5)
            process.close()
        for fd in self._lifelines:
            os.close(fd)
        for control in self._controls:
            control.close()
        for endpoint in list(self._endpoints.values()):  # a failed stop: release ours
            endpoint._release()
        self._endpoints.clear()
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._owner is not None:
            self._owner.close()
        if self._mesh is not None:
            try:
                self._mesh.close()
            except BufferError:
                log.error("a shard thread did not exit; its shared memory stays mapped until "
                          "the process exits")
        self._processes, self._lifelines, self._threads, self._controls = [], [], [], []
        self._state = "stopped"
        _running_groups.discard(self)

    def __enter__(self) -> ShardGroup:
        return self.start()

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        # On Ctrl-C, drain briefly: the user wants out, not a 30-second wait.
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.stop(timeout=min(self.stop_timeout, 5.0) if interrupted else None)

    async def __aenter__(self) -> ShardGroup:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.to_thread(self.stop)

    # ------------------------------------------------------------ work

    def submit(self, shard: int, func: Callable, /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future:
        """Run ``func(*args, **kwargs)`` on ``shard``; thread-safe; never blocks on the shard.

        A function or argument that cannot be pickled raises TypeError here.
        """
        if self._state != "running":
            raise GroupStateError(f"cannot submit: the group is {self._state}")
        return self._owner.submit(shard, func, args, kwargs or None)

    def _submit_control(self, shard: int, func: Callable[..., Any], *args: Any) -> Any:
        """``submit`` for shardio's own machinery (shardio.testing's clock): never held
        back by the fabric's bound, behind every waiting call that has room now."""
        if self._state != "running":
            raise GroupStateError(f"cannot submit: the group is {self._state}")
        return self._owner.submit(shard, func, args, None, control=True)

    async def call(self, shard: int, func: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Await ``func(*args, **kwargs)`` on ``shard`` from the caller's own asyncio loop.

        The loop takes the reply off the ring itself, polling for at most
        ``call_poll_us`` after the last reply and sleeping on the doorbell
        otherwise (docs/external.md): no thread hop.
        """
        if self._state != "running":
            raise GroupStateError(f"cannot submit: the group is {self._state}")
        return await self._owner.call(shard, func, args, kwargs or None)

    def submit_to_all(self, func: Callable, /, *args: Any, **kwargs: Any
                      ) -> list[concurrent.futures.Future]:
        """:meth:`submit` to every shard; the futures in shard order."""
        return [self.submit(shard, func, *args, **kwargs) for shard in range(self.shards)]

    # ------------------------------------------------------------ endpoints

    def add_endpoint(self) -> Endpoint:
        """Add an endpoint to the running group: rings to and from every shard.

        The endpoint submits calls like the owner (:meth:`Endpoint.submit`,
        :meth:`Endpoint.call`) through rings of its own, so its traffic does
        not share the owner's rings or bounds.  Remove it with
        :meth:`remove_endpoint` (or ``endpoint.close()``); :meth:`stop`
        removes the ones left.
        """
        with self._endpoint_lock:
            if self._state != "running":
                raise GroupStateError(f"cannot add an endpoint: the group is {self._state}")
            number = self._new_endpoint_number()
            try:
                segment = EndpointSegment.create(number, self.shards, self.ring_bytes)
            except BaseException:
                self._free_endpoints.append(number)
                raise
            try:
                self._adopt_on_shards(
                    number, [[segment.segment.fd, segment.doorbell.fd]] * self.shards,
                    _attach_endpoint, (number, segment.layout), _detach_endpoint)
            except BaseException:
                segment.close()
                raise
            client = OwnerEndpoint.attached(
                self._mesh, segment, max_message_bytes=self.options.max_message_bytes,
                max_calls_per_peer=self.options.max_calls_per_peer,
                max_queued_bytes_per_peer=self.options.max_queued_bytes_per_peer,
                call_poll_us=self.call_poll_us)
            endpoint = Endpoint(self, number, segment, client)
            self._endpoints[number] = endpoint
            return endpoint

    def _new_endpoint_number(self) -> int:
        if self._free_endpoints:
            self._free_endpoints.sort()
            return self._free_endpoints.pop(0)
        number = self._next_endpoint
        self._next_endpoint += 1
        return number

    def _adopt_on_shards(self, number: int, descriptors: list[list[int]],
                         attach: Callable[..., None], args: tuple,
                         detach: Callable[[int], None]) -> None:
        """Give shard s ``descriptors[s]`` (over its control socket, or duplicates for
        thread shards) and run ``attach(*args, descriptors)`` there; on failure detach
        everywhere and free ``number``.  Under the endpoint lock."""
        futures = []
        try:
            for shard in range(self.shards):
                if self.backend == "process":
                    # The descriptors go first; the call that adopts them follows.
                    socket.send_fds(self._controls[shard], [str(number).encode()],
                                    descriptors[shard])
                    passed = None
                else:
                    passed = tuple(os.dup(fd) for fd in descriptors[shard])
                futures.append(self._owner.submit(shard, attach, (*args, passed), None,
                                                  control=True))
            for future in futures:
                future.result(timeout=self.start_timeout)
        except BaseException:
            undo = [self._owner.submit(shard, detach, (number,), None, control=True)
                    for shard in range(len(futures))]
            for future in undo:
                with contextlib.suppress(Exception):
                    future.result(timeout=self.start_timeout)
            self._free_endpoints.append(number)
            raise

    def _attach_client_segment(self, client_bell: int, shard_bells: list[int],
                               attach: Callable[..., None], args: tuple
                               ) -> tuple[int, EndpointSegment]:
        """An endpoint for a client process (shardio.attach): a sealed segment, adopted
        by every shard with the client's doorbell and shard s's own doorbell from the
        client; ``attach(number, layout, *args, descriptors)`` runs on each shard."""
        with self._endpoint_lock:
            if self._state != "running":
                raise GroupStateError(f"cannot attach a client: the group is {self._state}")
            number = self._new_endpoint_number()
            try:
                segment = EndpointSegment.create(number, self.shards, self.ring_bytes,
                                                 sealed=True)
            except BaseException:
                self._free_endpoints.append(number)
                raise
            segment.doorbell.close()  # the client's doorbell is client_bell
            segment.doorbell.fd = client_bell
            try:
                self._adopt_on_shards(
                    number, [[segment.segment.fd, client_bell, bell] for bell in shard_bells],
                    attach, (number, segment.layout, *args), _detach_client_on_failure)
            except BaseException:
                segment.segment.close()
                raise
            return number, segment

    def _detach_client_segment(self, number: int, detach: Callable[[int], None]) -> None:
        """Undo :meth:`_attach_client_segment` on every live shard; free ``number``."""
        with self._endpoint_lock:
            if self._state in ("running", "stopping"):
                futures = [self._owner.submit(shard, detach, (number,), None, control=True)
                           for shard in range(self.shards) if not self._owner.is_dead(shard)]
                for future in futures:
                    try:
                        future.result(timeout=self.stop_timeout)
                    except Exception as error:
                        log.warning("detaching client endpoint %d failed: %r", number, error)
            self._free_endpoints.append(number)

    def remove_endpoint(self, endpoint: Endpoint) -> None:
        """Detach ``endpoint`` from every shard and free its rings; its calls still
        waiting fail with :class:`~shardio.errors.ShardDied`."""
        with self._endpoint_lock:
            if self._endpoints.get(endpoint.number) is not endpoint:
                raise GroupStateError(f"endpoint {endpoint.number} is not part of this group "
                                      "(already removed?)")
            self._remove_endpoint(endpoint, time.monotonic() + self.stop_timeout)

    def _remove_endpoint(self, endpoint: Endpoint, deadline: float) -> None:
        del self._endpoints[endpoint.number]
        self._free_endpoints.append(endpoint.number)
        futures = [self._owner.submit(shard, _detach_endpoint, (endpoint.number,), None)
                   for shard in range(self.shards) if not self._owner.is_dead(shard)]
        for future in futures:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as error:
                log.warning("detaching endpoint %d failed: %r", endpoint.number, error)
        endpoint._release()

    def _tell_endpoints(self, shard: int, detail: str) -> None:
        for endpoint in list(self._endpoints.values()):
            endpoint.client.report_death(shard, detail)
        if self._attach_server is not None:
            self._attach_server.shard_died(shard, detail)

    @property
    def endpoints(self) -> list[Endpoint]:
        """The endpoints added with :meth:`add_endpoint` and not yet removed."""
        return list(self._endpoints.values())

    # ------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def metrics_url(self) -> str | None:
        """Where the group's /metrics is served (``metrics_port=0`` picks a free port)."""
        return self._metrics_server.url if self._metrics_server is not None else None

    @property
    def pids(self) -> list[int]:
        """The shard processes' pids (the process backend), in shard order."""
        return [process.pid for process in self._processes]

    def is_alive(self, shard: int) -> bool:
        return self._state == "running" and not self._owner.is_dead(shard)

    def __repr__(self) -> str:
        return f"<ShardGroup shards={self.shards} backend={self.backend} {self._state}>"


# ---------------------------------------------------------------- shard side


def _ready() -> int:
    return require_reactor().shard_id


async def _stop_shard_services() -> None:
    """Stop this shard's Sharded instances (last started first), then its shutdown
    hooks, while every other shard is still running."""
    reactor = require_reactor()
    while reactor.services:
        key = next(reversed(reactor.services))
        instance = reactor.services.pop(key)
        stop = getattr(instance, "stop", None)
        if stop is None:
            continue
        try:
            result = stop()
            if isawaitable(result):
                await result
        except Exception:
            log.exception("stopping %r on shard %d failed", instance, reactor.shard_id)
    await reactor.run_shutdown_hooks()


def _rest_report() -> tuple[bool, list[int], list[int]]:
    """(busy, messages sent to each shard, messages received from each), for stop()."""
    reactor = require_reactor()
    pending_work = getattr(reactor.loop, "pending_work", None)  # a VirtualTimeLoop's
    busy = not reactor.is_idle() or (pending_work is not None and bool(pending_work()))
    links = reactor.links[:reactor.shard_count]
    return (busy, [link.sent_messages if link is not None else 0 for link in links],
            [link.received_messages if link is not None else 0 for link in links])


def _exit_shard() -> None:
    require_reactor().request_exit()


def _attach_endpoint(number: int, layout: EndpointLayout,
                     descriptors: tuple[int, int] | None) -> None:
    reactor = require_reactor()
    if descriptors is None:  # process backend: they wait on the control socket
        message, descriptors, _flags, _address = socket.recv_fds(reactor.control_socket, 64, 2)
        if message != str(number).encode() or len(descriptors) != 2:
            for fd in descriptors:
                os.close(fd)
            raise ShardStartError(f"shard {reactor.shard_id} expected the descriptors of "
                                  f"endpoint {number}, got {message!r}")
    reactor.attach_endpoint(EndpointSegment.adopt(number, layout, *descriptors))


def _detach_endpoint(number: int) -> None:
    require_reactor().detach_endpoint(number)


def _detach_client_on_failure(number: int) -> None:
    from .attach import _detach_client

    _detach_client(number)


class Endpoint:
    """An endpoint added to a running group (:meth:`ShardGroup.add_endpoint`).

    Calls made through it cross rings of its own, with the group's bounds;
    thread-safe like ``group.submit``.
    """

    def __init__(self, group: ShardGroup, number: int, segment: EndpointSegment,
                 client: OwnerEndpoint) -> None:
        self.group = group
        self.number = number
        """Its number on the shards' side (a shard's ``links[number]``)."""
        self.segment = segment
        self.client = client

    def submit(self, shard: int, func: Callable, /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future:
        """Run ``func(*args, **kwargs)`` on ``shard`` through this endpoint."""
        return self.client.submit(shard, func, args, kwargs or None)

    async def call(self, shard: int, func: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Await ``func(*args, **kwargs)`` on ``shard`` from the caller's own asyncio loop."""
        return await self.client.call(shard, func, args, kwargs or None)

    def close(self) -> None:
        """Remove this endpoint from its group."""
        self.group.remove_endpoint(self)

    def _release(self) -> None:
        self.client.close("the endpoint was removed before the call returned")
        self.segment.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.group._endpoints.get(self.number) is self:
            self.close()

    def __repr__(self) -> str:
        return f"<Endpoint {self.number} of {self.group!r}>"


@atexit.register
def _stop_forgotten_groups() -> None:
    for group in list(_running_groups):
        log.warning("%r was still running at exit; stopping it", group)
        group.stop(timeout=5)
