"""The OSD wire protocol: length-prefixed binary frames with checksums.

Every message, request or reply, is one frame::

    +--------------------------- header, 56 bytes, little-endian ----------------------+
    | magic u32 | version u8 | op u8 | flags u16 | tid u64 | status i32 | pool u32      |
    | name_len u16 | reserved u16 (0) | offset u64 | length u64 | payload_len u32       |
    | body_crc u32 | header_crc u32                                                    |
    +-----------------------------------------------------------------------------------+
    | name (name_len bytes) | payload (payload_len bytes)                               |
    +-----------------------------------------------------------------------------------+

Checksums are CRC-32 (zlib's ``crc32``, the ISO-HDLC/Ethernet polynomial, which
the C codec ``_codec.c`` calls too; not CRC-32C).
``body_crc`` covers name + payload; ``header_crc`` covers the 52 header bytes
before it, ``body_crc`` included, so the two together cover every byte of the
frame. The header is checked on its own *before* the decoder trusts its
lengths: a corrupted length is caught as soon as 56 bytes have arrived,
without waiting for (or allocating) a body that will never come. CRC-32
detects every error burst up to 32 bits, so any single corrupted byte is
detected, never misparsed.

Per-op use of the fields (requests; replies set ``FLAG_REPLY`` and echo op and tid):

========  ==========================  ========================================
op        request                     reply payload (status 0)
========  ==========================  ========================================
READ      name, offset, length        the bytes read (short at end of object)
STAT      name                        ``pack_stat(size, version)``
WRITE     name, offset, payload       empty; reply.length = object size
PUT       name, payload (replaces)    empty; reply.length = object size
DELETE    name                        empty
LIST      offset = pg, length = max   ``pack_names(names)``; FLAG_MORE if cut
          entries (0: no limit),
          payload = start-after name
GET_MAP   offset = client's epoch     the encoded OSD map
PING      --                          the request's payload, echoed
========  ==========================  ========================================

A reply's ``status`` is 0 or a positive errno value (``Status``): ENOENT for a
missing object, EIO for a corrupt extent, ... A read past the end of an object
is not an error: it returns the bytes that exist (possibly none).

Decoding and reply encoding run in C when the codec extension is built
(``_codec.c``: the decoder's loop over valid frames, the reply header); the
rules stay here: the C loop stops at any frame it does not accept, and the
Python decoder below raises that frame's error.

Limits: an object name is at most ``MAX_NAME`` (4 KiB) bytes and a payload at
most ``MAX_PAYLOAD`` (64 MiB). Violations raise ``FrameError`` subclasses;
each says whether the stream is still in sync (``fatal``) and which errno a
reply should carry (``status``), so the messenger can send an error reply and
carry on, or send one and close -- never crash or allocate without bound.

The errors a client raises for a reply live here too (``OSDClientError`` and
its subclasses; ``status_error`` maps a reply's errno to one), so each is
defined once for both clients; ``shardio.osd`` exports them all.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from enum import IntEnum
from typing import NamedTuple

from shardio.errors import ShardioError

__all__ = [
    "FLAG_MORE",
    "FLAG_REPLY",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "VERSION",
    "BadChecksum",
    "BadHeaderChecksum",
    "BadMagic",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "MalformedFrame",
    "MalformedPayload",
    "NameTooLong",
    "OSDClientError",
    "OSDConnectionError",
    "OSDProtocolError",
    "OSDStatusError",
    "OSDTimeout",
    "ObjectNotFound",
    "Op",
    "ShardUnavailable",
    "Status",
    "Truncated",
    "UnknownOp",
    "UnsupportedVersion",
    "decode_frame",
    "encode_frame",
    "encode_frame_parts",
    "encode_reply",
    "encode_reply_parts",
    "encode_request",
    "op_name",
    "pack_names",
    "pack_stat",
    "status_error",
    "unpack_names",
    "unpack_stat",
]

MAGIC = 0x4F495353  # b"SSIO" little-endian: the first four bytes on the wire
VERSION = 1
MAX_NAME = 4096
MAX_PAYLOAD = 64 * 1024 * 1024

FLAG_REPLY = 0x0001  #: the frame is a reply
FLAG_MORE = 0x0002  #: LIST reply: more names follow (ask again after the last one)
_KNOWN_FLAGS = FLAG_REPLY | FLAG_MORE

#: fields up to and including body_crc; header_crc follows
_HDR = struct.Struct("<IBBHQiIHHQQII")
_HDR_FULL = struct.Struct("<IBBHQiIHHQQIII")  # with header_crc, for decoding in one call
_U32 = struct.Struct("<I")
HEADER_SIZE = _HDR.size + _U32.size  # 56
_HDR_BODY = _HDR.size  # 52: bytes covered by header_crc

_crc32 = zlib.crc32


class Op(IntEnum):
    """Operation codes."""

    READ = 1
    STAT = 2
    WRITE = 3
    PUT = 4
    DELETE = 5
    LIST = 6
    GET_MAP = 7
    PING = 8


_OPS = frozenset(int(op) for op in Op)

# The op codes as plain ints, for dispatch on hot paths (an IntEnum member is a
# class attribute lookup away; a module-level int is not).
OP_READ, OP_STAT, OP_WRITE, OP_PUT, OP_DELETE, OP_LIST, OP_GET_MAP, OP_PING = (
    int(op) for op in (Op.READ, Op.STAT, Op.WRITE, Op.PUT, Op.DELETE, Op.LIST, Op.GET_MAP,
                       Op.PING))
OBJECT_OPS = frozenset((OP_READ, OP_STAT, OP_WRITE, OP_PUT, OP_DELETE))
"""Ops that name an object (and so are routed by its placement group)."""


class Status(IntEnum):
    """Reply status: 0 or a positive errno value (Linux numbering, fixed on the wire)."""

    OK = 0
    ENOENT = 2
    EIO = 5
    E2BIG = 7
    EAGAIN = 11
    ENOMEM = 12
    EBUSY = 16
    EINVAL = 22
    EFBIG = 27
    ENOSPC = 28
    ENAMETOOLONG = 36
    EBADMSG = 74
    EPROTO = 71
    EOPNOTSUPP = 95
    EPROTONOSUPPORT = 93
    ESHUTDOWN = 108
    ETIMEDOUT = 110
    ESTALE = 116


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class FrameError(ShardioError):
    """A frame that cannot be accepted.

    Attributes the messenger acts on:

    * ``fatal`` -- True when the byte stream can no longer be trusted (the
      frame's boundaries are unknown or too large to skip): send an error reply
      if ``tid`` is known, then close. False when the bad frame was consumed
      whole: send an error reply and keep reading.
    * ``tid`` -- the request's tid when the header was intact, else None.
    * ``op`` -- the request's op code when the header was intact, else None.
    * ``status`` -- the errno (``Status``) an error reply should carry.
    * ``frames`` -- frames decoded, by the same ``feed`` call, before this
      error: they are valid and must still be handled.
    """

    fatal: bool = True
    status: int = Status.EBADMSG

    def __init__(self, message: str, *, tid: int | None = None, op: int | None = None) -> None:
        super().__init__(message)
        self.tid = tid
        self.op = op
        self.frames: list[Frame] = []
        self._end: int | None = None  # end of the skipped frame (non-fatal errors)


class BadMagic(FrameError):
    """The stream does not start with a frame header (not our protocol, or out of sync)."""

    status = Status.EPROTO


class BadChecksum(FrameError):
    """The name/payload CRC does not match; the header was intact, so the frame was skipped."""

    fatal = False
    status = Status.EBADMSG


class BadHeaderChecksum(BadChecksum):
    """The header CRC does not match: its lengths cannot be trusted, the stream is lost."""

    fatal = True


class UnsupportedVersion(FrameError):
    """A protocol version this side does not speak."""

    status = Status.EPROTONOSUPPORT


class FrameTooLarge(FrameError):
    """A payload over the limit: refused before anything is allocated or read."""

    status = Status.E2BIG


class NameTooLong(FrameTooLarge):
    """An object name over ``MAX_NAME`` bytes."""

    status = Status.ENAMETOOLONG


class UnknownOp(FrameError):
    """An op code this side does not know; the frame was consumed whole."""

    fatal = False
    status = Status.EOPNOTSUPP


class MalformedFrame(FrameError):
    """An intact frame with impossible contents (unknown flags, reserved bits set)."""

    fatal = False
    status = Status.EINVAL


class MalformedPayload(FrameError):
    """A payload that does not parse as its op's structure (STAT, LIST replies)."""

    fatal = False
    status = Status.EBADMSG


class Truncated(FrameError):
    """The stream ended inside a frame (or a buffer holds only part of one)."""

    status = Status.EBADMSG


# -- the clients' errors (shardio.osd.client raises them; shardio.osd exports them) --------


def op_name(op: int) -> str:
    """The name of an op code for messages (``READ``; ``op 99`` for an unknown one)."""
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"


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
            status_name = Status(status).name
        except ValueError:
            status_name = f"errno {status}"
        super().__init__(f"{op_name(op)} {name!r}: {status_name} ({os.strerror(status)})")

    @property
    def errno(self) -> int:
        """The reply's status, as ``OSError.errno`` would name it."""
        return self.status

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.op, self.name, self.status))


