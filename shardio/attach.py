"""The owner's side of attach: other processes reach a running group over a Unix socket.

``ShardGroup(..., listen="/run/app/shards.sock")`` starts an
:class:`AttachServer`.  Calls cross by pickle, so a client can run code as
the group: attaching is the security boundary, and the server enforces it.

* The socket is a path, never the abstract namespace, in a directory only
  this user can enter (a real directory, owned by us, mode 0700), checked
  when the group starts (:class:`~shardio.errors.InsecureSocketPath`).
* Every peer is checked with ``SO_PEERCRED``: same uid by default, or the
  uids in ``listen_allow_uids``; others are refused before anything else.
* A client whose protocol version or build differs is refused
  (:class:`~shardio.errors.ProtocolMismatch` on its side).
* Each client gets rings of its own (an endpoint segment, so SPSC holds) in a
  memfd the owner creates and seals against resizing, which each shard
  verifies: a client cannot truncate it under a shard (no SIGBUS).  It rings
  each shard on an eventfd of its own, so it cannot take a shard's wake-ups.
* Shards read a client's ring through a guard: a corrupt index or record,
  or a message over ``max_message_bytes``, drops that client's link (the
  shard tells the client), never the shard; requests are read only while
  the client has fewer than ``max_calls_per_peer`` calls running and fewer
  than ``max_queued_bytes_per_peer`` bytes of replies waiting for ring space
  (a batch is sized by the link's average reply, so the backlog ends within
  one reply of the bound), so a client that stops reading (SIGSTOP) costs
  bounded memory and holds up nobody else.

A client that disconnects or dies (even ``kill -9``) closes its socket: the
server detaches its rings from every shard, and the results of its calls
still running are dropped when they finish (its link is dead; request ids
are per link, so nothing reaches another client).  When the group stops,
each client's socket closes and its pending calls fail with
:class:`~shardio.errors.ShardDied`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import attach_protocol as protocol
from .errors import AttachError, GroupStateError, InsecureSocketPath, ShardDied, ShardStartError
from .fabric._ring import Flag
from .fabric.endpoint import EndpointLayout, EndpointSegment
from .fabric.link import Link
from .fabric.messages import encode_error
from .reactor import Reactor, require_reactor

if TYPE_CHECKING:
    from .group import ShardGroup

log = logging.getLogger("shardio.attach")

HELLO_TIMEOUT = 10.0
"""Seconds a connected peer has to send its hello."""
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def check_socket_path(path: str) -> str:
    """The absolute path to listen on; InsecureSocketPath unless it is safe (see the module)."""
    if not isinstance(path, str) or not path:
        raise InsecureSocketPath(f"listen must be a filesystem path, got {path!r}")
    if path.startswith(("\0", "@")):
        raise InsecureSocketPath(
            f"listen={path!r} names the abstract socket namespace, which any process on the "
            "host can reach whatever its user: give a path in a directory of mode 0700"
        )
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        raise InsecureSocketPath(
            f"the socket's directory {directory} does not exist: create "
            f"it with mode 0700 (mkdir -m 0700 {directory})"
        ) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise InsecureSocketPath(
            f"the socket's directory {directory} must be a real directory, not a symlink or a file"
        )
    if info.st_uid != os.geteuid():
        raise InsecureSocketPath(
            f"the socket's directory {directory} belongs to uid "
            f"{info.st_uid}, not to this process's uid {os.geteuid()}"
        )
    if info.st_mode & 0o077:
        raise InsecureSocketPath(
            f"the socket's directory {directory} has mode {stat.S_IMODE(info.st_mode):04o}: "
            f"others could reach the socket; make it 0700 (chmod 0700 {directory})"
        )
    return path


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to replace anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AttachError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left by a group that died
        return
    except OSError as error:
        raise AttachError(f"cannot tell whether {path} is in use: {error}") from None
    finally:
        probe.close()
    raise AttachError(f"another group already listens on {path}")


@dataclass
class ClientLimits:
    """What a shard allows one attached client."""

    max_calls: int
    max_bytes: int
    max_message_bytes: int


class _Session:
    """One attached client, as the server sees it."""

    def __init__(self, connection: socket.socket, pid: int, uid: int) -> None:
        self.connection = connection
        self.pid = pid
        self.uid = uid
        self.number: int | None = None
        self.lock = threading.Lock()  # detaching happens once
        self.thread: threading.Thread | None = None


class AttachServer:
    """Accepts clients on ``path`` for ``group`` (started by ``ShardGroup.start``)."""

    def __init__(
        self, group: ShardGroup, path: str, allow_uids: Iterable[int] | None = None
    ) -> None:
        self.group = group
        self.path = check_socket_path(path)
        self.allow_uids = frozenset({os.geteuid()} if allow_uids is None else allow_uids)
        self.sessions: set[_Session] = set()
        self.lock = threading.Lock()
        self.attached_total = 0
        self.refused_total = 0
        self._closing = False
        _remove_stale_socket(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(self.path)
            os.chmod(self.path, 0o600)
            self.listener.listen(128)
        except BaseException:
            self.listener.close()
            raise
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(
            target=self._accept_loop, name="shardio-attach", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while not self._closing:
            events = poller.poll()
            if self._closing:
                break
            if not any(fd == self.listener.fileno() for fd, _ in events):
                continue
            try:
                connection, _address = self.listener.accept()
            except OSError:
                continue
            pid, uid, _gid = _PEERCRED.unpack(
                connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            session = _Session(connection, pid, uid)
            session.thread = threading.Thread(
                target=self._serve, args=(session,), name=f"shardio-attach-{pid}", daemon=True
            )
            with self.lock:
                self.sessions.add(session)
            session.thread.start()

    def _refuse(self, session: _Session, reason: str, message: str) -> None:
        self.refused_total += 1
        log.warning("refused a client (pid %d, uid %d): %s", session.pid, session.uid, message)
        connection = session.connection
        with contextlib.suppress(OSError):
            connection.send(
                protocol.encode({"type": "refused", "reason": reason, "message": message})
            )
            # Closing with the client's hello unread would reset the connection and drop
            # the reason: wait (briefly) for the client to hang up first.
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(2.0)
            while connection.recv(protocol.MAX_MESSAGE):
                pass

    def _serve(self, session: _Session) -> None:
        connection = session.connection
        try:
            if session.uid not in self.allow_uids:
                self._refuse(
                    session,
                    "credentials",
                    f"uid {session.uid} may not attach to this group (allowed: "
                    f"{', '.join(map(str, sorted(self.allow_uids)))}; see "
                    "ShardGroup(listen_allow_uids=...))",
                )
                return
            connection.settimeout(HELLO_TIMEOUT)
            try:
                hello = protocol.decode(connection.recv(protocol.MAX_MESSAGE))
            except (ValueError, OSError) as error:
                self._refuse(session, "hello", f"no valid hello: {error}")
                return
            if hello.get("magic") != protocol.MAGIC or hello.get("type") != "hello":
                self._refuse(session, "hello", "the first message must be a shardio hello")
                return
            if hello.get("protocol") != protocol.PROTOCOL_VERSION:
                self._refuse(
                    session,
                    "protocol",
                    f"this group speaks attach protocol {protocol.PROTOCOL_VERSION}, "
                    f"the client {hello.get('protocol')!r}: upgrade the older side",
                )
                return
            ours = protocol.build_identity()
            if hello.get("build") != ours:
                self._refuse(
                    session,
                    "build",
                    f"the group runs {ours!r}, the client {hello.get('build')!r}: both must match",
                )
                return
            self._welcome(session)
            connection.settimeout(None)
            while True:  # until the client goes (or the server closes the socket)
                data = connection.recv(protocol.MAX_MESSAGE)
                if not data:
                    break
        except OSError:
            pass
        except (GroupStateError, ShardStartError, ShardDied) as error:
            self._refuse(session, "group", f"the group cannot take a client now: {error}")
        except Exception:
            log.exception("serving a client (pid %d) failed", session.pid)
        finally:
            self._detach(session)
            with self.lock:
                self.sessions.discard(session)
            connection.close()

    def _welcome(self, session: _Session) -> None:
        group = self.group
        limits = ClientLimits(
            group.options.max_calls_per_peer,
            group.options.max_queued_bytes_per_peer,
            group.options.max_message_bytes,
        )
        client_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        shard_bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(group.shards)]
        segment = None
        try:
            with session.lock:
                if self._closing:
                    raise GroupStateError("the group is stopping")
                number, segment = group._attach_client_segment(
                    client_bell, shard_bells, _attach_client, (limits,)
                )
                session.number = number
            welcome = {
                "type": "welcome",
                "endpoint": number,
                "shards": group.shards,
                "ring_bytes": group.ring_bytes,
                "size": segment.layout.size,
                "max_message_bytes": limits.max_message_bytes,
                "max_calls_per_peer": limits.max_calls,
                "max_queued_bytes_per_peer": limits.max_bytes,
                "call_poll_us": group.call_poll_us,
            }
            socket.send_fds(
                session.connection,
                [protocol.encode(welcome)],
                [segment.segment.fd, client_bell, *shard_bells],
            )
            self.attached_total += 1
            log.info("client pid %d attached as endpoint %d", session.pid, number)
        finally:
            # The shards and the client hold their own copies now; the owner keeps none.
            if segment is not None:
                segment.segment.close()
            for fd in (client_bell, *shard_bells):
                os.close(fd)

    def _detach(self, session: _Session) -> None:
        with session.lock:
            number, session.number = session.number, None
        if number is not None:
            try:
                self.group._detach_client_segment(number, _detach_client)
            except Exception as error:
                log.warning("detaching client endpoint %d failed: %r", number, error)

    # ------------------------------------------------------------ events

    def shard_died(self, shard: int, detail: str) -> None:
        """Tell every client (never blocks: a client that does not read is cut off)."""
        message = protocol.encode({"type": "shard_died", "shard": shard, "detail": detail})
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            try:
                session.connection.send(message, socket.MSG_DONTWAIT)
            except OSError:
                with contextlib.suppress(OSError):
                    session.connection.shutdown(socket.SHUT_RDWR)

    @property
    def clients(self) -> int:
        """Clients attached now."""
        with self.lock:
            return sum(1 for session in self.sessions if session.number is not None)

    # ------------------------------------------------------------ closing

    def close(self, deadline: float | None = None) -> None:
        """Stop accepting, detach every client and close its socket (its pending calls
        fail with ShardDied), remove the socket file."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        self._thread.join(timeout=5)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            self._detach(session)
            with contextlib.suppress(OSError):
                session.connection.shutdown(socket.SHUT_RDWR)
        for session in sessions:
            if session.thread is not None:
                remaining = 5.0 if deadline is None else max(0.1, deadline - time.monotonic())
                session.thread.join(timeout=remaining)
        os.close(self._wake_read)
        os.close(self._wake_write)


