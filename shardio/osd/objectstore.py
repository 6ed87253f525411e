"""A log-structured object store written as plain blocking code against an Env.

Every I/O call and every lock goes through an ``Env`` (``shardio.tame.env``),
so the same code runs on a shard's tame stacks (``TameEnv``: reads through
preadv2/io_uring, locks that yield to the reactor) and on ordinary threads
(``PosixEnv``). The store never calls ``os``/``open``/``threading`` itself.

On-disk layout
--------------

A store is a directory of append-only segment files ``seg-00000001.log``,
``seg-00000002.log``, ... Only the last one (the *active* segment) is written;
it is fsynced before the next one is created, so every earlier (*sealed*)
segment is complete on disk. A segment is a sequence of records::

    fixed header, 28 bytes, little-endian:
        magic u32 ("SXT1") | kind u8 | flags u8 (0) | name_len u16 | seq u64
        | offset u64 | length u32
    name                          name_len bytes
    block crc table               u32 per 4 KiB block of data: ceil(length / 4096) entries
    header_crc                    u32: CRC-32 of everything above
    data                          length bytes

``kind`` is PUT (the object becomes exactly ``data``), WRITE (``data`` is
written at ``offset``, extending the object) or DELETE (a tombstone). ``seq``
is a store-wide sequence number, increasing in log order; an object's version
is the seq of its last change. ``header_crc`` (CRC-32, zlib) covers the fixed
header, the name and the block crc table; each block crc covers 4 KiB of
data. A record's header and data are contiguous, so reading a small object
is one ``pread`` of the whole record, checked end to end.

Index and recovery
------------------

The index (object name -> size, version and the extents that hold its bytes)
lives in memory and is rebuilt on open by scanning the segments in order.
The active segment is checked record by record, data included: the first
record that is cut short or fails a checksum marks a *torn tail* left by a
crash, and the segment is truncated there (logged, counted in
``stats.torn_bytes``). Nothing past that point was acknowledged (see
durability), so nothing acknowledged is lost -- but a bit flip inside the
active segment cannot be told from a torn write and loses the records after
it, as RocksDB's point-in-time recovery does. In sealed segments the headers
are checked at open (a bad one raises ``StoreCorrupted``: a sealed segment
cannot be torn) and the data on every read.

Reads
-----

Every read verifies the header crc, the record's identity (name, seq, offset,
length: a misdirected read is caught too) and the crc of every 4 KiB block it
returns. A mismatch raises ``CorruptExtent`` (``errno`` EIO); corrupt bytes are
never returned. A missing object raises ``ObjectNotFound`` (ENOENT). A read
that starts at or past the end of the object returns ``b""``, one that runs
past the end returns the bytes up to the end (a short read, as ``pread``).
Bytes never written inside an object (holes left by a WRITE past its end)
read as zeros. Reads take no lock: the index entry of an object is an
immutable value, replaced whole by writers.

Durability (fsync policy)
-------------------------

With ``sync=True`` (the default) a write, put or delete returns only after
its record is written *and* fsynced (``fdatasync``: it also persists the file
size, which is all the metadata a read needs; new segment files are made
durable with an fsync of the directory): an acknowledged change survives a
crash or power loss. Concurrent writers are group-committed: records are appended
under the store lock (one ``pwrite`` each), and one writer at a time runs the
fsync outside the lock, covering every record appended before it started;
the others wait on a condition and are acknowledged together. A change
becomes visible to readers when it is durable, in log order. If fsync fails
the store turns read-only (``StoreFailed``): after a failed fsync the kernel
may have dropped the dirty pages, so nothing after it can be promised. A
change that raised StoreFailed was not acknowledged; its record may or may
not be found after a restart (the outcome of a failed write is unknown).

With ``sync=False`` a change is visible and acknowledged once written to the
page cache; it survives a crash of the process but not of the machine, until
``sync()`` or ``close()``. Useful for bulk loads.

Not done (yet): space reclamation. Overwritten and deleted data stays in the
log (``stats.log_bytes`` vs ``stats.live_bytes``); a compactor would copy live
extents of old segments forward and drop the segments.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from shardio.errors import ShardioError
from shardio.tame import Env, EnvFile

__all__ = [
    "BLOCK_SIZE",
    "MAX_EXTENT",
    "MAX_NAME",
    "CorruptExtent",
    "InvalidArgument",
    "NameTooLong",
    "ObjectNotFound",
    "ObjectStat",
    "ObjectStore",
    "ObjectTooLarge",
    "StoreClosed",
    "StoreCorrupted",
    "StoreError",
    "StoreFailed",
    "StoreStats",
]

log = logging.getLogger("shardio.osd.objectstore")

BLOCK_SIZE = 4096  #: data bytes covered by one crc
MAX_NAME = 4096  #: object name limit in bytes (the protocol's)
MAX_EXTENT = 64 * 1024 * 1024  #: the largest single write (the protocol's payload limit)

_MAGIC = 0x31545853  # b"SXT1" little-endian
_FIXED = struct.Struct("<IBBHQQI")  # magic, kind, flags, name_len, seq, offset, length
_U32 = struct.Struct("<I")
FIXED_SIZE = _FIXED.size  # 28

KIND_PUT = 1
KIND_WRITE = 2
KIND_DELETE = 3
_KINDS = (KIND_PUT, KIND_WRITE, KIND_DELETE)

_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".log"
_SCAN_CHUNK = 1 << 20
_WHOLE_RECORD_READ = 256 * 1024  # read whole records up to this size in one pread

_crc32 = zlib.crc32


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class StoreError(ShardioError):
    """Base of object store errors; ``errno`` is the status a reply should carry."""

    errno: int = errno.EIO


class ObjectNotFound(StoreError, KeyError):
    """The object does not exist (ENOENT)."""

    errno = errno.ENOENT

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class InvalidArgument(StoreError, ValueError):
    """A bad name, offset or length (EINVAL)."""

    errno = errno.EINVAL


class NameTooLong(InvalidArgument):
    """An object name over MAX_NAME bytes (ENAMETOOLONG)."""

    errno = errno.ENAMETOOLONG


class ObjectTooLarge(StoreError):
    """A write that would make an object larger than the store allows (EFBIG)."""

    errno = errno.EFBIG


class CorruptExtent(StoreError):
    """Stored bytes failed their checksum or identity check on read (EIO)."""

    errno = errno.EIO


class StoreCorrupted(StoreError):
    """The store cannot be opened: a sealed segment is damaged (EIO)."""

    errno = errno.EIO


class StoreFailed(StoreError):
    """An fsync or write failed earlier: the store is read-only now (EIO)."""

    errno = errno.EIO


class StoreClosed(StoreError):
    """The store was closed (ESHUTDOWN)."""

    errno = errno.ESHUTDOWN


# ---------------------------------------------------------------------------
# index values
# ---------------------------------------------------------------------------


class _Segment:
    """One segment file, kept open for reads for the store's lifetime."""

    __slots__ = ("f", "id", "path")

    def __init__(self, seg_id: int, path: str, f: EnvFile) -> None:
        self.id = seg_id
        self.path = path
        self.f = f

    def __repr__(self) -> str:
        return f"<segment {self.id} {self.path!r}>"