class ObjectNotFound(OSDStatusError, KeyError):
    """ENOENT: no such object."""

    def __str__(self) -> str:  # KeyError would quote it
        return str(self.args[0]) if self.args else "object not found"


class ShardUnavailable(OSDStatusError):
    """ESHUTDOWN: the shard that owns the object is down or stopping."""


def status_error(op: int, name: bytes, status: int) -> OSDStatusError:
    """The exception for an error reply: ObjectNotFound, ShardUnavailable or OSDStatusError."""
    if status == Status.ENOENT:
        return ObjectNotFound(op, name, status)
    if status == Status.ESHUTDOWN:
        return ShardUnavailable(op, name, status)
    return OSDStatusError(op, name, status)


# ---------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------


class Frame(NamedTuple):
    """One decoded frame. ``name`` and ``payload`` are bytes."""

    op: int
    flags: int
    tid: int
    status: int
    pool: int
    offset: int
    length: int
    name: bytes
    payload: bytes

    @property
    def is_reply(self) -> bool:
        """True for a reply frame."""
        return bool(self.flags & FLAG_REPLY)


_new_frame = tuple.__new__  # builds a Frame without NamedTuple's Python-level __new__


def _as_bytes(name: str | bytes) -> bytes:
    return name.encode() if isinstance(name, str) else bytes(name)


