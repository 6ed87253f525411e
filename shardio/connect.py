"""The client's side of attach: ``shardio.connect(path)`` from any process.

The client speaks the attach protocol (:mod:`shardio.attach_protocol`) to a
group started with ``ShardGroup(..., listen=path)``, receives its endpoint's
sealed memfd and doorbells as descriptors (``SCM_RIGHTS``), and then calls
shards through rings of its own with the owner's API: :meth:`Client.submit`
(a Future, from any thread) and :meth:`Client.call` (awaited in an asyncio
loop, which takes its replies off the ring itself).

A thread watches the socket: when the group stops or its owner dies, the
socket closes and every pending call fails with
:class:`~shardio.errors.ShardDied` at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from . import attach_protocol as protocol
from .errors import AttachError, AttachRefused, ProtocolMismatch
from .external import OwnerEndpoint
from .fabric._ring import Flag, Ring
from .fabric.doorbell import Doorbell
from .fabric.endpoint import SLEEPING_OFFSET, EndpointLayout
from .fabric.link import Link
from .fabric.segment import SharedSegment

OWNER_GONE = "the group stopped or its owner process died (the attach socket closed)"


class Client:
    """A process attached to a running group (made by :func:`connect`).

    Thread-safe like ``ShardGroup``: ``submit`` from any thread, ``call`` from
    any asyncio loop.  Use it as a context manager (``with`` or
    ``async with``), or call :meth:`close`.
    """

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self._closed = False
        self._lost = ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        fds: list[int] = []
        try:
            try:
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError) as error:
                raise AttachError(f"no shard group listens on {path} ({error.strerror})") from None
            except PermissionError:
                raise AttachError(
                    f"no permission to reach {path}: its directory belongs to "
                    "another user (attach as the group's user)"
                ) from None
            try:
                sock.send(protocol.hello())
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the hello (credentials): the reason waits to be read
            data, fds, _flags, _address = socket.recv_fds(sock, protocol.MAX_MESSAGE, 64)
            if not data:
                raise AttachRefused(
                    f"the group at {path} closed the connection during the handshake"
                )
            reply = protocol.decode(data)
            if reply["type"] == "refused":
                error_class = (
                    ProtocolMismatch
                    if reply.get("reason") in ("protocol", "build")
                    else AttachRefused
                )
                raise error_class(
                    f"the group at {path} refused this client: {reply.get('message')}"
                )
            if reply["type"] != "welcome" or len(fds) != 2 + reply["shards"]:
                raise AttachError(f"the group at {path} sent an unexpected reply: {reply!r}")
            layout = EndpointLayout(reply["shards"], reply["ring_bytes"])
            protocol.check_seals(fds[0], layout.size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise
        sock.settimeout(None)
        self._socket = sock
        self.number: int = reply["endpoint"]
        """This client's endpoint number on the shards' side."""
        self.shards: int = reply["shards"]
        self._segment = SharedSegment(layout.size, fd=fds[0])
        self._doorbell = Doorbell(fds[1])
        self._shard_bells = fds[2:]
        links = [
            Link(
                shard,
                Ring(self._segment.map, layout.to_shard_offset(shard), layout.ring_bytes),
                Ring(self._segment.map, layout.from_shard_offset(shard), layout.ring_bytes),
                Flag(self._segment.map, layout.shard_sleeping_offset(shard)),
                self._shard_bells[shard],
                max_calls=reply["max_calls_per_peer"],
                max_bytes=reply["max_queued_bytes_per_peer"],
            )
            for shard in range(self.shards)
        ]
        self._endpoint = OwnerEndpoint(
            links,
            Flag(self._segment.map, SLEEPING_OFFSET),
            self._doorbell,
            max_message_bytes=reply["max_message_bytes"],
            name=f"client-{self.number}",
            call_poll_us=reply["call_poll_us"],
        )
        self._watcher = threading.Thread(
            target=self._watch, name="shardio-client-socket", daemon=True
        )
        self._watcher.start()

    # ------------------------------------------------------------ calls

    def submit(
        self, shard: int, func: Callable, /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        """Run ``func(*args, **kwargs)`` on ``shard``; a Future of its result."""
        return self._endpoint.submit(shard, func, args, kwargs or None)

    async def call(self, shard: int, func: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Await ``func(*args, **kwargs)`` on ``shard`` from the running asyncio loop."""
        return await self._endpoint.call(shard, func, args, kwargs or None)

    def submit_to_all(
        self, func: Callable, /, *args: Any, **kwargs: Any
    ) -> list[concurrent.futures.Future]:
        return [self.submit(shard, func, *args, **kwargs) for shard in range(self.shards)]

    def in_flight(self) -> int:
        """Calls sent that wait for their result."""
        return self._endpoint.in_flight()

    @property
    def connected(self) -> bool:
        """False once closed or once the group went away."""
        return not self._closed and not self._lost

    # ------------------------------------------------------------ the socket

    def _watch(self) -> None:
        sock = self._socket
        while True:
            try:
                data = sock.recv(protocol.MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = protocol.decode(data)
            except ValueError:
                continue
            if message["type"] == "shard_died":
                self._endpoint.report_death(int(message["shard"]), str(message.get("detail")))
        if not self._closed:
            self._lost = OWNER_GONE
            for shard in range(self.shards):
                self._endpoint.report_death(shard, OWNER_GONE)

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Detach: pending calls fail with ShardDied, the rings are released."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._watcher.join(timeout=5)
        self._socket.close()
        self._endpoint.close("the client was closed before the call returned")
        self._segment.close()
        self._doorbell.close()
        for fd in self._shard_bells:
            os.close(fd)
        self._shard_bells = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("lost" if self._lost else "attached")
        return (
            f"<shardio.Client endpoint {self.number} of {self.path} ({self.shards} shards), "
            f"{state}>"
        )


def connect(path: str, *, timeout: float = 10.0) -> Client:
    """Attach this process to the group listening on ``path`` (``ShardGroup(listen=)``).

    Raises :class:`~shardio.errors.AttachError` when nothing listens there,
    :class:`~shardio.errors.AttachRefused` when the owner refuses this user,
    and :class:`~shardio.errors.ProtocolMismatch` when the versions differ.
    """
    return Client(path, timeout=timeout)
