"""The asyncio OSD client: ``ClientCore``'s plans performed on asyncio transports.

One pipelined connection per endpoint, shared by every concurrent call:
requests queued during one pass of the event loop leave in one write,
replies are matched to their futures by tid in any order, a sweep enforces
the timeouts, and a call waits while the server does not take requests as
fast as they come (transport flow control).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from .client_core import (
    Call,
    ClientCore,
    Endpoint,
    ObjectStat,
    Pipeline,
    Plan,
    Route,
    Send,
    SendMany,
    T,
    merge_sorted,
    stat_of,
)
from .osdmap import OSDMap
from .protocol import (
    Frame,
    Op,
    OSDConnectionError,
    OSDStatusError,
    OSDTimeout,
    op_name,
)

__all__ = ["AsyncClient"]


class _Connection(asyncio.Protocol):
    """One pipelined connection: futures by tid, write batching and flow control, timeouts."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.pipeline = Pipeline(label)
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.closed = False
        self.error: Exception | None = None
        self.loop = asyncio.get_running_loop()
        self.writable: asyncio.Future[None] | None = None  # set while the transport is full
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._deadlines: deque[tuple[float, int, int, bytes]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = 1.0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        received = self.pipeline.receive(data)
        pending = self.pending
        for frame in received.frames:
            fut = pending.pop(frame.tid, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
        for tid, error in received.rejected:
            fut = pending.pop(tid, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)
        if received.fatal is not None:
            self._fail(received.fatal)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(OSDConnectionError(f"{self.label}: connection closed by the server{reason}"))

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- requests ---------------------------------------------------------------------

    def send(self, call: Call, timeout: float) -> asyncio.Future[Frame]:
        """Queue one request; the future gets its reply frame (or the error).

        Requests queued during one pass of the loop leave in one write. The
        timeout is enforced by a sweep every ``timeout / 8`` (at least 10 ms).
        """
        if self.closed:
            raise self.error or OSDConnectionError(f"{self.label}: connection closed")
        tid, data = self.pipeline.encode(call)
        fut: asyncio.Future[Frame] = self.loop.create_future()
        self.pending[tid] = fut
        self._deadlines.append((self.loop.time() + timeout, tid, call.op, call.name))
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
        while self.writable is not None:
            await self.writable

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
                    OSDTimeout(f"{self.label}: no reply to {op_name(op)} {name!r} in time")
                )
        if deadlines and not self.closed:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    # -- lifetime ---------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)  # the writer wakes up and finds the connection closed
        self._out.clear()
        self._deadlines.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if not self.closed:
            self._fail(OSDConnectionError(f"{self.label}: connection closed by the client"))


class AsyncClient(ClientCore):
    """An asyncio OSD client; create it with ``await AsyncClient.connect(host, port)``.

    See ``shardio.osd.client`` for routing, timeouts and retries.
    """

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
        super().__init__(
            host,
            port,
            route=route,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
        )
        self._conns: dict[Endpoint, _Connection] = {}
        self._connecting: dict[Endpoint, asyncio.Future[_Connection]] = {}
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

    # -- connections ------------------------------------------------------------------

    async def _connection(self, endpoint: Endpoint) -> _Connection:
        conn = self._conns.get(endpoint)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise OSDConnectionError("the client is closed")
        pending = self._connecting.get(endpoint)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
        self._connecting[endpoint] = fut
        try:
            conn = await self._open(endpoint)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: others awaiting it get it too
            raise
        finally:
            self._connecting.pop(endpoint, None)
        self._conns[endpoint] = conn
        fut.set_result(conn)
        return conn

    async def _open(self, endpoint: Endpoint) -> _Connection:
        label = endpoint.label
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(label), endpoint.host, endpoint.port),
                self.connect_timeout,
            )
        except TimeoutError:
            raise OSDConnectionError(f"cannot connect to {label}: timed out") from None
        except OSError as exc:
            raise OSDConnectionError(f"cannot connect to {label}: {exc.strerror or exc}") from exc
        return conn

    # -- performing plans -------------------------------------------------------------

    async def _run(self, plan: Plan[T]) -> T:
        """Perform a plan's steps until it returns; I/O errors are thrown into it."""
        try:
            step = next(plan)
            while True:
                try:
                    if type(step) is Send:  # the common case, inline
                        conn = self._conns.get(step.endpoint)
                        if conn is None or conn.closed:
                            conn = await self._connection(step.endpoint)
                        if conn.writable is not None:
                            await conn.wait_writable()  # the server takes requests slower
                        result: Any = await conn.send(step.call, self.timeout)
                    else:
                        result = await self._send_many(step)
                except Exception as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(result)
        except StopIteration as done:
            return done.value

    async def _send_many(self, step: SendMany) -> list[Frame]:
        conn = await self._connection(step.endpoint)
        futures = []
        for call in step.calls:
            if conn.writable is not None:
                await conn.wait_writable()
            futures.append(conn.send(call, self.timeout))
        return list(await asyncio.gather(*futures))

    # -- the API ----------------------------------------------------------------------

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

        Raises OSDStatusError for an error status when ``check``.
        """
        return await self._run(
            self.request_plan(
                op,
                name,
                payload,
                pool=pool,
                offset=offset,
                length=length,
                pg=pg,
                target=target,
                check=check,
            )
        )

    async def refresh_map(self) -> OSDMap:
        """Fetch the OSD map from the bootstrap address."""
        return await self._run(self.refresh_plan())

    async def read(
        self, name: str | bytes, offset: int = 0, length: int = 0, *, pool: int = 0
    ) -> bytes:
        """Bytes [offset, offset + length) of an object (0: to its end); short at its end."""
        plan = self.request_plan(Op.READ, name, pool=pool, offset=offset, length=length)
        return (await self._run(plan)).payload

    async def get(self, name: str | bytes, *, pool: int = 0) -> bytes:
        """The whole object, read in ``READ_CHUNK`` pieces."""
        return await self._run(self.get_plan(name, pool))

    async def stat(self, name: str | bytes, *, pool: int = 0) -> ObjectStat:
        """Size and version of an object."""
        return stat_of(await self.request(Op.STAT, name, pool=pool))

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
        return await self._run(self.list_pg_plan(pg, pool, page))

    async def list(self, *, pool: int = 0) -> list[bytes]:
        """Every object name in the pool, sorted (the pgs are listed concurrently)."""
        if self.osdmap is None:
            await self.refresh_map()
        pgs = range(self.pg_count(pool))
        return merge_sorted(await asyncio.gather(*(self.list_pg(pg, pool=pool) for pg in pgs)))

    async def ping(self, payload: bytes = b"", *, shard: int | None = None) -> bytes:
        """Round trip to a shard (default: the bootstrap address); returns the echo."""
        target = -1 if shard is None else shard
        return (await self.request(Op.PING, b"", payload, target=target)).payload

    async def read_many(
        self, names: Sequence[str | bytes], length: int = 0, *, pool: int = 0
    ) -> list[bytes | OSDStatusError]:
        """Pipelined reads, as ``Client.read_many``: the bytes or OSDStatusError of each."""
        return await self._run(self.read_many_plan(names, length, pool))

    # -- lifetime ---------------------------------------------------------------------

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