# ---------------------------------------------------------------- shard side


class ClientGuard:
    """How a shard reads one attached client's ring (``Reactor.guard_inbound``)."""

    def __init__(self, reactor: Reactor, link: Link, doorbell: int, limits: ClientLimits) -> None:
        self.reactor = reactor
        self.link = link
        self.doorbell = doorbell
        self.max_calls = limits.max_calls
        self.max_bytes = limits.max_bytes
        self.ring_dispatch = link.inbound.dispatch
        self.ring_ready = link.inbound.ready
        self.held = 0
        """Polls that left the client's requests in its ring (its bounds were reached)."""
        self.failure = ""

    def dispatch(self, batch: int, *callbacks: Any) -> Any:
        """``Ring.dispatch`` within the client's bounds; a corrupt ring fails the link."""
        link = self.link
        if link.dead:
            return None
        try:
            if not self.ring_ready():  # the common case: one C call, none of the sums below
                return None
        except (RuntimeError, ValueError) as error:
            self.fail(str(error))
            return None
        sent = link.sent_messages
        running = link.received_messages - sent  # a shard only replies to it
        backlog = link.backlog_bytes
        max_calls = self.max_calls
        max_bytes = self.max_bytes
        if running >= max_calls or backlog >= max_bytes:
            self.held += 1
            return None
        # Read no more requests than their replies could fit under the byte bound, at the
        # link's average reply size (one at a time until the first reply says what it is).
        average = link.sent_bytes // sent if sent else max_bytes
        batch = min(batch, max_calls - running, max(1, (max_bytes - backlog) // max(1, average)))
        try:
            return self.ring_dispatch(batch, *callbacks)
        except (RuntimeError, ValueError) as error:  # corrupt ring or message, over the limit
            self.fail(str(error))
            return None

    def fail(self, reason: str) -> None:
        """Drop the client's link: tell the client, stop reading its ring."""
        reactor = self.reactor
        link = self.link
        self.failure = reason
        detail = f"shard {reactor.shard_id} dropped this client's link: {reason}"
        log.warning("shard %d dropped client endpoint %d: %s", reactor.shard_id, link.peer, reason)
        with contextlib.suppress(Exception):
            link.send(
                encode_error(
                    protocol.LINK_FAILED_REQUEST,
                    ShardDied(reactor.shard_id, detail),
                    reactor.shard_id,
                )
            )
        reactor.peer_died(link.peer, detail)


class SleepingFlags:
    """A shard's sleeping flag and its copies in attached clients' segments.

    Replaces ``reactor.sleeping`` once a client attaches: the reactor sets and
    clears every copy with its own flag (only when it falls asleep and wakes,
    never per message), so a client rings a shard's eventfd only when that
    shard may be asleep — the same Dekker handshake as on the mesh, one copy
    per client.
    """

    def __init__(self, primary: Any) -> None:
        self.primary = primary
        self.copies: dict[int, Flag] = {}

    def set(self) -> None:
        for copy in self.copies.values():
            copy.set()
        self.primary.set()

    def clear(self) -> None:
        self.primary.clear()
        for copy in self.copies.values():
            copy.clear()

    def test_and_clear(self) -> bool:
        return self.primary.test_and_clear()

    def is_set(self) -> bool:
        return self.primary.is_set()

    def close_copies(self) -> None:
        """Let go of every client's segment (before the shard releases them)."""
        for copy in self.copies.values():
            copy.close()
        self.copies.clear()

    def close(self) -> None:
        self.close_copies()
        self.primary.close()


def _sleeping_flags(reactor: Reactor) -> SleepingFlags:
    if not isinstance(reactor.sleeping, SleepingFlags):
        reactor.sleeping = SleepingFlags(reactor.sleeping)
        reactor.add_shutdown_hook(reactor.sleeping.close_copies)
    return reactor.sleeping


_guards: dict[tuple[int, int], ClientGuard] = {}


def _attach_client(
    number: int, layout: EndpointLayout, limits: ClientLimits, descriptors: tuple[int, ...] | None
) -> None:
    """Serve client endpoint ``number`` on this shard (the owner's control call)."""
    reactor = require_reactor()
    if descriptors is None:  # process backend: they wait on the control socket
        message, fds, _flags, _address = socket.recv_fds(reactor.control_socket, 64, 3)
        descriptors = tuple(fds)
        if message != str(number).encode() or len(descriptors) != 3:
            for fd in descriptors:
                os.close(fd)
            raise ShardStartError(
                f"shard {reactor.shard_id} expected the descriptors of "
                f"client endpoint {number}, got {message!r}"
            )
    memfd, client_bell, shard_bell = descriptors
    try:
        protocol.check_seals(memfd, layout.size)
    except (ValueError, OSError) as error:
        for fd in descriptors:
            os.close(fd)
        raise AttachError(
            f"shard {reactor.shard_id} refused client endpoint {number}: {error}"
        ) from None
    segment = EndpointSegment.adopt(number, layout, memfd, client_bell)
    reactor.attach_endpoint(segment)
    copy = Flag(segment.segment.map, layout.shard_sleeping_offset(reactor.shard_id))
    copy.clear()  # awake: it is running this call
    _sleeping_flags(reactor).copies[number] = copy
    link = reactor.links[number]
    link.inbound.limit_messages(limits.max_message_bytes)
    guard = ClientGuard(reactor, link, shard_bell, limits)
    _guards[reactor.shard_id, number] = guard
    reactor.guard_inbound(number, guard.dispatch)
    reactor.add_doorbell(shard_bell)


def _detach_client(number: int) -> None:
    """Stop serving client endpoint ``number`` on this shard and free its rings."""
    reactor = require_reactor()
    flags = _sleeping_flags(reactor)
    copy = flags.copies.pop(number, None)
    if copy is not None:
        copy.close()  # before the segment is released
    guard = _guards.pop((reactor.shard_id, number), None)
    if guard is not None:
        reactor.remove_doorbell(guard.doorbell)
        os.close(guard.doorbell)
    reactor.guard_inbound(number, None)
    reactor.detach_endpoint(number)


def client_links() -> dict[int, dict[str, Any]]:
    """This shard's attached clients, by endpoint number: their link's state (run on a
    shard: ``group.submit(shard, client_links)``)."""
    reactor = require_reactor()
    out = {}
    for (shard, number), guard in _guards.items():
        if shard != reactor.shard_id:
            continue
        link = guard.link
        out[number] = {
            "dead": link.dead,
            "failure": guard.failure,
            "held": guard.held,
            "running": link.received_messages - link.sent_messages,
            "backlog_bytes": link.backlog_bytes,
            "received": link.received_messages,
        }
    return out