class _Rec(NamedTuple):
    """Where a record lives and what it says (enough to read and check it)."""

    seg: _Segment
    off: int  # file offset of the record
    hdr_len: int  # fixed header + name + crc table + header crc
    lofs: int  # object offset of the first data byte
    length: int  # data bytes
    seq: int
    kind: int
    hcrc: int  # the header crc written: reads compare the header on disk with it


class _Ext(NamedTuple):
    """Object bytes [lo, hi) are in record ``rec`` at data offset lo - rec.lofs."""

    lo: int
    hi: int
    rec: _Rec


class _Obj(NamedTuple):
    """An object's index entry (immutable; writers replace it whole)."""

    size: int
    version: int
    exts: tuple[_Ext, ...]  # sorted by lo, non-overlapping
    whole: _Rec | None  # the record holding exactly all of it, if small: the fast read path


class ObjectStat(NamedTuple):
    """STAT of an object: size in bytes, version (the seq of its last change)."""

    size: int
    version: int


@dataclass
class StoreStats:
    """Counters of one store (plain ints, read by the metrics layer).

    Write counters change under the store lock; read counters are bumped
    without it, so under concurrent OS threads they may undercount slightly.
    """

    objects: int = 0
    live_bytes: int = 0  #: sum of object sizes
    log_bytes: int = 0  #: bytes in all segments
    segments: int = 0
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0  #: put + write + delete records appended
    write_bytes: int = 0
    fsyncs: int = 0
    commit_batches: int = 0  #: group commits (one fsync acknowledging >= 1 writes)
    corrupt_reads: int = 0
    torn_bytes: int = 0  #: bytes cut from the active segment at open
    records_replayed: int = 0


