"""OSD clients: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both fetch the OSD map from the address they are given (any shard answers
GET_MAP; usually the shared port) and then, with ``route="direct"`` (the
default), send each request straight to the shard that owns the object's
placement group, so no request pays a cross-shard hop. ``route="shared"``
sends everything to the given address instead and lets the accepting shard
forward (the path of a client that knows no map).

Requests are pipelined: any number of concurrent calls share one
connection per shard, each tagged with its own ``tid``; replies may come
back in any order. Every request has a timeout (``OSDTimeout``). A broken
connection fails the requests in flight on it (``OSDConnectionError``) and
the next request reconnects; idempotent requests (read, stat, list, ping,
get_map) are retried ``retries`` times on a fresh connection (after
refreshing the map), writes never are (their outcome is unknown).

Errors reported by the OSD raise ``OSDStatusError`` with the errno-style
``status``; ``ObjectNotFound`` (ENOENT) and ``ShardUnavailable``
(ESHUTDOWN: the shard owning the pg is down) are subclasses worth catching.

    async with await AsyncClient.connect("127.0.0.1", 6800) as c:
        await c.put("greeting", b"hello")
        assert await c.get("greeting") == b"hello"

    with Client("127.0.0.1", 6800) as c:
        c.put("greeting", b"hello")
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

from shardio.errors import ShardioError

from .osdmap import OSDMap
from .protocol import (
    FLAG_MORE,
    Frame,
    FrameDecoder,
    FrameError,
    Op,
    Status,
    encode_request,
    unpack_names,
    unpack_stat,
)

__all__ = [
    "READ_CHUNK",
    "AsyncClient",
    "Client",
    "OSDClientError",
    "OSDConnectionError",
    "OSDProtocolError",
    "OSDStatusError",
    "OSDTimeout",
    "ObjectNotFound",
    "ObjectStat",
    "ShardUnavailable",
    "status_error",
    "wait_for_osd",
]

#: get() reads an object in pieces of this size (a short piece means the end).
READ_CHUNK = 1 << 20

Route = Literal["direct", "shared"]
_IDEMPOTENT = frozenset((Op.READ, Op.STAT, Op.LIST, Op.GET_MAP, Op.PING))


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class OSDClientError(ShardioError):
    """Base of the errors the OSD clients raise."""


class OSDConnectionError(OSDClientError, ConnectionError):
    """The connection to a shard could not be made or broke with requests in flight."""


class OSDProtocolError(OSDConnectionError):
    """The server sent bytes that are not a valid reply (the connection is dropped)."""


class OSDTimeout(OSDClientError, TimeoutError):
    """No reply within the request timeout."""


class OSDStatusError(OSDClientError):
    """The OSD answered with an error status (an errno value)."""

    def __init__(self, op: int, name: bytes, status: int) -> None:
        self.op = op
        self.name = name
        self.status = status
        try:
            sname = Status(status).name
        except ValueError:
            sname = f"errno {status}"
        super().__init__(f"{_op_name(op)} {name!r}: {sname} ({os.strerror(status)})")

    @property
    def errno(self) -> int:
        return self.status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.op, self.name, self.status))


class ObjectNotFound(OSDStatusError, KeyError):
    """ENOENT: no such object."""

    def __str__(self) -> str:  # KeyError would quote it
        return str(self.args[0]) if self.args else "object not found"


class ShardUnavailable(OSDStatusError):
    """ESHUTDOWN: the shard that owns the object is down or stopping."""


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"


def status_error(op: int, name: bytes, status: int) -> OSDStatusError:
    """The exception for an error reply."""
    if status == Status.ENOENT:
        return ObjectNotFound(op, name, status)
    if status == Status.ESHUTDOWN:
        return ShardUnavailable(op, name, status)
    return OSDStatusError(op, name, status)


class ObjectStat(NamedTuple):
    """STAT reply: size in bytes and version (the seq of the object's last change)."""

    size: int
    version: int


def _name(name: str | bytes) -> bytes:
    return name.encode() if isinstance(name, str) else bytes(name)


def _target(
    osdmap: OSDMap | None, route: Route, name: bytes, pool: int, pg: int | None = None
) -> int:
    """-1: the bootstrap address; else the shard to send to."""
    if route == "shared" or osdmap is None or not osdmap.addrs:
        return -1
    if pg is not None:
        return osdmap.shard_of_pg(pg, pool)
    return osdmap.shard_for(name, pool)


# ---------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------


class _AsyncConn(asyncio.Protocol):
    """One pipelined connection: futures by tid, a decoder, write flow control."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.next_tid = 1
        self.closed = False
        self.error: Exception | None = None
        self.loop = asyncio.get_running_loop()
        self._writable: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._deadlines: deque[tuple[float, int, int, bytes]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = 1.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        while True:
            try:
                frames = self.decoder.feed(data)
            except FrameError as exc:
                for frame in exc.frames:
                    self._deliver(frame)
                error = OSDProtocolError(f"{self.label}: bad reply from the server: {exc}")
                if exc.fatal:
                    self._fail(error)
                    return
                # The bad frame was skipped whole (e.g. the reply to an op this side does
                # not know): fail that request only and keep the connection.
                fut = self.pending.pop(exc.tid, None) if exc.tid is not None else None
                if fut is not None and not fut.done():
                    fut.set_exception(error)
                data = b""
                continue
            for frame in frames:
                self._deliver(frame)
            return

    def _deliver(self, frame: Frame) -> None:
        fut = self.pending.pop(frame.tid, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(OSDConnectionError(f"{self.label}: connection closed by the server{reason}"))

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)  # the writer wakes up and finds the connection closed
        self._out.clear()
        self._deadlines.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.transport is not None:
            self.transport.abort()

    def send(
        self,
        op: int,
        name: bytes,
        payload: bytes | bytearray | memoryview,
        pool: int,
        offset: int,
        length: int,
        timeout: float,
    ) -> asyncio.Future[Frame]:
        """Queue one request; the future gets its reply frame (or the error).

        Requests queued during one pass of the loop leave in one write. The
        timeout is enforced by a sweep every ``timeout / 8`` (at least 10 ms).
        """
        if self.closed:
            raise self.error or OSDConnectionError(f"{self.label}: connection closed")
        tid = self.next_tid
        self.next_tid = tid + 1
        data = encode_request(op, tid, name, payload, pool=pool, offset=offset, length=length)
        fut: asyncio.Future[Frame] = self.loop.create_future()
        self.pending[tid] = fut
        self._deadlines.append((self.loop.time() + timeout, tid, op, name))
        if self._sweeper is None:
            self._sweep_every = max(0.01, timeout / 8)
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    async def wait_writable(self) -> None:
        """Return once the transport takes more data (the server reads our requests)."""
        while self._writable is not None:
            await self._writable

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        if self.closed or self.transport is None:
            out.clear()
            return
        if len(out) == 1:
            self.transport.write(out[0])
        else:
            self.transport.writelines(out)
        out.clear()

    def _sweep(self) -> None:
        """Fail requests past their deadline; drop bookkeeping of answered ones."""
        self._sweeper = None
        now = self.loop.time()
        deadlines = self._deadlines
        pending = self.pending
        while deadlines:
            deadline, tid, op, name = deadlines[0]
            if tid in pending and deadline > now:
                break
            deadlines.popleft()
            fut = pending.pop(tid, None) if deadline <= now else None
            if fut is not None and not fut.done():
                fut.set_exception(
                    OSDTimeout(f"{self.label}: no reply to {_op_name(op)} {name!r} in time")
                )
        if deadlines and not self.closed:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def close(self) -> None:
        if not self.closed:
            self._fail(OSDConnectionError(f"{self.label}: connection closed by the client"))


class AsyncClient:
    """An asyncio OSD client; create it with ``await AsyncClient.connect(host, port)``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        route: Route = "direct",
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        retries: int = 1,
    ) -> None:
        if route not in ("direct", "shared"):
            raise ValueError(f"route must be 'direct' or 'shared', got {route!r}")
        self.address = (host, port)
        self.route: Route = route
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.osdmap: OSDMap | None = None
        self._conns: dict[int, _AsyncConn] = {}
        self._connecting: dict[int, asyncio.Future[_AsyncConn]] = {}
        self._closed = False

    @classmethod
    async def connect(cls, host: str, port: int, **kwargs: Any) -> AsyncClient:
        """A client with the OSD map fetched."""
        client = cls(host, port, **kwargs)
        try:
            await client.refresh_map()
        except BaseException:
            await client.close()
            raise
        return client

    # -- connections ----------------------------------------------------------------

    def _addr(self, target: int) -> tuple[str, int]:
        if target < 0 or self.osdmap is None:
            return self.address
        return self.osdmap.addr_of(target)

    async def _connection(self, target: int) -> _AsyncConn:
        conn = self._conns.get(target)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise OSDConnectionError("the client is closed")
        pending = self._connecting.get(target)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_AsyncConn] = asyncio.get_running_loop().create_future()
        self._connecting[target] = fut
        try:
            conn = await self._open(target)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: others awaiting it get it too
            raise
        finally:
            self._connecting.pop(target, None)
        self._conns[target] = conn
        fut.set_result(conn)
        return conn

    async def _open(self, target: int) -> _AsyncConn:
        host, port = self._addr(target)
        label = f"shard {target} at {host}:{port}" if target >= 0 else f"OSD at {host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _AsyncConn(label), host, port),
                self.connect_timeout,
            )
        except TimeoutError:
            raise OSDConnectionError(f"cannot connect to {label}: timed out") from None
        except OSError as exc:
            raise OSDConnectionError(f"cannot connect to {label}: {exc.strerror or exc}") from exc
        return conn

    # -- requests -------------------------------------------------------------------

    async def request(
        self,
        op: int,
        name: str | bytes = b"",
        payload: bytes | bytearray | memoryview = b"",
        *,
        pool: int = 0,
        offset: int = 0,
        length: int = 0,
        pg: int | None = None,
        target: int | None = None,
        check: bool = True,
    ) -> Frame:
        """Send one request to the right shard; return the reply frame.

        Raises OSDStatusError for an error status when ``check``; see the
        module docstring for timeouts, retries and reconnection.
        """
        bname = _name(name)
        attempts = 1 + (self.retries if op in _IDEMPOTENT else 0)
        for attempt in range(attempts):
            where = (
                target if target is not None else _target(self.osdmap, self.route, bname, pool, pg)
            )
            try:
                conn = self._conns.get(where)
                if conn is None or conn.closed:
                    conn = await self._connection(where)
                if conn._writable is not None:
                    await conn.wait_writable()  # the server is not taking requests as fast
                reply = await conn.send(op, bname, payload, pool, offset, length, self.timeout)
            except OSDConnectionError:
                if attempt + 1 >= attempts:
                    raise
                if where >= 0 and op != Op.GET_MAP:
                    with contextlib.suppress(OSDClientError):
                        await self.refresh_map()
                continue
            if check and reply.status:
                raise status_error(op, bname, reply.status)
            return reply
        raise AssertionError("unreachable")

    async def refresh_map(self) -> OSDMap:
        """Fetch the OSD map from the bootstrap address."""
        epoch = self.osdmap.epoch if self.osdmap is not None else 0
        reply = await self.request(Op.GET_MAP, offset=epoch, target=-1)
        self.osdmap = OSDMap.decode(reply.payload)
        return self.osdmap

    async def read(
        self, name: str | bytes, offset: int = 0, length: int = 0, *, pool: int = 0
    ) -> bytes:
        """Bytes [offset, offset + length) of an object (0: to its end); short at its end."""
        return (await self.request(Op.READ, name, pool=pool, offset=offset, length=length)).payload

    async def get(self, name: str | bytes, *, pool: int = 0) -> bytes:
        """The whole object, read in ``READ_CHUNK`` pieces."""
        first = await self.read(name, 0, READ_CHUNK, pool=pool)
        if len(first) < READ_CHUNK:
            return first
        parts = [first]
        offset = READ_CHUNK
        while True:
            part = await self.read(name, offset, READ_CHUNK, pool=pool)
            parts.append(part)
            if len(part) < READ_CHUNK:
                return b"".join(parts)
            offset += READ_CHUNK

    async def stat(self, name: str | bytes, *, pool: int = 0) -> ObjectStat:
        """Size and version of an object."""
        return ObjectStat(*unpack_stat((await self.request(Op.STAT, name, pool=pool)).payload))

    async def put(
        self, name: str | bytes, data: bytes | bytearray | memoryview, *, pool: int = 0
    ) -> int:
        """Replace the object with data; return its size once durable on the OSD."""
        return (await self.request(Op.PUT, name, data, pool=pool)).length

    async def write(
        self,
        name: str | bytes,
        data: bytes | bytearray | memoryview,
        offset: int = 0,
        *,
        pool: int = 0,
    ) -> int:
        """Write data at offset (creating/extending the object); return the object's size."""
        return (await self.request(Op.WRITE, name, data, pool=pool, offset=offset)).length

    async def delete(self, name: str | bytes, *, pool: int = 0) -> None:
        """Delete an object (ObjectNotFound if there is none)."""
        await self.request(Op.DELETE, name, pool=pool)

    async def list_pg(self, pg: int, *, pool: int = 0, page: int = 1000) -> list[bytes]:
        """Every object name in one placement group (paged with FLAG_MORE)."""
        names: list[bytes] = []
        after = b""
        while True:
            reply = await self.request(
                Op.LIST, b"", after, pool=pool, offset=pg, length=page, pg=pg
            )
            got = unpack_names(reply.payload)
            names.extend(got)
            if not reply.flags & FLAG_MORE or not got:
                return names
            after = got[-1]

    async def list(self, *, pool: int = 0) -> list[bytes]:
        """Every object name in the pool, sorted."""
        if self.osdmap is None:
            await self.refresh_map()
        assert self.osdmap is not None
        pg_num = self.osdmap.pools[pool].pg_num
        parts = await asyncio.gather(*(self.list_pg(pg, pool=pool) for pg in range(pg_num)))
        return sorted(n for part in parts for n in part)

    async def ping(self, payload: bytes = b"", *, shard: int | None = None) -> bytes:
        """Round trip to a shard (default: the bootstrap address); returns the echo."""
        target = -1 if shard is None else shard
        return (await self.request(Op.PING, b"", payload, target=target)).payload

    # -- lifetime -------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection (requests in flight fail with OSDConnectionError)."""
        self._closed = True
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---------------------------------------------------------------------------
# blocking client
# ---------------------------------------------------------------------------