def encode_frame_parts(
    op: int,
    tid: int,
    *,
    name: str | bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    status: int = 0,
    pool: int = 0,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """Encode a frame as (header + name, payload), for ``transport.writelines`` without a copy.

    Raises NameTooLong / FrameTooLarge over the limits, ValueError for fields out of range.
    """
    bname = _as_bytes(name)
    nlen = len(bname)
    plen = len(payload)
    if nlen > MAX_NAME:
        raise NameTooLong(f"object name of {nlen} bytes exceeds the {MAX_NAME}-byte limit", tid=tid)
    if plen > MAX_PAYLOAD:
        raise FrameTooLarge(
            f"payload of {plen} bytes exceeds the {MAX_PAYLOAD}-byte limit", tid=tid
        )
    body_crc = _crc32(payload, _crc32(bname)) if nlen else _crc32(payload)
    try:
        hdr = _HDR.pack(
            MAGIC, VERSION, op, flags, tid, status, pool, nlen, 0, offset, length, plen, body_crc
        )
    except struct.error as exc:
        raise ValueError(f"frame field out of range: {exc}") from None
    return hdr + _U32.pack(_crc32(hdr)) + bname, payload


def _reply_parts_python(
    op: int, tid: int, status: int, payload: bytes = b"", length: int = 0, flags: int = 0
) -> list[bytes]:
    """A reply frame as ``[header, payload]`` (``[header]`` without a payload), for
    ``writelines``: what ``encode_frame_parts`` gives for a reply (no name, pool or
    offset), with positional arguments and no keyword parsing: the servers' hot path.

    Raises FrameTooLarge over the payload limit, ValueError for fields out of range.
    """
    plen = len(payload)
    if plen > MAX_PAYLOAD:
        raise FrameTooLarge(
            f"payload of {plen} bytes exceeds the {MAX_PAYLOAD}-byte limit", tid=tid
        )
    try:
        hdr = _HDR.pack(
            MAGIC, VERSION, op, flags | FLAG_REPLY, tid, status, 0, 0, 0, 0, length, plen,
            _crc32(payload),
        )  # fmt: skip
    except struct.error as exc:
        raise ValueError(f"frame field out of range: {exc}") from None
    head = hdr + _U32.pack(_crc32(hdr))
    return [head, payload] if plen else [head]


encode_reply_parts = _reply_parts_python  # the C codec's, once it is set up (below)


def encode_frame(
    op: int,
    tid: int,
    *,
    name: str | bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    status: int = 0,
    pool: int = 0,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
) -> bytes:
    """Encode one frame as bytes. See ``encode_frame_parts`` for errors."""
    head, body = encode_frame_parts(
        op,
        tid,
        name=name,
        payload=payload,
        status=status,
        pool=pool,
        offset=offset,
        length=length,
        flags=flags,
    )
    return head + body if body else head


def encode_request(
    op: int,
    tid: int,
    name: str | bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    *,
    pool: int = 0,
    offset: int = 0,
    length: int = 0,
) -> bytes:
    """Encode a request frame (see the module docstring for each op's fields)."""
    return encode_frame(
        op, tid, name=name, payload=payload, pool=pool, offset=offset, length=length
    )


def encode_reply(
    op: int,
    tid: int,
    status: int = 0,
    payload: bytes | bytearray | memoryview = b"",
    *,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
) -> bytes:
    """Encode a reply frame: op and tid of the request, an errno-style status, a payload."""
    return encode_frame(
        op,
        tid,
        payload=payload,
        status=status,
        offset=offset,
        length=length,
        flags=flags | FLAG_REPLY,
    )


def _parse_one(
    mv: memoryview, pos: int, end: int, max_name: int, max_payload: int
) -> tuple[Frame, int] | None:
    """Parse the frame at mv[pos:end]; None if it is not complete yet.

    Raises a FrameError for a bad frame. For a non-fatal error the frame's
    end is stored on the exception as ``_end`` so the caller can skip it.
    """
    if end - pos < HEADER_SIZE:
        if end - pos >= 4 and _U32.unpack_from(mv, pos)[0] != MAGIC:
            raise BadMagic(
                "bad frame magic: the peer does not speak this protocol or is out of sync"
            )
        return None
    (
        magic,
        version,
        op,
        flags,
        tid,
        status,
        pool,
        nlen,
        reserved,
        offset,
        length,
        plen,
        body_crc,
        header_crc,
    ) = _HDR_FULL.unpack_from(mv, pos)
    if magic != MAGIC:
        raise BadMagic("bad frame magic: the peer does not speak this protocol or is out of sync")
    if _crc32(mv[pos : pos + _HDR_BODY]) != header_crc:
        raise BadHeaderChecksum("frame header checksum mismatch: corrupted in transit")
    if version != VERSION:
        raise UnsupportedVersion(
            f"protocol version {version} is not supported (this side speaks {VERSION})",
            tid=tid,
            op=op,
        )
    if nlen > max_name:
        raise NameTooLong(
            f"object name of {nlen} bytes exceeds the {max_name}-byte limit", tid=tid, op=op
        )
    if plen > max_payload:
        raise FrameTooLarge(
            f"payload of {plen} bytes exceeds the {max_payload}-byte limit", tid=tid, op=op
        )
    body = pos + HEADER_SIZE
    stop = body + nlen + plen
    if stop > end:
        return None
    err: FrameError | None = None
    if _crc32(mv[body:stop]) != body_crc:
        err = BadChecksum("frame body checksum mismatch: corrupted in transit", tid=tid, op=op)
    elif op not in _OPS and not flags & FLAG_REPLY:  # an error reply echoes the unknown op
        err = UnknownOp(f"unknown op code {op}", tid=tid, op=op)
    elif flags & ~_KNOWN_FLAGS or reserved:
        err = MalformedFrame(
            f"unknown flags {flags:#x} or reserved field {reserved:#x} set", tid=tid, op=op
        )
    if err is not None:
        err._end = stop
        raise err
    name = bytes(mv[body : body + nlen]) if nlen else b""
    payload = bytes(mv[body + nlen : stop]) if plen else b""
    return _new_frame(Frame, (op, flags, tid, status, pool, offset, length, name, payload)), stop


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    max_name: int = MAX_NAME,
    max_payload: int = MAX_PAYLOAD,
) -> tuple[Frame, int]:
    """Decode the frame at the start of data; return (frame, bytes consumed).

    Raises Truncated if data holds only part of a frame, or another FrameError.
    """
    with memoryview(data) as mv:
        view = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        got = _parse_one(view, 0, len(view), max_name, max_payload)
    if got is None:
        raise Truncated(f"{len(data)} bytes hold only part of a frame")
    return got


