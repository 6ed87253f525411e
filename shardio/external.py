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
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import GroupStateError, RemoteError, ShardDied
from .fabric._ring import Flag
from .fabric.doorbell import Doorbell
from .fabric.endpoint import EndpointSegment
from .fabric.link import DEFAULT_MAX_BYTES, DEFAULT_MAX_CALLS, Link
from .fabric.mesh import Mesh
from .fabric.messages import HEADER, REPLY_ERROR, REPLY_OK, decode_error, encode_request

log = logging.getLogger("shardio.group")

_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size


def _peer_died(shard: int, detail: str) -> None:
    """Runs on every surviving shard when ``shard`` dies."""
    from .reactor import require_reactor

    require_reactor().peer_died(shard, detail)


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
                 name: str = "owner") -> None:
        self.shard_count = len(links)
        self.max_message_bytes = max_message_bytes
        self.links = links
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
                on_death: Callable[[int, str], None] | None = None) -> OwnerEndpoint:
        """The group owner's endpoint: the mesh's last."""
        me = mesh.layout.endpoints - 1
        links = [Link(shard, mesh.ring(me, shard), mesh.ring(shard, me),
                      mesh.sleeping_flag(shard), mesh.doorbells[shard].fd,
                      max_calls=max_calls_per_peer, max_bytes=max_queued_bytes_per_peer)
                 for shard in range(shard_count)]
        return cls(links, mesh.sleeping_flag(me), mesh.doorbells[me],
                   max_message_bytes=max_message_bytes, on_death=on_death,
                   alive=[mesh.alive_flag(shard) for shard in range(shard_count)])

    @classmethod
    def attached(cls, mesh: Mesh, segment: EndpointSegment, *, max_message_bytes: int,
                 max_calls_per_peer: int, max_queued_bytes_per_peer: int) -> OwnerEndpoint:
        """The client side of an endpoint added to a running group, in this process."""
        shard_count = segment.layout.shard_count
        links = [Link(shard, segment.to_shard(shard), segment.from_shard(shard),
                      mesh.sleeping_flag(shard), mesh.doorbells[shard].fd,
                      max_calls=max_calls_per_peer, max_bytes=max_queued_bytes_per_peer)
                 for shard in range(shard_count)]
        return cls(links, segment.sleeping_flag(), segment.doorbell,
                   max_message_bytes=max_message_bytes, name=f"endpoint-{segment.number}")
    # ------------------------------------------------------------ submitting

    def submit(self, shard: int, func: Callable, args: tuple, kwargs: dict | None,
               *, control: bool = False) -> concurrent.futures.Future:
        """Send a call to ``shard``; a Future of its result. A call beyond the bound waits
        unpickled in ``link.waiting``; a ``control`` call (shardio's own: the stop protocol,
        the test clock's probes) is never held back, so the bound cannot hold up what
        waits on it, and it goes behind every waiting call that has room now."""
        if self._closing:
            raise GroupStateError("cannot submit: this endpoint was closed")
        if not 0 <= shard < self.shard_count:
            raise ValueError(f"no shard {shard}: this group has shards 0..{self.shard_count - 1}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        link = self.links[shard]
        if link.dead:
            future.set_exception(ShardDied(shard))
            return future
        with self.lock:
            if link.dead:
                future.set_exception(ShardDied(shard))
                return future
            failed = self._admit_locked(link) if control and link.waiting else []
            if not control and not link.has_room():
                link.waiting.append((future, func, args, kwargs))
                link.bound_waits += 1
                return future
            self._send_call(link, future, func, args, kwargs)
        for waiting_future, error in failed:  # outside the lock, as _admit does
            try:
                waiting_future.set_exception(error)
            except concurrent.futures.InvalidStateError:
                pass
        return future

    def _send_call(self, link: Link, future: concurrent.futures.Future, func: Callable,
                   args: tuple, kwargs: dict | None) -> None:
        """Pickle and send one call (under the lock)."""
        request_id = self._next_request_id
        self._next_request_id = request_id + 1
        payload = encode_request(request_id, func, args, kwargs, f"shard {link.peer}",
                                 link.interned, self.max_message_bytes)
        link.pending[request_id] = future
        link.send(payload)

    def _admit(self, link: Link) -> None:
        """Send waiting calls, oldest first, while the bound allows (receiver thread)."""
        with self.lock:
            failed = self._admit_locked(link)
        for future, error in failed:  # outside the lock: callbacks may submit again
            try:
                future.set_exception(error)
            except concurrent.futures.InvalidStateError:
                pass

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
            # Sleep protocol of the owner: it never spins (idle_poll_us = 0).
            self.sleeping.set()
            if self._drain():
                continue
            for fd, _events in poller.poll():
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

    def _drain(self) -> bool:
        did = False
        for link in self.links:
            messages = link.inbound.get(256)
            if messages is None:
                continue
            did = True
            if link.inbound.take_space_waiter():
                link.wake_peer()
            link.received_messages += len(messages)
            link.received_bytes += sum(map(len, messages))
            for message in messages:
                try:
                    self._complete(link, message)
                except Exception:  # one bad reply must not stop the receiver
                    log.exception("the owner could not handle a reply of %d bytes from shard %d",
                                  len(message), link.peer)
            if link.waiting:
                self._admit(link)
        for link in self.links:
            if link.backlog:
                with self.lock:
                    moved = link.flush()
                if moved:
                    did = True
                    if link.waiting:
                        self._admit(link)
        return did

    def _complete(self, link: Link, message: bytes) -> None:
        kind, request_id = _unpack_header(message)
        with self.lock:
            future = link.pending.pop(request_id, None)
        if future is None:
            return
        body = memoryview(message)[_HEADER_SIZE:]
        try:
            if kind == REPLY_OK:
                try:
                    value = pickle.loads(body)
                except Exception as error:
                    future.set_exception(RemoteError(
                        f"the result from shard {link.peer} could not be unpickled: {error!r}"))
                else:
                    future.set_result(value)
            elif kind == REPLY_ERROR:
                future.set_exception(decode_error(body))
        except concurrent.futures.InvalidStateError:
            pass  # the caller cancelled it

    def _shard_died(self, shard: int, detail: str) -> None:
        link = self.links[shard]
        if link.dead:
            return
        log.error("shard %d died: %s", shard, detail)
        with self.lock:
            link.dead = True
            pending, link.pending = link.pending, {}
            waiting, link.waiting = link.waiting, deque()
            link.drop_backlog()
        if self.is_owner:
            self.alive[shard].clear()
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