class _SyncConn:
    """One blocking connection; ``exchange`` sends frames and reads replies together."""

    def __init__(self, addr: tuple[str, int], label: str, connect_timeout: float) -> None:
        self.label = label
        try:
            self.sock = socket.create_connection(addr, timeout=connect_timeout)
        except OSError as exc:
            raise OSDConnectionError(f"cannot connect to {label}: {exc.strerror or exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.decoder = FrameDecoder()
        self.next_tid = 1
        self.closed = False
        self.selector = selectors.DefaultSelector()

    def tids(self, n: int) -> range:
        first = self.next_tid
        self.next_tid += n
        return range(first, first + n)

    def exchange(self, data: bytes, tids: Iterable[int], timeout: float) -> dict[int, Frame]:
        """Send data (requests) while collecting the replies for tids.

        Reading and writing proceed together, so a long pipeline never
        deadlocks against the server's flow control. OSDTimeout when no
        progress is made for ``timeout`` seconds.
        """
        if self.closed:
            raise OSDConnectionError(f"{self.label}: connection closed")
        want = set(tids)
        got: dict[int, Frame] = {}
        bad: dict[int, FrameError] = {}
        view = memoryview(data)
        pos = 0
        sel = self.selector
        sock = self.sock
        try:
            while want:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pos < len(view) else 0)
                sel.register(sock, events)
                try:
                    ready = sel.select(timeout)
                finally:
                    sel.unregister(sock)
                if not ready:
                    raise OSDTimeout(f"{self.label}: no progress in {timeout} s")
                mask = ready[0][1]
                if mask & selectors.EVENT_WRITE:
                    try:
                        pos += sock.send(view[pos:])
                    except (BlockingIOError, InterruptedError):
                        pass
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 18)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not chunk:
                        raise OSDConnectionError(f"{self.label}: connection closed by the server")
                    while True:
                        try:
                            frames = self.decoder.feed(chunk)
                        except FrameError as exc:
                            if exc.fatal or exc.tid not in want:
                                raise OSDProtocolError(f"{self.label}: bad reply: {exc}") from exc
                            frames = exc.frames  # a skipped reply: fail that request only
                            want.discard(exc.tid)
                            bad[exc.tid] = exc
                            chunk = b""
                        else:
                            chunk = None
                        for frame in frames:
                            if frame.tid in want:
                                want.discard(frame.tid)
                                got[frame.tid] = frame
                        if chunk is None:
                            break
        except OSError as exc:
            self.close()
            if isinstance(exc, OSDClientError):
                raise
            raise OSDConnectionError(f"{self.label}: {exc.strerror or exc}") from exc
        except BaseException:
            self.close()
            raise
        if bad:
            tid, exc = next(iter(bad.items()))
            raise OSDProtocolError(f"{self.label}: the reply to tid {tid} is invalid: {exc}")
        return got

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.selector.close()
            self.sock.close()


