"""What every peer server of the latency suite shares: the data, the ops, the frames.

The peers serve the very files a shardio OSD wrote: an OSD data directory
(``DIR/osd.json`` and one log-structured store per shard, ``DIR/shard-S``),
opened with ``PosixEnv`` (plain ``os.pread`` and ``threading`` locks). A
peer opens *every* shard's store and sends each request to the store that
owns the object's placement group, so it reads the same records at the same
offsets of the same segment files as the shards do; only where the store
code runs differs. Each request runs ``shardio.osd.server.apply_op``, the
function the shards run on their tame stacks, so replies and error statuses
are identical.

To the client a peer is a one-shard OSD: GET_MAP returns a map with one
shard whose endpoint is the peer's own (shared) port, so the same map-aware
client talks to every server unchanged.

Nothing here is tied to an I/O framework: ``handle_blocking`` is the whole
connection loop of the thread-per-connection and gevent peers (blocking
socket calls), ``RequestDecoder`` and ``answer_inline`` serve the asyncio ones.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from shardio.osd.objectstore import ObjectStore
from shardio.osd.operations import apply_op
from shardio.osd.osdmap import OSDMap, object_hash
from shardio.osd.protocol import (
    FLAG_REPLY,
    OBJECT_OPS as _OBJECT_OPS,
    OP_DELETE as _DELETE,
    OP_GET_MAP as _GET_MAP,
    OP_LIST as _LIST,
    OP_PING as _PING,
    OP_PUT as _PUT,
    OP_WRITE as _WRITE,
    Frame,
    FrameDecoder,
    FrameError,
    Status,
    encode_frame_parts,
    encode_reply_parts,
)
from shardio.tame import posix_env

__all__ = [
    "MAX_INFLIGHT",
    "MAX_READ",
    "DataDirError",
    "RequestDecoder",
    "StoreSet",
    "add_common_args",
    "announce",
    "answer_inline",
    "execute",
    "handle_blocking",
    "reply_parts",
]

#: Largest READ a peer serves (the shardio messenger's default ``Limits.max_read``).
MAX_READ = 16 << 20
#: Requests in flight per connection before a peer stops reading it (the messenger's default).
MAX_INFLIGHT = 64
MAX_LIST = 1024

_MUTATIONS = frozenset((_WRITE, _PUT, _DELETE))
_EROFS = errno.EROFS

#: (status, payload, reply length field, reply flags), as ``apply_op`` returns it.
Result = tuple[int, bytes, int, int]


class DataDirError(Exception):
    """The directory is not an OSD data directory a peer can serve."""


class _PgOf:
    __slots__ = ("pg_num",)

    def __init__(self, pg_num: int) -> None:
        self.pg_num = pg_num

    def __call__(self, key: bytes) -> int:
        return object_hash(key) % self.pg_num


@dataclass
class StoreSet:
    """Every shard store of an OSD data directory, opened with PosixEnv.

    ``read_only`` refuses PUT/WRITE/DELETE with EROFS: set it when several
    processes open the same directory (the store allows one writer).
    """

    osdmap: OSDMap  #: the OSD's placement (its shard count and pg_num)
    stores: list[ObjectStore]
    read_only: bool = False
    map_payload: bytes = b""  #: GET_MAP reply: a one-shard map pointing at this peer

    @classmethod
    def open(cls, data_dir: str, *, read_only: bool = False) -> StoreSet:
        """Open the stores listed by ``DIR/osd.json`` (blocking: each open scans its log)."""
        meta_path = os.path.join(data_dir, "osd.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            shards, pg_num = int(meta["shards"]), int(meta["pg_num"])
        except FileNotFoundError:
            raise DataDirError(
                f"{data_dir!r} has no osd.json: load it with a shardio OSD first "
                "(python -m shardio.osd serve ... then load)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataDirError(f"{meta_path} is not an OSD data dir description: {exc}") from None
        stores: list[ObjectStore] = []
        try:
            for s in range(shards):
                path = os.path.join(data_dir, f"shard-{s}")
                if not os.path.isdir(path):
                    raise DataDirError(f"{path} is missing: osd.json says {shards} shards")
                stores.append(
                    ObjectStore(
                        path,
                        posix_env,
                        pg_of=_PgOf(pg_num),
                        sync=False,
                        max_read=MAX_READ,
                        read_only=read_only,
                    )
                )
        except BaseException:
            for st in stores:
                st.close()
            raise
        osdmap = OSDMap.build(shards, pg_num=pg_num)
        return cls(osdmap, stores, read_only)

    def set_address(self, host: str, port: int) -> None:
        """The endpoint GET_MAP announces: one shard, this peer."""
        pool = self.osdmap.pools[0]
        self.map_payload = OSDMap.build(1, pg_num=pool.pg_num, addrs=[(host, port)]).encode()

    def close(self) -> None:
        for st in self.stores:
            st.close()


def execute(stores: StoreSet, frame: Frame) -> Result:
    """Run one object request (READ, STAT, ...) against its store; blocking."""
    op = frame.op
    if frame.pool != 0:
        return Status.EINVAL, b"", 0, 0
    if op == _LIST:
        try:
            shard = stores.osdmap.shard_of_pg(frame.offset)
        except ValueError:
            return Status.EINVAL, b"", 0, 0
    else:
        shard = stores.osdmap.shard_for(frame.name)
        if op in _MUTATIONS and stores.read_only:
            return _EROFS, b"", 0, 0
    return apply_op(
        stores.stores[shard], op, frame.name, frame.offset, frame.length, frame.payload, MAX_LIST
    )


def reply_parts(frame: Frame, result: Result) -> list[bytes]:
    """The reply frame of a request as [header, payload], ready for ``writelines``
    (the encoder the shardio messenger uses)."""
    status, payload, length, flags = result
    return encode_reply_parts(frame.op, frame.tid, status, payload, length, flags)


def answer_inline(stores: StoreSet, frame: Frame) -> Result | None:
    """The result of a request that needs no store call (GET_MAP, PING, refusals), else None."""
    op = frame.op
    if frame.flags & FLAG_REPLY:
        return Status.EINVAL, b"", 0, 0
    if op in _OBJECT_OPS or op == _LIST:
        return None
    if op == _GET_MAP:
        return Status.OK, stores.map_payload, 0, 0
    if op == _PING:
        return Status.OK, frame.payload, 0, 0
    return Status.EOPNOTSUPP, b"", 0, 0


class RequestDecoder:
    """Request frames from a byte stream, with error replies for bad frames.

    ``feed(data)`` returns (frames, error replies, close): a bad frame whose
    tid is known gets an error reply; a fatal one (the stream is out of sync)
    asks the caller to close after sending the replies.
    """

    __slots__ = ("decoder",)

    def __init__(self) -> None:
        self.decoder = FrameDecoder()

    def feed(self, data: bytes) -> tuple[list[Frame], list[bytes], bool]:
        frames: list[Frame] = []
        errors: list[bytes] = []
        while True:
            try:
                frames += self.decoder.feed(data)
                return frames, errors, False
            except FrameError as exc:
                frames += exc.frames
                if exc.tid is not None:
                    op = exc.op if exc.op is not None and 0 <= exc.op < 256 else 0
                    head, body = encode_frame_parts(
                        op, exc.tid, status=exc.status, flags=FLAG_REPLY
                    )
                    errors.append(head + bytes(body))
                if exc.fatal:
                    return frames, errors, True
                data = b""  # the bad frame was skipped: decode what follows it


def handle_blocking(sock: socket.socket, stores: StoreSet, recv_size: int = 256 * 1024) -> None:
    """Serve one connection with blocking calls until the peer closes it.

    Pipelined requests that arrive in one ``recv`` are answered in order and
    their replies leave in one ``sendall``. The store runs in the calling
    thread (or greenlet), so a connection has one request executing at a time.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = RequestDecoder()
    recv = sock.recv
    sendall = sock.sendall
    while True:
        try:
            data = recv(recv_size)
        except ConnectionError:
            return
        if not data:
            return
        frames, out, close = decoder.feed(data)
        for frame in frames:
            result = answer_inline(stores, frame)
            if result is None:
                result = execute(stores, frame)
            out += reply_parts(frame, result)
        if out:
            try:
                sendall(b"".join(out))
            except ConnectionError:
                return
        if close:
            return


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every peer takes."""
    p.add_argument("--data", required=True, help="an OSD data directory (osd.json + shard-S/)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port")


def announce(host: str, port: int, extra: Iterable[str] = ()) -> None:
    """Print the line the suite runner waits for: ``listening on HOST:PORT``."""
    tail = "".join(f" {e}" for e in extra)
    print(f"listening on {host}:{port}{tail}", flush=True)
    sys.stdout.flush()