class _Pending:
    """A change appended but not yet durable (sync=True): applied in log order."""

    __slots__ = ("key", "obj", "rec")

    def __init__(self, key: bytes, rec: _Rec, obj: _Obj | None) -> None:
        self.key = key
        self.rec = rec
        self.obj = obj  # the object after this change; None: deleted


def _whole(rec: _Rec) -> _Rec | None:
    """rec, if one pread of it serves a read of the whole object it alone makes up."""
    if rec.lofs == 0 and rec.length > 0 and rec.hdr_len + rec.length <= _WHOLE_RECORD_READ:
        return rec
    return None


def _apply(old: _Obj | None, rec: _Rec) -> _Obj | None:
    """The object after record ``rec`` (None: deleted)."""
    if rec.kind == KIND_PUT:
        exts = (_Ext(0, rec.length, rec),) if rec.length else ()
        return _Obj(rec.length, rec.seq, exts, _whole(rec))
    if rec.kind == KIND_DELETE:
        return None
    lo = rec.lofs
    hi = lo + rec.length
    if old is None:
        exts = (_Ext(lo, hi, rec),) if hi > lo else ()
        return _Obj(hi, rec.seq, exts, _whole(rec))
    if hi == lo:
        return _Obj(old.size, rec.seq, old.exts, old.whole)
    out: list[_Ext] = []
    for e in old.exts:
        if e.hi <= lo or e.lo >= hi:
            out.append(e)
            continue
        if e.lo < lo:
            out.append(_Ext(e.lo, lo, e.rec))
        if e.hi > hi:
            out.append(_Ext(hi, e.hi, e.rec))
    out.append(_Ext(lo, hi, rec))
    out.sort(key=lambda e: e.lo)
    size = max(old.size, hi)
    whole = _whole(rec) if len(out) == 1 and rec.length == size else None
    return _Obj(size, rec.seq, tuple(out), whole)


def _block_crcs(data: bytes | bytearray | memoryview) -> bytes:
    """The crc table of data: one u32 per BLOCK_SIZE bytes."""
    n = len(data)
    if n <= BLOCK_SIZE:
        return _U32.pack(_crc32(data)) if n else b""
    mv = memoryview(data).cast("B")
    crcs = [_crc32(mv[i : i + BLOCK_SIZE]) for i in range(0, n, BLOCK_SIZE)]
    return struct.pack(f"<{len(crcs)}I", *crcs)


def _key(name: str | bytes) -> bytes:
    if isinstance(name, str):
        key = name.encode()
    elif isinstance(name, bytes):
        key = name
    else:
        key = bytes(name)
    if not key:
        raise InvalidArgument("object name is empty")
    if len(key) > MAX_NAME:
        raise NameTooLong(f"object name of {len(key)} bytes exceeds the {MAX_NAME}-byte limit")
    return key


def _seg_name(seg_id: int) -> str:
    return f"{_SEG_PREFIX}{seg_id:08d}{_SEG_SUFFIX}"


class _Torn(Exception):
    """Internal: the record at this position is cut short or fails its checks."""


# ---------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------


