"""The blocking OSD client: ``ClientCore``'s plans performed over plain sockets.

One connection per endpoint; a step's requests are written while its
replies are read (one selector loop), so a long pipeline never deadlocks
against the server's flow control.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .client_core import (
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
    OSDClientError,
    OSDConnectionError,
    OSDProtocolError,
    OSDStatusError,
    OSDTimeout,
)

__all__ = ["Client", "wait_for_osd"]


class _Connection:
    """One blocking connection; ``exchange`` sends requests and reads their replies together."""

    def __init__(self, endpoint: Endpoint, connect_timeout: float) -> None:
        self.label = endpoint.label
        try:
            self.sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=connect_timeout
            )
        except OSError as exc:
            raise OSDConnectionError(
                f"cannot connect to {self.label}: {exc.strerror or exc}"
            ) from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.pipeline = Pipeline(self.label)
        self.closed = False
        self.selector = selectors.DefaultSelector()

    def exchange(
        self, data: bytes, tids: Iterable[int], timeout: float
    ) -> dict[int, Frame | OSDProtocolError]:
        """Send data (requests) while collecting the replies for tids.

        A reply the decoder had to skip comes back as its OSDProtocolError.
        OSDTimeout when no progress is made for ``timeout`` seconds; any
        error but a skipped reply closes the connection.
        """
        if self.closed:
            raise OSDConnectionError(f"{self.label}: connection closed")
        want = set(tids)
        got: dict[int, Frame | OSDProtocolError] = {}
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
                    received = self.pipeline.receive(chunk)
                    for frame in received.frames:
                        if frame.tid in want:
                            want.discard(frame.tid)
                            got[frame.tid] = frame
                    for tid, error in received.rejected:
                        if tid in want:
                            want.discard(tid)
                            got[tid] = error
                    if received.fatal is not None:
                        raise received.fatal
        except OSError as exc:
            self.close()
            if isinstance(exc, OSDClientError):
                raise
            raise OSDConnectionError(f"{self.label}: {exc.strerror or exc}") from exc
        except BaseException:
            self.close()
            raise
        return got

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.selector.close()
            self.sock.close()


class Client(ClientCore):
    """A blocking OSD client (one thread at a time); same routing and errors as AsyncClient.

    The constructor fetches the OSD map (OSDConnectionError if the OSD cannot
    be reached); see ``shardio.osd.client`` for routing, timeouts and retries.
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
        try:
            self.refresh_map()
        except BaseException:
            self.close()
            raise

    # -- performing plans -------------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        """Perform a plan's steps until it returns; I/O errors are thrown into it."""
        try:
            step = next(plan)
            while True:
                try:
                    result = self._perform(step)
                except Exception as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(result)
        except StopIteration as done:
            return done.value

    def _perform(self, step: Send | SendMany) -> Any:
        conn = self._conns.get(step.endpoint)
        if conn is None or conn.closed:
            conn = self._conns[step.endpoint] = _Connection(step.endpoint, self.connect_timeout)
        if type(step) is Send:
            tid, data = conn.pipeline.encode(step.call)
            reply = conn.exchange(data, (tid,), self.timeout)[tid]
            if isinstance(reply, OSDProtocolError):
                raise reply
            return reply
        tids, data = conn.pipeline.encode_many(step.calls)
        replies = conn.exchange(data, tids, self.timeout)
        ordered = [replies[tid] for tid in tids]
        for reply in ordered:
            if isinstance(reply, OSDProtocolError):
                raise reply
        return ordered

    # -- the API ----------------------------------------------------------------------

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
        """Send one request to the right shard and wait for its reply.

        Raises OSDStatusError for an error status when ``check``.
        """
        return self._run(
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

    def refresh_map(self) -> OSDMap:
        """Fetch the OSD map from the bootstrap address."""
        return self._run(self.refresh_plan())

    def read(self, name: str | bytes, offset: int = 0, length: int = 0, *, pool: int = 0) -> bytes:
        """Bytes [offset, offset + length) of an object (0: to its end); short at its end."""
        return self.request(Op.READ, name, pool=pool, offset=offset, length=length).payload

    def get(self, name: str | bytes, *, pool: int = 0) -> bytes:
        """The whole object, read in ``READ_CHUNK`` pieces."""
        return self._run(self.get_plan(name, pool))

    def stat(self, name: str | bytes, *, pool: int = 0) -> ObjectStat:
        """Size and version of an object."""
        return stat_of(self.request(Op.STAT, name, pool=pool))

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
        return self._run(self.list_pg_plan(pg, pool, page))

    def list(self, *, pool: int = 0) -> list[bytes]:
        """Every object name in the pool, sorted."""
        return merge_sorted(self.list_pg(pg, pool=pool) for pg in range(self.pg_count(pool)))

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
        return self._run(self.read_many_plan(names, length, pool))

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection (the next request opens a new one)."""
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
            if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, None):
                raise OSDConnectionError(f"cannot reach {host}:{port}: {exc}") from exc
            time.sleep(0.05)
