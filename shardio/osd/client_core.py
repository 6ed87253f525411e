"""The OSD clients' core, without I/O: routing, request frames, reply parsing, retries.

``Client`` (blocking sockets) and ``AsyncClient`` (asyncio) are two thin
transports over this module; everything they have in common lives here:

* ``ClientCore`` holds the settings and the OSD map, decides which address
  each request goes to, and expresses every operation as a *plan*: a
  generator that yields the I/O it needs (``Send`` one request, or
  ``SendMany`` pipelined on one connection), is sent back the reply frames,
  and returns the operation's result. Plans decide retries, map refreshes
  and which exception an error reply raises. A transport only performs the
  steps: it sends back the reply, or throws its I/O error into the plan.
* ``Pipeline`` is one connection's protocol state: the tids of new requests,
  the frame decoder, and what a chunk of received bytes means (replies, the
  tids whose reply was invalid, or a stream that can no longer be trusted).

The exceptions are defined in ``shardio.osd.protocol`` and exported by
``shardio.osd``.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

from .osdmap import OSDMap
from .protocol import (
    FLAG_MORE,
    Frame,
    FrameDecoder,
    FrameError,
    Op,
    OSDClientError,
    OSDConnectionError,
    OSDProtocolError,
    OSDStatusError,
    encode_request,
    status_error,
    unpack_names,
    unpack_stat,
)

__all__ = [
    "IDEMPOTENT_OPS",
    "READ_CHUNK",
    "Call",
    "ClientCore",
    "Endpoint",
    "ObjectStat",
    "Pipeline",
    "Plan",
    "Received",
    "Route",
    "Send",
    "SendMany",
    "as_name",
    "merge_sorted",
    "stat_of",
]

#: get() reads an object in pieces of this size (a short piece means the end).
READ_CHUNK = 1 << 20

Route = Literal["direct", "shared"]

#: ops retried on a fresh connection after a connection error (a write's outcome is unknown)
IDEMPOTENT_OPS = frozenset((Op.READ, Op.STAT, Op.LIST, Op.GET_MAP, Op.PING))

#: listen addresses that mean "every interface": not an address a client can connect to
_WILDCARD_HOSTS = frozenset(("", "0.0.0.0", "::"))

T = TypeVar("T")


class ObjectStat(NamedTuple):
    """STAT reply: size in bytes and version (the seq of the object's last change)."""

    size: int
    version: int


class Call(NamedTuple):
    """One request's fields (the tid is the connection's to choose)."""

    op: int
    name: bytes
    payload: bytes | bytearray | memoryview
    pool: int
    offset: int
    length: int


class Endpoint(NamedTuple):
    """Where a request goes: an address and how messages name it."""

    host: str
    port: int
    label: str


class Send(NamedTuple):
    """Plan step: send ``call`` to ``endpoint``; the transport sends back the reply frame."""

    endpoint: Endpoint
    call: Call


class SendMany(NamedTuple):
    """Plan step: pipeline ``calls`` on one connection; the replies come back in order."""

    endpoint: Endpoint
    calls: tuple[Call, ...]


#: an operation: yields steps, is sent their replies, returns its result
Plan = Generator[Send | SendMany, Any, T]

# Builds a NamedTuple without its Python-level __new__ (per request: it shows in a profile).
_new = tuple.__new__


def as_name(name: str | bytes) -> bytes:
    """An object name as the bytes on the wire (UTF-8 for str)."""
    return name.encode() if isinstance(name, str) else bytes(name)


class Received(NamedTuple):
    """What one chunk of received bytes meant to a ``Pipeline``."""

    frames: list[Frame]
    #: tids whose reply was skipped as invalid; the connection is still in sync
    rejected: Sequence[tuple[int, OSDProtocolError]]
    #: set when the stream can no longer be trusted: the connection must be dropped
    fatal: OSDProtocolError | None


class Pipeline:
    """One connection's requests and replies as frames: tids out, decoded replies in."""

    __slots__ = ("decoder", "label", "next_tid")

    def __init__(self, label: str) -> None:
        self.label = label
        self.decoder = FrameDecoder()
        self.next_tid = 1

    def encode(self, call: Call) -> tuple[int, bytes]:
        """A new tid and the request frame carrying it."""
        tid = self.next_tid
        self.next_tid = tid + 1
        return tid, encode_request(
            call.op,
            tid,
            call.name,
            call.payload,
            pool=call.pool,
            offset=call.offset,
            length=call.length,
        )

    def encode_many(self, calls: Sequence[Call]) -> tuple[range, bytes]:
        """Consecutive tids and the request frames carrying them, as one buffer."""
        first = self.next_tid
        self.next_tid = first + len(calls)
        tids = range(first, first + len(calls))
        data = b"".join(
            encode_request(
                c.op, tid, c.name, c.payload, pool=c.pool, offset=c.offset, length=c.length
            )
            for tid, c in zip(tids, calls, strict=True)
        )
        return tids, data

    def receive(self, data: bytes | bytearray | memoryview) -> Received:
        """Decode received bytes: the replies they complete, rejected tids, a fatal error."""
        try:
            return _new(Received, (self.decoder.feed(data), (), None))
        except FrameError as first:
            exc = first
        frames: list[Frame] = []
        rejected: list[tuple[int, OSDProtocolError]] = []
        while True:
            frames.extend(exc.frames)
            error = OSDProtocolError(f"{self.label}: bad reply from the server: {exc}")
            if exc.fatal:
                return Received(frames, rejected, error)
            # The bad frame was skipped whole (e.g. the reply to an op this side does not
            # know): only its request fails; decoding goes on after it.
            if exc.tid is not None:
                rejected.append((exc.tid, error))
            try:
                frames.extend(self.decoder.feed(b""))
            except FrameError as again:
                exc = again
                continue
            return Received(frames, rejected, None)


class ClientCore:
    """Settings, the OSD map, routing and every operation as a plan (see the module doc).

    ``route="direct"`` sends each request to the shard that owns the object's
    pg, by the map; ``route="shared"`` sends everything to ``address`` and
    lets the accepting shard forward.
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
        if route not in ("direct", "shared"):
            raise ValueError(f"route must be 'direct' or 'shared', got {route!r}")
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError(
                f"timeout and connect_timeout must be positive seconds, "
                f"got {timeout!r} and {connect_timeout!r}"
            )
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.address = (host, port)
        self.route: Route = route
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.osdmap: OSDMap | None = None
        # endpoint() per target, valid while osdmap and address are the ones it was made for
        self._endpoints: dict[int, Endpoint] = {}
        self._endpoints_for: tuple[OSDMap | None, tuple[str, int]] | None = None
        # A connection to a shard failed: its address may have changed (an OSD restarted
        # on other ports), so the next request that routes by the map fetches it first.
        self._map_stale = False

    # -- routing ----------------------------------------------------------------------

    def target_for(self, name: bytes, pool: int = 0, pg: int | None = None) -> int:
        """The shard a request for ``name`` (or for ``pg``) goes to; -1: the bootstrap address."""
        osdmap = self.osdmap
        if self.route == "shared" or osdmap is None or not osdmap.addrs:
            return -1
        if pg is not None:
            return osdmap.shard_of_pg(pg, pool)
        return osdmap.shard_for(name, pool)

    def endpoint(self, target: int) -> Endpoint:
        """The address of a target (-1: the bootstrap address).

        A shard the map lists at a wildcard address (an OSD bound to every
        interface) is reached at the host the client bootstrapped from.
        """
        basis = self._endpoints_for
        if basis is None or basis[0] is not self.osdmap or basis[1] != self.address:
            self._endpoints = {}
            self._endpoints_for = (self.osdmap, self.address)
        endpoint = self._endpoints.get(target)
        if endpoint is None:
            endpoint = self._endpoints[target] = self._make_endpoint(target)
        return endpoint

    def _make_endpoint(self, target: int) -> Endpoint:
        if target < 0 or self.osdmap is None:
            host, port = self.address
            return Endpoint(host, port, f"OSD at {host}:{port}")
        host, port = self.osdmap.addr_of(target)
        if host in _WILDCARD_HOSTS:
            host = self.address[0]
        return Endpoint(host, port, f"shard {target} at {host}:{port}")

    # -- plans ------------------------------------------------------------------------

    def request_plan(
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
    ) -> Plan[Frame]:
        """One request, routed, retried on a fresh connection when idempotent.

        Raises the ``status_error`` of an error reply when ``check``.
        """
        call = _new(Call, (op, as_name(name), payload, pool, offset, length))
        attempts = 1 + (self.retries if op in IDEMPOTENT_OPS else 0)
        for attempt in range(attempts):
            where = target if target is not None else self.target_for(call.name, pool, pg)
            if where >= 0 and self._map_stale:
                yield from self._refresh_quietly()
                if target is None:
                    where = self.target_for(call.name, pool, pg)
            try:
                reply: Frame = yield _new(Send, (self.endpoint(where), call))
            except OSDConnectionError:
                if where >= 0:
                    self._map_stale = True
                if attempt + 1 >= attempts:
                    raise
                continue
            if check and reply.status:
                raise status_error(op, call.name, reply.status)
            return reply
        raise AssertionError("unreachable")

    def refresh_plan(self) -> Plan[OSDMap]:
        """Fetch the OSD map from the bootstrap address."""
        epoch = self.osdmap.epoch if self.osdmap is not None else 0
        reply = yield from self.request_plan(Op.GET_MAP, offset=epoch, target=-1)
        # Concurrent requests that found the map stale each fetch it (the flag stays set
        # until one has it): none of them goes by the old map meanwhile.
        self.osdmap = OSDMap.decode(reply.payload)
        self._map_stale = False
        return self.osdmap

    def _refresh_quietly(self) -> Plan[None]:
        """Refresh the map; if that fails too, the request goes by the old one."""
        try:
            yield from self.refresh_plan()
        except OSDClientError:
            pass

    def get_plan(self, name: str | bytes, pool: int = 0) -> Plan[bytes]:
        """The whole object, read in ``READ_CHUNK`` pieces (a short one is the last)."""
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = yield from self.request_plan(
                Op.READ, name, pool=pool, offset=offset, length=READ_CHUNK
            )
            part = reply.payload
            if len(part) < READ_CHUNK:
                if not parts:
                    return part
                parts.append(part)
                return b"".join(parts)
            parts.append(part)
            offset += READ_CHUNK

    def list_pg_plan(self, pg: int, pool: int = 0, page: int = 1000) -> Plan[list[bytes]]:
        """Every object name in one placement group, a page at a time (FLAG_MORE: go on)."""
        names: list[bytes] = []
        after = b""
        while True:
            reply = yield from self.request_plan(
                Op.LIST, b"", after, pool=pool, offset=pg, length=page, pg=pg
            )
            got = unpack_names(reply.payload)
            names.extend(got)
            if not reply.flags & FLAG_MORE or not got:
                return names
            after = got[-1]

    def read_many_plan(
        self, names: Sequence[str | bytes], length: int = 0, pool: int = 0
    ) -> Plan[list[bytes | OSDStatusError]]:
        """Reads pipelined per shard: every request of a shard leaves before its replies count.

        The result has, in order, the bytes or the OSDStatusError of each read.
        Not retried (one broken connection fails the whole call).
        """
        if self._map_stale and self.route == "direct":
            yield from self._refresh_quietly()
        bnames = [as_name(n) for n in names]
        by_target: dict[int, list[int]] = {}
        for i, n in enumerate(bnames):
            by_target.setdefault(self.target_for(n, pool), []).append(i)
        out: list[Any] = [None] * len(bnames)
        for where, indexes in by_target.items():
            calls = tuple(Call(Op.READ, bnames[i], b"", pool, 0, length) for i in indexes)
            try:
                replies: list[Frame] = yield SendMany(self.endpoint(where), calls)
            except OSDConnectionError:
                if where >= 0:
                    self._map_stale = True
                raise
            for i, reply in zip(indexes, replies, strict=True):
                out[i] = (
                    status_error(Op.READ, bnames[i], reply.status)
                    if reply.status
                    else reply.payload
                )
        return out

    def pg_count(self, pool: int = 0) -> int:
        """Placement groups of a pool, by the map (fetched already)."""
        if self.osdmap is None:
            raise OSDClientError("no OSD map yet: fetch it with refresh_map() first")
        return self.osdmap.pools[pool].pg_num


def stat_of(reply: Frame) -> ObjectStat:
    """The ObjectStat a STAT reply carries."""
    return ObjectStat(*unpack_stat(reply.payload))


def merge_sorted(parts: Iterable[list[bytes]]) -> list[bytes]:
    """Every pg's names as one sorted list (the pool's listing)."""
    return sorted(n for part in parts for n in part)