class ObjectStore:
    """A log-structured object store in a directory; see the module docstring.

    ``pg_of`` maps an object name (bytes) to its placement group, enabling
    ``list(pg)``; without it ``list()`` lists every object. Opening scans the
    segments and rebuilds the index (blocking, through ``env``).

    ``env`` defaults to ``tame.env()``. With a TameEnv the store belongs to
    that reactor: call it from tame stacks (``await tame.call(store.read,
    name)``); its locks refuse other threads with WrongThreadError. One
    process at a time may open a directory (not enforced: the Env has no
    file locks yet).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        env: Env | None = None,
        *,
        pg_of: Callable[[bytes], int] | None = None,
        sync: bool = True,
        segment_size: int = 256 * 1024 * 1024,
        max_object_size: int = 1 << 30,
        max_read: int = MAX_EXTENT,
    ) -> None:
        if env is None:
            from shardio import tame

            env = tame.env()
        self.env = env
        self.path = os.fspath(path)
        self._sync = sync
        self.segment_size = segment_size
        self.max_object_size = max_object_size
        self.max_read = max_read
        self.stats = StoreStats()
        self._pg_of = pg_of
        self._pgs: dict[int, set[bytes]] = {}
        self._objects: dict[bytes, _Obj] = {}
        self._segments: list[_Segment] = []
        self._lock = env.Lock()
        self._cond = env.Condition(self._lock)
        self._closed = False
        self._failed: BaseException | None = None
        # append state (under _lock)
        self._active: _Segment | None = None
        self._tail = 0  # append offset in the active segment
        self._next_seq = 1
        # group commit state (under _lock), sync=True only
        self._pending: list[_Pending] = []
        self._staged: dict[bytes, _Pending] = {}  # newest not-yet-durable change per key
        self._appended = 0  # seq of the last record appended
        self._durable = 0  # seq of the last record made durable
        self._syncing = False
        self._open()

    # -- opening and recovery ---------------------------------------------------

    def _open(self) -> None:
        env = self.env
        if not env.isdir(self.path):
            env.makedirs(self.path, exist_ok=True)
            env.fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        ids = sorted(
            int(n[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)])
            for n in env.listdir(self.path)
            if n.startswith(_SEG_PREFIX)
            and n.endswith(_SEG_SUFFIX)
            and n[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)].isdigit()
        )
        try:
            last_seq = 0
            for i, seg_id in enumerate(ids):
                active = i == len(ids) - 1
                p = os.path.join(self.path, _seg_name(seg_id))
                seg = _Segment(seg_id, p, env.open(p, "r+b" if active else "rb"))
                self._segments.append(seg)
                last_seq = self._scan(seg, active, last_seq)
            if not self._segments:
                self._new_segment(1)
            else:
                self._active = self._segments[-1]
                self._tail = self._active.f.size()
            self._next_seq = last_seq + 1
            self._appended = self._durable = last_seq
        except BaseException:
            for seg in self._segments:
                seg.f.close()
            raise
        st = self.stats
        st.segments = len(self._segments)
        st.log_bytes = sum(s.f.size() for s in self._segments)
        st.objects = len(self._objects)
        st.live_bytes = sum(o.size for o in self._objects.values())

    def _new_segment(self, seg_id: int) -> None:
        p = os.path.join(self.path, _seg_name(seg_id))
        seg = _Segment(seg_id, p, self.env.open(p, "x+b"))
        self.env.fsync_dir(self.path)
        self._segments.append(seg)
        self._active = seg
        self._tail = 0
        self.stats.segments = len(self._segments)

    def _scan(self, seg: _Segment, active: bool, last_seq: int) -> int:
        """Replay one segment into the index; return the last seq seen."""
        f = seg.f
        size = f.size()
        buf = b""
        buf_off = 0

        def get(off: int, n: int) -> bytes | None:
            # n bytes at off, from a window read in large chunks; None past EOF
            nonlocal buf, buf_off
            if off + n > size:
                return None
            if off < buf_off or off + n > buf_off + len(buf):
                buf = f.pread(max(n, _SCAN_CHUNK), off)
                buf_off = off
                if len(buf) < n:
                    return None
            start = off - buf_off
            return buf[start : start + n]

        pos = 0
        while pos < size:
            try:
                (hdr_len, lofs, length, seq, kind, hcrc), name = self._parse_record(
                    get, pos, size, verify_data=active
                )
            except _Torn as why:
                if not active:
                    raise StoreCorrupted(
                        f"sealed segment {seg.path!r} is damaged at offset {pos}: {why}; "
                        "it cannot be a torn write (sealed segments are fsynced before the "
                        "next is created): restore this store from a replica"
                    ) from None
                log.warning(
                    "object store %s: torn tail in %s at offset %d (%s): cutting %d bytes",
                    self.path,
                    seg.path,
                    pos,
                    why,
                    size - pos,
                )
                self.stats.torn_bytes += size - pos
                f.truncate(pos)
                f.fsync()
                break
            if seq <= last_seq:
                raise StoreCorrupted(
                    f"segment {seg.path!r} offset {pos}: sequence {seq} does not follow "
                    f"{last_seq}; the log is out of order"
                )
            last_seq = seq
            rec = _Rec(seg, pos, hdr_len, lofs, length, seq, kind, hcrc)
            self._install(name, _apply(self._objects.get(name), rec))
            self.stats.records_replayed += 1
            pos += hdr_len + length
        return last_seq

    @staticmethod
    def _parse_record(
        get: Callable[[int, int], bytes | None], pos: int, size: int, verify_data: bool
    ) -> tuple[tuple[int, int, int, int, int, int], bytes]:
        """Check the record at pos; return ((hdr_len, lofs, length, seq, kind, hcrc), name).

        Raises _Torn if it is cut short or fails a check. Data crcs are
        checked only with verify_data (the active segment).
        """
        fixed = get(pos, FIXED_SIZE)
        if fixed is None:
            raise _Torn("record header cut short")
        magic, kind, flags, nlen, seq, lofs, length = _FIXED.unpack_from(fixed, 0)
        if magic != _MAGIC:
            raise _Torn("no record magic")
        if nlen == 0 or nlen > MAX_NAME or length > MAX_EXTENT:
            raise _Torn(f"impossible lengths (name {nlen}, data {length})")
        nblocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
        hdr_len = FIXED_SIZE + nlen + 4 * nblocks + 4
        hdr = get(pos, hdr_len)
        if hdr is None:
            raise _Torn("record header cut short")
        hcrc = _crc32(hdr[: hdr_len - 4])
        if hcrc != _U32.unpack_from(hdr, hdr_len - 4)[0]:
            raise _Torn("record header checksum mismatch")
        if kind not in _KINDS or flags:
            raise _Torn(f"unknown record kind {kind} / flags {flags}")
        if kind == KIND_DELETE and length:
            raise _Torn("tombstone with data")
        if pos + hdr_len + length > size:
            raise _Torn("record data cut short")
        if verify_data and length:
            data = get(pos + hdr_len, length)
            if data is None:
                raise _Torn("record data cut short")
            if _block_crcs(data) != hdr[FIXED_SIZE + nlen : hdr_len - 4]:
                raise _Torn("record data checksum mismatch")
        return (hdr_len, lofs, length, seq, kind, hcrc), bytes(hdr[FIXED_SIZE : FIXED_SIZE + nlen])

    # -- index maintenance (under _lock, or single-threaded at open) -----------

    def _install(self, key: bytes, obj: _Obj | None) -> None:
        old = self._objects.get(key)
        st = self.stats
        if obj is None:
            if old is not None:
                del self._objects[key]
                st.objects -= 1
                st.live_bytes -= old.size
                if self._pg_of is not None:
                    pg = self._pg_of(key)
                    names = self._pgs.get(pg)
                    if names is not None:
                        names.discard(key)
                        if not names:
                            del self._pgs[pg]
            return
        self._objects[key] = obj
        if old is None:
            st.objects += 1
            st.live_bytes += obj.size
            if self._pg_of is not None:
                self._pgs.setdefault(self._pg_of(key), set()).add(key)
        else:
            st.live_bytes += obj.size - old.size

    # -- reads ---------------------------------------------------------------

    def _lookup(self, name: str | bytes) -> tuple[bytes, _Obj]:
        if self._closed:
            raise StoreClosed(f"object store {self.path!r} is closed")
        key = _key(name)
        obj = self._objects.get(key)
        if obj is None:
            raise ObjectNotFound(f"object {key!r} does not exist")
        return key, obj

    def read(self, name: str | bytes, offset: int = 0, length: int = -1) -> bytes:
        """Bytes [offset, offset + length) of an object (length -1: to its end).

        Short at the end of the object; ``b""`` at or past it. Raises
        ObjectNotFound, CorruptExtent (never returns bad bytes), InvalidArgument.
        """
        # fast path: a bytes name in the index, the whole of a small object
        obj = self._objects.get(name) if type(name) is bytes else None
        if obj is not None and offset == 0 and not self._closed:
            rec = obj.whole
            if (
                rec is not None
                and (length < 0 or length >= obj.size)
                and rec.length <= self.max_read
            ):
                st = self.stats
                st.reads += 1
                st.read_bytes += rec.length
                return self._read_rec(name, rec, 0, rec.length)
        if obj is None or self._closed:
            key, obj = self._lookup(name)
        else:
            key = name
        if offset < 0:
            raise InvalidArgument(f"negative read offset {offset}")
        size = obj.size
        end = size if length < 0 or offset + length > size else offset + length
        if end <= offset:
            return b""
        if end - offset > self.max_read:
            raise InvalidArgument(
                f"read of {end - offset} bytes exceeds the {self.max_read}-byte limit; "
                "read the object in pieces"
            )
        st = self.stats
        st.reads += 1
        st.read_bytes += end - offset
        exts = obj.exts
        if len(exts) == 1:
            e = exts[0]
            if e.lo <= offset and end <= e.hi:
                # the common case: one extent holds the whole range
                rec = e.rec
                return self._read_rec(key, rec, offset - rec.lofs, end - rec.lofs)
        out = bytearray(end - offset)  # holes read as zeros
        for e in exts:
            lo = max(e.lo, offset)
            hi = min(e.hi, end)
            if lo >= hi:
                continue
            rec = e.rec
            out[lo - offset : hi - offset] = self._read_rec(key, rec, lo - rec.lofs, hi - rec.lofs)
        return bytes(out)

    def _read_rec(self, key: bytes, rec: _Rec, a: int, b: int) -> bytes:
        """Data bytes [a, b) of a record, after checking its header and the blocks read.

        The header on disk must hash to the crc recorded in the index when the
        record was written or scanned: that checks its integrity and its
        identity (name, seq, offsets) in one crc32 call.
        """
        hdr_len = rec.hdr_len
        length = rec.length
        total = hdr_len + length
        try:
            if total <= _WHOLE_RECORD_READ:
                buf = rec.seg.f.pread(total, rec.off)  # header + data in one call
                mv = memoryview(buf)
                if len(buf) != total or _crc32(mv[: hdr_len - 4]) != rec.hcrc:
                    self._bad_header(key, rec, buf)
                if length <= BLOCK_SIZE:
                    if _crc32(mv[hdr_len:]) != _U32.unpack_from(buf, hdr_len - 8)[0]:
                        self._corrupt(key, rec, "data checksum mismatch in block 0")
                else:
                    self._check_blocks(key, rec, buf, mv, hdr_len, a, b)
                return buf[hdr_len + a : hdr_len + b]
            # a large record: its header, then only the blocks asked for
            f = rec.seg.f
            hdr = f.pread(hdr_len, rec.off)
            if len(hdr) != hdr_len or _crc32(memoryview(hdr)[: hdr_len - 4]) != rec.hcrc:
                self._bad_header(key, rec, hdr)
            dstart = a // BLOCK_SIZE * BLOCK_SIZE
            dend = min((b + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE, length)
            data = f.pread(dend - dstart, rec.off + hdr_len + dstart)
            if len(data) != dend - dstart:
                self._corrupt(key, rec, "record data cut short")
            self._check_blocks(key, rec, hdr, memoryview(data), -dstart, a, b)
            return data[a - dstart : b - dstart]
        except StoreError:
            raise
        except (OSError, ValueError) as exc:
            if self._closed:
                raise StoreClosed(f"object store {self.path!r} was closed during a read") from exc
            raise

    def _check_blocks(
        self, key: bytes, rec: _Rec, hdr: bytes, data: memoryview, base: int, a: int, b: int
    ) -> None:
        """Check the crcs of the blocks holding data bytes [a, b).

        Block i of the record starts at ``data[base + i * BLOCK_SIZE]``.
        """
        table = FIXED_SIZE + len(key)
        length = rec.length
        for i in range(a // BLOCK_SIZE, (b + BLOCK_SIZE - 1) // BLOCK_SIZE):
            lo = i * BLOCK_SIZE
            hi = min(lo + BLOCK_SIZE, length)
            if _crc32(data[base + lo : base + hi]) != _U32.unpack_from(hdr, table + 4 * i)[0]:
                self._corrupt(key, rec, f"data checksum mismatch in block {i}")

    def _bad_header(self, key: bytes, rec: _Rec, buf: bytes) -> NoReturn:
        """Say what is wrong with a record header that does not match the index; raise."""
        hdr_len = rec.hdr_len
        if len(buf) < hdr_len:
            self._corrupt(key, rec, f"record cut short ({len(buf)} bytes)")
        magic, _, _, nlen, seq, lofs, length = _FIXED.unpack_from(buf, 0)
        if magic != _MAGIC:
            self._corrupt(key, rec, "no record magic")
        if _crc32(buf[: hdr_len - 4]) != _U32.unpack_from(buf, hdr_len - 4)[0]:
            self._corrupt(key, rec, "header checksum mismatch")
        if len(buf) < hdr_len + rec.length and len(buf) != hdr_len:
            self._corrupt(key, rec, f"record cut short ({len(buf)} bytes)")
        found = bytes(buf[FIXED_SIZE : FIXED_SIZE + nlen])
        self._corrupt(
            key,
            rec,
            f"record identity mismatch (found {found!r} seq {seq} offset {lofs} length {length})",
        )

    def _corrupt(self, key: bytes, rec: _Rec, why: str) -> NoReturn:
        self.stats.corrupt_reads += 1
        log.error(
            "object store %s: object %r: %s in %s at offset %d",
            self.path,
            key,
            why,
            rec.seg.path,
            rec.off,
        )
        raise CorruptExtent(
            f"object {key!r}: {why} in {rec.seg.path} at offset {rec.off} (seq {rec.seq})"
        )

    def stat(self, name: str | bytes) -> ObjectStat:
        """Size and version of an object; ObjectNotFound if it does not exist."""
        obj = self._lookup(name)[1]
        return ObjectStat(obj.size, obj.version)

    def exists(self, name: str | bytes) -> bool:
        """True if the object exists."""
        return _key(name) in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def list(
        self,
        pg: int | None = None,
        *,
        start_after: str | bytes | None = None,
        limit: int | None = None,
    ) -> list[bytes]:
        """Names of the objects in placement group ``pg`` (all objects if None), sorted.

        ``start_after`` and ``limit`` page through a large pg: ask for
        ``limit + 1`` names to learn whether more follow.
        """
        if self._closed:
            raise StoreClosed(f"object store {self.path!r} is closed")
        if pg is None:
            names = list(self._objects)
        else:
            if self._pg_of is None:
                raise InvalidArgument(
                    "this store was opened without pg_of: list(pg) is unavailable"
                )
            names = list(self._pgs.get(pg, ()))
        if start_after is not None:
            marker = start_after.encode() if isinstance(start_after, str) else start_after
            names = [n for n in names if n > marker]
        names.sort()
        if limit is not None:
            if limit < 0:
                raise InvalidArgument(f"negative list limit {limit}")
            del names[limit:]
        return names

    # -- writes ----------------------------------------------------------------

    def put(self, name: str | bytes, data: bytes | bytearray | memoryview) -> ObjectStat:
        """Replace the object with ``data`` (creating it); return its new stat."""
        key = _key(name)
        if not isinstance(data, bytes | bytearray):
            data = memoryview(data).cast("B")
        n = len(data)
        if n > MAX_EXTENT or n > self.max_object_size:
            raise ObjectTooLarge(
                f"put of {n} bytes exceeds the limit ({min(MAX_EXTENT, self.max_object_size)})"
            )
        return self._commit(key, KIND_PUT, 0, data)

    def write(
        self, name: str | bytes, data: bytes | bytearray | memoryview, offset: int = 0
    ) -> ObjectStat:
        """Write ``data`` at ``offset`` (creating or extending the object); return its stat."""
        key = _key(name)
        if not isinstance(data, bytes | bytearray):
            data = memoryview(data).cast("B")
        n = len(data)
        if offset < 0:
            raise InvalidArgument(f"negative write offset {offset}")
        if n > MAX_EXTENT:
            raise ObjectTooLarge(f"write of {n} bytes exceeds the {MAX_EXTENT}-byte limit")
        if offset + n > self.max_object_size:
            raise ObjectTooLarge(
                f"write to {offset + n} bytes exceeds the object size limit "
                f"({self.max_object_size})"
            )
        return self._commit(key, KIND_WRITE, offset, data)

    def delete(self, name: str | bytes) -> int:
        """Delete the object (a tombstone record); return the delete's seq.

        ObjectNotFound if it does not exist.
        """
        return self._commit(_key(name), KIND_DELETE, 0, b"").version

    def _commit(
        self, key: bytes, kind: int, offset: int, data: bytes | bytearray | memoryview
    ) -> ObjectStat:
        """Append one record, make it durable per the sync policy, apply it to the index."""
        length = len(data)
        crcs = _block_crcs(data)  # outside the lock: the costly part for big writes
        hdr_len = FIXED_SIZE + len(key) + len(crcs) + 4
        with self._lock:
            self._check_writable()
            if self._tail + hdr_len + length > self.segment_size and self._tail > 0:
                self._roll()  # may wait (releasing the lock): read the state after it
            staged = self._staged.get(key)
            old = staged.obj if staged is not None else self._objects.get(key)
            if kind == KIND_DELETE and old is None:
                raise ObjectNotFound(f"object {key!r} does not exist")
            seg = self._active
            assert seg is not None
            seq = self._next_seq
            head = _FIXED.pack(_MAGIC, kind, 0, len(key), seq, offset, length) + key + crcs
            hcrc = _crc32(head)
            head += _U32.pack(hcrc)
            try:
                if length <= 65536:
                    seg.f.pwrite(head + data if length else head, self._tail)
                else:
                    seg.f.pwrite(head, self._tail)
                    seg.f.pwrite(data, self._tail + hdr_len)
            except OSError as exc:
                # Nothing was acknowledged; the next record overwrites the partial
                # bytes at the same offset (or recovery cuts them as a torn tail).
                raise StoreError(f"object store {self.path!r}: append failed: {exc}") from exc
            self._next_seq = seq + 1
            self._appended = seq
            rec = _Rec(seg, self._tail, hdr_len, offset, length, seq, kind, hcrc)
            self._tail += hdr_len + length
            st = self.stats
            st.writes += 1
            st.write_bytes += length
            st.log_bytes += hdr_len + length
            obj = _apply(old, rec)
            if not self._sync:
                self._install(key, obj)
            else:
                pend = _Pending(key, rec, obj)
                self._pending.append(pend)
                self._staged[key] = pend
                self._wait_durable(seq)
        if obj is None:
            return ObjectStat(0, seq)
        return ObjectStat(obj.size, obj.version)

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreClosed(f"object store {self.path!r} is closed")
        if self._failed is not None:
            raise StoreFailed(
                f"object store {self.path!r} is read-only after a failed sync: {self._failed}"
            )

    def _wait_durable(self, seq: int) -> None:
        """Group commit (under _lock): return once record ``seq`` is fsynced and applied."""
        while self._durable < seq:
            if self._failed is not None:
                raise StoreFailed(
                    f"object store {self.path!r}: sync failed, write not acknowledged: "
                    f"{self._failed}"
                )
            if self._syncing:
                self._cond.wait()
                continue
            self._sync_locked()

    def _sync_locked(self) -> None:
        """Fsync the active segment outside the lock, then apply what it made durable."""
        self._syncing = True
        target = self._appended
        batch = self._pending
        self._pending = []
        seg = self._active
        assert seg is not None
        self._lock.release()
        err: BaseException | None = None
        try:
            seg.f.fdatasync()
        except BaseException as exc:
            err = exc
        finally:
            self._lock.acquire()
        self._syncing = False
        if err is not None:
            self._failed = err
            self._cond.notify_all()
            log.error("object store %s: fsync failed, now read-only: %s", self.path, err)
            raise StoreFailed(f"object store {self.path!r}: fsync failed: {err}") from err
        self.stats.fsyncs += 1
        self.stats.commit_batches += 1
        self._publish(batch)
        self._durable = max(self._durable, target)
        self._cond.notify_all()

    def _publish(self, batch: list[_Pending]) -> None:
        """Make durable changes visible, in log order (under _lock)."""
        staged = self._staged
        for p in batch:
            self._install(p.key, p.obj)
            if staged.get(p.key) is p:
                del staged[p.key]

    def _roll(self) -> None:
        """Seal the active segment (fsync it) and start the next one (under _lock)."""
        while self._syncing:
            self._cond.wait()
        self._check_writable()
        seg = self._active
        assert seg is not None
        self._flush_locked()
        self._new_segment(seg.id + 1)

    def _flush_locked(self) -> None:
        """Fsync the active segment holding the lock (no syncer running); publish all."""
        seg = self._active
        assert seg is not None and not self._syncing
        try:
            seg.f.fdatasync()
        except BaseException as exc:
            self._failed = exc
            self._cond.notify_all()
            raise StoreFailed(f"object store {self.path!r}: fsync failed: {exc}") from exc
        self.stats.fsyncs += 1
        if self._pending:
            batch, self._pending = self._pending, []
            self.stats.commit_batches += 1
            self._publish(batch)
        self._durable = self._appended
        self._cond.notify_all()

    def sync(self) -> None:
        """Make every change appended so far durable (needed only with sync=False)."""
        with self._lock:
            self._check_writable()
            while self._syncing:
                self._cond.wait()
            self._flush_locked()

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Make everything durable and close the segment files (idempotent)."""
        with self._lock:
            if self._closed:
                return
            try:
                while self._syncing:
                    self._cond.wait()
                if self._failed is None and self._appended > self._durable:
                    self._flush_locked()
            finally:
                self._closed = True
                for seg in self._segments:
                    seg.f.close()
                self._cond.notify_all()

    @property
    def sync_writes(self) -> bool:
        """True if writes are acknowledged only once fsynced (the ``sync`` option)."""
        return self._sync

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<ObjectStore {self.path!r} objects={len(self._objects)} "
            f"segments={len(self._segments)} env={getattr(self.env, 'name', self.env)!r}>"
        )

    # for tests and tools: where an object's bytes are on disk
    def _extents_of(self, name: str | bytes) -> list[tuple[str, int, int, int]]:
        """[(segment path, record offset, header length, data length)] of an object."""
        obj = self._lookup(name)[1]
        return [(e.rec.seg.path, e.rec.off, e.rec.hdr_len, e.rec.length) for e in obj.exts]