class Client:
    """A blocking OSD client (one thread at a time); same routing and errors as AsyncClient."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        route: Route = "direct",
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        retries: int = 1,
    ) -> None:
        if route not in ("direct", "shared"):
            raise ValueError(f"route must be 'direct' or 'shared', got {route!r}")
        self.address = (host, port)
        self.route: Route = route
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.osdmap: OSDMap | None = None
        self._conns: dict[int, _SyncConn] = {}
        try:
            self.refresh_map()
        except BaseException:
            self.close()
            raise

    def _connection(self, target: int) -> _SyncConn:
        conn = self._conns.get(target)
        if conn is not None and not conn.closed:
            return conn
        if target < 0 or self.osdmap is None:
            addr = self.address
            label = f"OSD at {addr[0]}:{addr[1]}"
        else:
            addr = self.osdmap.addr_of(target)
            label = f"shard {target} at {addr[0]}:{addr[1]}"
        conn = _SyncConn(addr, label, self.connect_timeout)
        self._conns[target] = conn
        return conn

    def request(
        self,
        op: int,
        name: str | bytes = b"",
        payload: bytes | bytearray | memoryview = b"",
        *,
        pool: int = 0,
        offset: int = 0,
        length: int = 0,
        pg: int | None = None,
        target: int | None = None,
        check: bool = True,
    ) -> Frame:
        """Send one request to the right shard and wait for its reply."""
        bname = _name(name)
        attempts = 1 + (self.retries if op in _IDEMPOTENT else 0)
        for attempt in range(attempts):
            where = (
                target if target is not None else _target(self.osdmap, self.route, bname, pool, pg)
            )
            try:
                conn = self._connection(where)
                (tid,) = conn.tids(1)
                data = encode_request(
                    op, tid, bname, payload, pool=pool, offset=offset, length=length
                )
                reply = conn.exchange(data, (tid,), self.timeout)[tid]
            except OSDConnectionError:
                if attempt + 1 >= attempts:
                    raise
                if where >= 0 and op != Op.GET_MAP:
                    with contextlib.suppress(OSDClientError):
                        self.refresh_map()
                continue
            if check and reply.status:
                raise status_error(op, bname, reply.status)
            return reply
        raise AssertionError("unreachable")

    def refresh_map(self) -> OSDMap:
        """Fetch the OSD map from the bootstrap address."""
        epoch = self.osdmap.epoch if self.osdmap is not None else 0
        reply = self.request(Op.GET_MAP, offset=epoch, target=-1)
        self.osdmap = OSDMap.decode(reply.payload)
        return self.osdmap

    def read(self, name: str | bytes, offset: int = 0, length: int = 0, *, pool: int = 0) -> bytes:
        """Bytes [offset, offset + length) of an object (0: to its end); short at its end."""
        return self.request(Op.READ, name, pool=pool, offset=offset, length=length).payload

    def get(self, name: str | bytes, *, pool: int = 0) -> bytes:
        """The whole object, read in ``READ_CHUNK`` pieces."""
        parts = []
        offset = 0
        while True:
            part = self.read(name, offset, READ_CHUNK, pool=pool)
            parts.append(part)
            if len(part) < READ_CHUNK:
                return b"".join(parts) if len(parts) > 1 else part
            offset += READ_CHUNK

    def stat(self, name: str | bytes, *, pool: int = 0) -> ObjectStat:
        """Size and version of an object."""
        return ObjectStat(*unpack_stat(self.request(Op.STAT, name, pool=pool).payload))

    def put(self, name: str | bytes, data: bytes | bytearray | memoryview, *, pool: int = 0) -> int:
        """Replace the object with data; return its size once durable on the OSD."""
        return self.request(Op.PUT, name, data, pool=pool).length

    def write(
        self,
        name: str | bytes,
        data: bytes | bytearray | memoryview,
        offset: int = 0,
        *,
        pool: int = 0,
    ) -> int:
        """Write data at offset (creating/extending the object); return the object's size."""
        return self.request(Op.WRITE, name, data, pool=pool, offset=offset).length

    def delete(self, name: str | bytes, *, pool: int = 0) -> None:
        """Delete an object (ObjectNotFound if there is none)."""
        self.request(Op.DELETE, name, pool=pool)

    def list_pg(self, pg: int, *, pool: int = 0, page: int = 1000) -> list[bytes]:
        """Every object name in one placement group (paged with FLAG_MORE)."""
        names: list[bytes] = []
        after = b""
        while True:
            reply = self.request(Op.LIST, b"", after, pool=pool, offset=pg, length=page, pg=pg)
            got = unpack_names(reply.payload)
            names.extend(got)
            if not reply.flags & FLAG_MORE or not got:
                return names
            after = got[-1]

    def list(self, *, pool: int = 0) -> list[bytes]:
        """Every object name in the pool, sorted."""
        assert self.osdmap is not None
        pg_num = self.osdmap.pools[pool].pg_num
        return sorted(n for pg in range(pg_num) for n in self.list_pg(pg, pool=pool))

    def ping(self, payload: bytes = b"", *, shard: int | None = None) -> bytes:
        """Round trip to a shard (default: the bootstrap address); returns the echo."""
        return self.request(Op.PING, b"", payload, target=-1 if shard is None else shard).payload

    def read_many(
        self, names: Sequence[str | bytes], length: int = 0, *, pool: int = 0
    ) -> list[bytes | OSDStatusError]:
        """Pipelined reads: every request is sent before the replies are awaited.

        Returns, in order, the bytes or the OSDStatusError of each read. One
        pipeline per shard, the shards one after the other.
        """
        bnames = [_name(n) for n in names]
        by_target: dict[int, list[int]] = {}
        for i, n in enumerate(bnames):
            by_target.setdefault(_target(self.osdmap, self.route, n, pool), []).append(i)
        out: list[Any] = [None] * len(bnames)
        for target, idxs in by_target.items():
            conn = self._connection(target)
            tids = conn.tids(len(idxs))
            data = b"".join(
                encode_request(Op.READ, tid, bnames[i], pool=pool, length=length)
                for tid, i in zip(tids, idxs, strict=True)
            )
            replies = conn.exchange(data, tids, self.timeout)
            for tid, i in zip(tids, idxs, strict=True):
                r = replies[tid]
                out[i] = status_error(Op.READ, bnames[i], r.status) if r.status else r.payload
        return out

    def close(self) -> None:
        """Close every connection."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_osd(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections at host:port (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise OSDConnectionError(f"no OSD at {host}:{port} after {timeout} s: {exc}")
            if exc.errno not in (_errno.ECONNREFUSED, _errno.ECONNRESET, None):
                raise OSDConnectionError(f"cannot reach {host}:{port}: {exc}") from exc
            time.sleep(0.05)