class FrameDecoder:
    """Incremental decoder for a byte stream (an asyncio Protocol's ``data_received``).

    ``feed(data)`` returns every frame completed by data and keeps the rest
    buffered; it holds at most one partial frame, whose declared size is
    checked against the limits before the decoder waits for it.

    On a bad frame ``feed`` raises a ``FrameError`` carrying the frames decoded
    before it (``exc.frames``). If ``exc.fatal`` is False the bad frame has
    been skipped and decoding continues with ``feed(b"")``; if True the decoder
    is poisoned and every later ``feed`` raises the same error::

        try:
            frames = dec.feed(data)
        except FrameError as exc:
            handle(exc.frames); reply_error(exc)
            if exc.fatal: close() else: keep calling dec.feed(b"")
    """

    __slots__ = ("_buf", "_error", "max_name", "max_payload")

    def __init__(self, *, max_name: int = MAX_NAME, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None
        self.max_name = max_name
        self.max_payload = max_payload

    @property
    def buffered(self) -> int:
        """Bytes held of a partial frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add data from the stream; return the frames it completes, in order."""
        if self._error is not None:
            self._error.frames = []  # its frames were handed out when it was first raised
            raise self._error
        buf = self._buf
        # Parse straight from data when nothing is pending (the common case:
        # whole frames per read), else append to the partial frame first.
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data
        frames: list[Frame] = []
        pos = 0
        max_name = self.max_name
        max_payload = self.max_payload
        with memoryview(src) as mv:
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            end = len(mv)
            try:
                while pos < end:
                    if _parse_valid is not None:  # the C codec: every valid frame, at once
                        valid, pos = _parse_valid(mv, pos, max_name, max_payload)
                        if valid:
                            frames += valid
                        if pos >= end:
                            break
                    # (the C codec stopped here: incomplete, or a bad frame to raise for)
                    got = _parse_one(mv, pos, end, max_name, max_payload)
                    if got is None:
                        break
                    frames.append(got[0])
                    pos = got[1]
            except FrameError as exc:
                exc.frames = frames
                if exc.fatal:
                    self._error = exc
                    pos = end
                else:
                    pos = exc._end if exc._end is not None else end
                if src is not buf and pos < end:
                    buf += mv[pos:]
                    pos = end
                err: FrameError | None = exc
            else:
                err = None
                if src is not buf and pos < end:
                    buf += mv[pos:]
        if src is buf:
            del buf[:pos]
        if err is not None:
            if err.fatal:
                buf.clear()
            raise err
        return frames

    def eof(self) -> None:
        """The stream ended: raise Truncated if a partial frame is buffered."""
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            raise Truncated(f"connection closed inside a frame ({n} bytes of it received)")


# The C codec (shardio/osd/_codec.c) runs the decoder's loop over valid frames and
# encodes replies; everything else, and every error, stays here. Without it (not
# built), the Python code above does all of it.
try:
    from . import _codec
except ImportError:  # pragma: no cover - the extension is part of the build
    _codec = None  # type: ignore[assignment]
    _parse_valid = None
else:
    _codec.setup(Frame, _OPS, MAGIC, VERSION, MAX_PAYLOAD, FrameTooLarge)
    _parse_valid = _codec.parse
    encode_reply_parts = _codec.reply_parts  # noqa: F811


# ---------------------------------------------------------------------------
# payload structures
# ---------------------------------------------------------------------------

_STAT = struct.Struct("<QQ")
_U16 = struct.Struct("<H")


def pack_stat(size: int, version: int) -> bytes:
    """STAT reply payload: object size and version (sequence number of its last change)."""
    return _STAT.pack(size, version)


def unpack_stat(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Parse a STAT reply payload into (size, version)."""
    if len(payload) != _STAT.size:
        raise MalformedPayload(f"STAT payload is {len(payload)} bytes, expected {_STAT.size}")
    return _STAT.unpack(payload)


def pack_names(names: Iterable[bytes | str]) -> bytes:
    """LIST reply payload: each name as u16 length + bytes."""
    parts: list[bytes] = []
    for n in names:
        b = _as_bytes(n)
        if len(b) > MAX_NAME:
            raise NameTooLong(f"object name of {len(b)} bytes exceeds the {MAX_NAME}-byte limit")
        parts.append(_U16.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def unpack_names(payload: bytes | bytearray | memoryview) -> list[bytes]:
    """Parse a LIST reply payload; raises MalformedPayload on a cut or oversized entry."""
    mv = memoryview(payload).cast("B") if not isinstance(payload, bytes) else memoryview(payload)
    names: list[bytes] = []
    pos = 0
    end = len(mv)
    while pos < end:
        if end - pos < 2:
            raise MalformedPayload("LIST payload ends inside a name length")
        (n,) = _U16.unpack_from(mv, pos)
        pos += 2
        if n > MAX_NAME or pos + n > end:
            raise MalformedPayload(f"LIST payload entry of {n} bytes overruns the payload")
        names.append(bytes(mv[pos : pos + n]))
        pos += n
    return names
