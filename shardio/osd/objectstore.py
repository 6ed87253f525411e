"""A log-structured object store written as plain blocking code against an Env.

Every I/O call and every lock goes through an ``Env`` (``shardio.tame``),
so the same code runs on a shard's tame stacks (``TameEnv``: reads through
preadv2/io_uring, locks that yield to the reactor) and on ordinary threads
(``PosixEnv``). The store never calls ``os``/``open``/``threading`` itself.

On-disk layout
--------------

A store is a directory of append-only segment files ``seg-00000001.log``,
``seg-00000002.log``, ... (ids grow; compaction leaves gaps), a ``FORMAT``
file and a ``LOCK`` file. Only the last segment (the *active* one) is
written; it is fsynced before the next one is created, so every earlier
(*sealed*) segment is complete on disk. A segment is a sequence of records::

    fixed header, 28 bytes, little-endian:
        magic u32 ("SXT1") | kind u8 | flags u8 (0) | name_len u16 | seq u64
        | offset u64 | length u32
    name                          name_len bytes
    block crc table               u32 per 4 KiB block of data: ceil(length / 4096) entries
    header_crc                    u32: CRC-32 of everything above
    data                          length bytes

``kind`` is PUT (the object becomes exactly ``data``), WRITE (``data`` is
written at ``offset``, extending the object), DELETE (a tombstone) or
RELOCATE (format 1: compaction moved the object here whole; it becomes
exactly ``data``, and ``offset`` holds its version, unchanged). ``seq``
is a store-wide sequence number, increasing in log order; an object's version
is the seq of its last change. ``header_crc`` (CRC-32, zlib) covers the fixed
header, the name and the block crc table; each block crc covers 4 KiB of
data. A record's header and data are contiguous, so reading a small object
is one ``pread`` of the whole record, checked end to end.

Format versions. ``FORMAT`` holds ``shardio-objectstore N``. Version 0 is a
directory of segments without that file (the layout before versions);
version 1 adds RELOCATE records. Opening a version 0 store writes ``FORMAT``
(1) first (temporary file, fsync, rename, directory fsync): its records are
valid version 1 records. A version newer than ``FORMAT_VERSION`` is refused
with ``StoreFormatUnsupported`` before anything is touched.

Exclusive open. The store holds an ``flock`` on ``LOCK`` while open
(``shardio.osd.dirlock``): a second opener, in this process or another,
fails at once with ``DirectoryLocked`` naming the directory and the
holder's pid; the kernel drops the lock when its holder dies, ``kill -9``
included, so a crash never blocks a restart.

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

Cancellation. Only I/O errors (exceptions from the Env) turn the store
read-only. A cancelled or interrupted caller (``CancelledError`` on a tame
stack, ``KeyboardInterrupt``, ``GreenletExit``: BaseExceptions that are not
Exceptions) never does: a pwrite or fsync it had started is issued again to
completion first (an io_uring op outlives its cancelled waiter), the store
lock is taken back, and the interrupt is raised once the store's state is
whole. The interrupted change is then either not in the log at all or in it
whole; in the latter case it becomes durable and visible with the next
commit, sync() or close() (at once if the interrupted caller was the one
syncing). Either way it was not acknowledged.

Compaction
----------

``compact()`` reclaims the space of overwritten and deleted objects. It
picks sealed segments of which at least ``min_garbage`` is not live object
data and, for each, moves to the end of the log (a RELOCATE record: same
bytes, same version) every object whose replay needs that segment: one with
bytes there, or whose last PUT is there (dropping it would let older bytes
resurface). A tombstone there is copied forward while older segments exist
(they may hold the deleted object's records). Once that is durable (one
fsync per batch of segments) the segments are deleted. Crash-safe at every
step: until a segment is unlinked its records are still replayed, and the
RELOCATE records that follow them replace the objects whole; a lost unlink
only brings back a segment whose objects are all superseded. It runs on the
caller's stack beside readers and writers (one compaction at a time) and,
on a tame stack, yields to the reactor at every append and at least every
256 KiB copied. Objects over MAX_EXTENT are not moved: a segment holding
their data stays (``stats.compaction_skipped_segments``).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

from shardio.errors import ShardioError
from shardio.osd.dirlock import DirectoryLock, DirectoryLocked
from shardio.tame import Env, EnvFile

__all__ = [
    "BLOCK_SIZE",
    "MAX_EXTENT",
    "MAX_NAME",
    "FORMAT_VERSION",
    "CompactionResult",
    "CorruptExtent",
    "DirectoryLocked",
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
    "StoreFormatUnsupported",
    "StoreReadOnly",
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
KIND_RELOCATE = 4  # format 1: an object moved whole by compaction (offset field = its version)
_KINDS = (KIND_PUT, KIND_WRITE, KIND_DELETE, KIND_RELOCATE)

#: the on-disk format this code writes; it reads FORMAT_VERSION and every older one
FORMAT_VERSION = 1
_FORMAT_FILE = "FORMAT"
_FORMAT_MAGIC = "shardio-objectstore"
_LOCK_FILE = "LOCK"
_INTERRUPT_RETRIES = 100  # an idempotent step re-run after interrupts before giving up
_COMPACT_YIELD_BYTES = 256 * 1024  # compaction yields to the reactor after copying this much
_COMPACT_BATCH = 16  # segments evacuated per fsync of the moved data

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


class StoreReadOnly(StoreError):
    """A write to a store opened with ``read_only=True`` (EROFS)."""

    errno = errno.EROFS


class StoreFormatUnsupported(StoreError):
    """The store was written in a newer on-disk format than this code reads (EPROTONOSUPPORT)."""

    errno = errno.EPROTONOSUPPORT


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
    base: _Rec  # the record it was last made from scratch by (PUT, RELOCATE, creating WRITE)


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
    interrupted_ops: int = 0  #: writes/syncs whose caller was cancelled or interrupted
    format_version: int = FORMAT_VERSION  #: the format found on disk at open (0: unversioned)
    compaction_running: int = 0  #: 1 while a compaction runs
    compaction_runs: int = 0
    compaction_segments_planned: int = 0  #: segments the running (or last) compaction picked
    compaction_segments_done: int = 0  #: of those, segments dropped so far
    compaction_segments_dropped: int = 0  #: in total
    compaction_bytes_reclaimed: int = 0  #: segment bytes removed, in total
    compaction_bytes_copied: int = 0  #: live bytes rewritten, in total
    compaction_objects_moved: int = 0
    compaction_skipped_segments: int = 0  #: left alone (an object too large to move whole)


@dataclass
class CompactionResult:
    """What one ``compact()`` call did."""

    segments_dropped: int = 0
    bytes_reclaimed: int = 0
    bytes_copied: int = 0
    objects_moved: int = 0
    segments_skipped: int = 0


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


def _apply(old: _Obj | None, rec: _Rec, version: int = 0) -> _Obj | None:
    """The object after record ``rec`` (None: deleted); ``version``: a RELOCATE's version."""
    if rec.kind == KIND_PUT or rec.kind == KIND_RELOCATE:
        exts = (_Ext(0, rec.length, rec),) if rec.length else ()
        version = version if rec.kind == KIND_RELOCATE else rec.seq
        return _Obj(rec.length, version, exts, _whole(rec), rec)
    if rec.kind == KIND_DELETE:
        return None
    lo = rec.lofs
    hi = lo + rec.length
    if old is None:
        exts = (_Ext(lo, hi, rec),) if hi > lo else ()
        return _Obj(hi, rec.seq, exts, _whole(rec), rec)
    if hi == lo:
        return _Obj(old.size, rec.seq, old.exts, old.whole, old.base)
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
    return _Obj(size, rec.seq, tuple(out), whole, old.base)


def _needs(obj: _Obj | None, seg: _Segment) -> bool:
    """True if replaying the log without seg would change obj (its bytes or its base are there)."""
    if obj is None:
        return False
    return obj.base.seg is seg or any(e.rec.seg is seg for e in obj.exts)


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


class _Window:
    """Reads a segment in large chunks for scanning: ``get(off, n)`` -> bytes, None past EOF."""

    __slots__ = ("buf", "buf_off", "f", "size")

    def __init__(self, f: EnvFile, size: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.buf_off = 0

    def get(self, off: int, n: int) -> bytes | None:
        if off + n > self.size:
            return None
        buf = self.buf
        if off < self.buf_off or off + n > self.buf_off + len(buf):
            buf = self.buf = self.f.pread(max(n, _SCAN_CHUNK), off)
            self.buf_off = off
            if len(buf) < n:
                return None
        start = off - self.buf_off
        return buf[start : start + n]


_ANY = object()  # _commit's "no expectation" marker


def _is_interrupt(exc: BaseException) -> bool:
    """True for a cancellation or interrupt (CancelledError, GreenletExit, KeyboardInterrupt...).

    Those are BaseExceptions that are not Exceptions: they say nothing about
    the disk, so they never turn the store read-only. Everything else an I/O
    call raises is an I/O failure.
    """
    return not isinstance(exc, Exception)


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
    store at a time may have a directory open for writing (an exclusive
    flock: a second raises ``DirectoryLocked``); with ``read_only=True`` any
    number may open it together (a shared flock, never beside a writer),
    write nothing to it (a torn tail is indexed up to the tear and left),
    and get ``StoreReadOnly`` for every write.
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
        read_only: bool = False,
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
        self._waiters: list[Any] = []  # Events of callers waiting for a sync (under _lock)
        self._compact_lock = env.Lock()
        self._moved = 0  # objects moved by the running compaction's current segment
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
        self.read_only = read_only
        self._open()

    # -- opening and recovery ---------------------------------------------------

    def _open(self) -> None:
        env = self.env
        if not env.isdir(self.path):
            if self.read_only:
                raise StoreError(f"object store {self.path!r} does not exist (opened read-only)")
            env.makedirs(self.path, exist_ok=True)
            env.fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self._dirlock = DirectoryLock(env, self.path, "object store", shared=self.read_only)
        try:
            self._open_locked()
        except BaseException:
            self._dirlock.release()
            raise

    def _open_locked(self) -> None:
        env = self.env
        names = env.listdir(self.path)
        ids = sorted(
            int(n[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)])
            for n in names
            if n.startswith(_SEG_PREFIX)
            and n.endswith(_SEG_SUFFIX)
            and n[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)].isdigit()
        )
        found = self._read_format(_FORMAT_FILE in names, bool(ids))
        if (found is None or found < FORMAT_VERSION) and not self.read_only:
            self._write_format()  # a new store; or format 0, whose records are a subset of 1's
        self.stats.format_version = FORMAT_VERSION if found is None else found
        try:
            last_seq = 0
            for i, seg_id in enumerate(ids):
                active = i == len(ids) - 1
                p = os.path.join(self.path, _seg_name(seg_id))
                writable = active and not self.read_only
                seg = _Segment(seg_id, p, env.open(p, "r+b" if writable else "rb"))
                self._segments.append(seg)
                last_seq = self._scan(seg, active, last_seq)
            if not self._segments:
                if self.read_only:
                    raise StoreError(f"object store {self.path!r} is empty (opened read-only)")
                interrupt = self._new_segment(1)
                if interrupt is not None:
                    raise interrupt
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

    def _read_format(self, present: bool, has_segments: bool) -> int | None:
        """The format version on disk: 0 for segments without a FORMAT file, None for a new store.

        Raises
        StoreFormatUnsupported for a newer version, StoreCorrupted for a bad file.
        """
        path = os.path.join(self.path, _FORMAT_FILE)
        if not present:
            return 0 if has_segments else None
        f = self.env.open(path, "rb")
        try:
            raw = f.read(256)
        finally:
            f.close()
        text = raw.decode("ascii", "replace").strip()
        magic, _, number = text.partition(" ")
        if magic != _FORMAT_MAGIC or not number.isdigit():
            raise StoreCorrupted(
                f"{path} does not name an object store format (found {raw[:64]!r}); "
                f"expected {_FORMAT_MAGIC!r} and a version number"
            )
        version = int(number)
        if version > FORMAT_VERSION:
            raise StoreFormatUnsupported(
                f"object store {self.path!r} has on-disk format version {version}, newer than "
                f"this shardio reads (versions 0 to {FORMAT_VERSION}): open it with the "
                "shardio release that wrote it, or a newer one"
            )
        return version

    def _write_format(self) -> None:
        """Write FORMAT atomically: a temporary file, fsynced, renamed, directory fsynced."""
        env = self.env
        path = os.path.join(self.path, _FORMAT_FILE)
        tmp = path + ".tmp"
        f = env.open(tmp, "wb")
        try:
            f.write(f"{_FORMAT_MAGIC} {FORMAT_VERSION}\n".encode())
            f.fdatasync()
        finally:
            f.close()
        env.rename(tmp, path)
        env.fsync_dir(self.path)

    def _new_segment(self, seg_id: int) -> BaseException | None:
        """Create the next segment and make its name durable; return an interrupt met meanwhile."""
        p = os.path.join(self.path, _seg_name(seg_id))
        f, opened = self._create(p)
        seg = _Segment(seg_id, p, f)
        try:
            interrupt = self._finish(self.env.fsync_dir, self.path) or opened
        except BaseException:
            seg.f.close()
            try:
                self.env.remove(p)
            except OSError:
                pass  # the store turns read-only anyway; recovery takes an empty segment
            raise
        self._segments.append(seg)
        self._active = seg
        self._tail = 0
        self.stats.segments = len(self._segments)
        return interrupt

    def _scan(self, seg: _Segment, active: bool, last_seq: int) -> int:
        """Replay one segment into the index; return the last seq seen."""
        f = seg.f
        size = f.size()
        get = _Window(f, size).get
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
                if not self.read_only:  # a reader indexes up to the tear and leaves it
                    f.truncate(pos)
                    f.fsync()
                break
            if seq <= last_seq:
                raise StoreCorrupted(
                    f"segment {seg.path!r} offset {pos}: sequence {seq} does not follow "
                    f"{last_seq}; the log is out of order"
                )
            last_seq = seq
            if kind == KIND_RELOCATE:
                rec = _Rec(seg, pos, hdr_len, 0, length, seq, kind, hcrc)
                self._install(name, _apply(self._objects.get(name), rec, version=lofs))
            else:
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
        self,
        key: bytes,
        kind: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        expect: object = _ANY,
        wait: bool = True,
    ) -> ObjectStat | None:
        """Append one record, make it durable per the sync policy, apply it to the index.

        ``expect`` (compaction): append only if the key's current object is
        this one (None: absent) and no change of it is pending; else return
        None. ``wait=False`` leaves a sync=True record pending (the next
        commit or sync() makes it durable and visible).

        Interrupts (cancellation) never leave a half-done step: a started
        append is finished, a started fsync too, and the interrupt is raised
        once the record is in the log (it becomes durable and visible with the
        next commit, or at once if this caller was the one syncing).
        """
        length = len(data)
        crcs = _block_crcs(data)  # outside the lock: the costly part for big writes
        hdr_len = FIXED_SIZE + len(key) + len(crcs) + 4
        user = expect is _ANY
        with self._lock:
            self._check_writable()
            interrupt = None
            if self._tail + hdr_len + length > self.segment_size and self._tail > 0:
                interrupt = self._roll()  # may wait (releasing the lock): read the state after
            staged = self._staged.get(key)
            old = staged.obj if staged is not None else self._objects.get(key)
            if not user:
                if staged is not None or old is not expect:
                    if interrupt is not None:
                        raise interrupt
                    return None
            elif kind == KIND_DELETE and old is None:
                if interrupt is not None:
                    raise interrupt
                raise ObjectNotFound(f"object {key!r} does not exist")
            seg = self._active
            assert seg is not None
            seq = self._next_seq
            head = _FIXED.pack(_MAGIC, kind, 0, len(key), seq, offset, length) + key + crcs
            hcrc = _crc32(head)
            head += _U32.pack(hcrc)
            tail = self._tail
            try:
                if length <= 65536:
                    got = self._finish(seg.f.pwrite, head + data if length else head, tail)
                else:
                    got = self._finish(seg.f.pwrite, head, tail)
                    got = self._finish(seg.f.pwrite, data, tail + hdr_len) or got
            except Exception as exc:
                # Nothing was acknowledged; the next record overwrites the partial
                # bytes at the same offset (or recovery cuts them as a torn tail).
                raise StoreError(f"object store {self.path!r}: append failed: {exc}") from exc
            interrupt = interrupt or got
            self._next_seq = seq + 1
            self._appended = seq
            if kind == KIND_RELOCATE:
                rec = _Rec(seg, tail, hdr_len, 0, length, seq, kind, hcrc)
                obj = _apply(old, rec, version=offset)
            else:
                rec = _Rec(seg, tail, hdr_len, offset, length, seq, kind, hcrc)
                obj = _apply(old, rec)
            self._tail = tail + hdr_len + length
            st = self.stats
            if user:
                st.writes += 1
                st.write_bytes += length
            st.log_bytes += hdr_len + length
            if not self._sync:
                self._install(key, obj)
            else:
                pend = _Pending(key, rec, obj)
                self._pending.append(pend)
                self._staged[key] = pend
                if wait and interrupt is None:
                    interrupt = self._wait_durable(seq)
        if interrupt is not None:
            self.stats.interrupted_ops += 1
            raise interrupt
        if obj is None:
            return ObjectStat(0, seq)
        return ObjectStat(obj.size, obj.version)

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreClosed(f"object store {self.path!r} is closed")
        if self.read_only:
            raise StoreReadOnly(f"object store {self.path!r} was opened read-only")
        if self._failed is not None:
            raise StoreFailed(
                f"object store {self.path!r} is read-only after a failed sync: {self._failed}"
            )

    # -- interrupt-safe steps (cancellation never changes the store's health) ----

    def _finish(self, step: Callable[..., object], *args: object) -> BaseException | None:
        """Run an idempotent I/O step to completion despite interrupts; return the first one.

        An interrupted pwrite or fsync may still be running in the kernel (an
        io_uring op is not cancelled with its waiter), so it is issued again:
        the same bytes at the same offset, or another fsync. An Exception is
        an I/O failure and propagates.
        """
        interrupt: BaseException | None = None
        for _ in range(_INTERRUPT_RETRIES):
            try:
                step(*args)
                return interrupt
            except BaseException as exc:
                if not _is_interrupt(exc):
                    raise
                if interrupt is None:
                    interrupt = exc
        raise StoreError(
            f"object store {self.path!r}: an I/O step was interrupted {_INTERRUPT_RETRIES} "
            "times in a row"
        ) from interrupt

    def _create(self, path: str) -> tuple[EnvFile, BaseException | None]:
        """Create a new, empty file despite interrupts; (the file, the first interrupt).

        An interrupted create may still have made the file (an io_uring open is
        not undone with its waiter), so a retry opens it as it is, empty: the
        directory is locked and segment numbers only grow, so the name is ours.
        """
        interrupt: BaseException | None = None
        mode = "x+b"
        for _ in range(_INTERRUPT_RETRIES):
            try:
                return self.env.open(path, mode), interrupt
            except BaseException as exc:
                if not _is_interrupt(exc):
                    raise
                if interrupt is None:
                    interrupt = exc
                mode = "w+b"
        raise StoreError(
            f"object store {self.path!r}: creating {path!r} was interrupted "
            f"{_INTERRUPT_RETRIES} times in a row"
        ) from interrupt

    def _relock(self) -> BaseException | None:
        """Take the store lock again, however often the wait is interrupted; return the first."""
        interrupt: BaseException | None = None
        while True:
            try:
                self._lock.acquire()
                return interrupt
            except BaseException as exc:
                if not _is_interrupt(exc):
                    raise
                if interrupt is None:
                    interrupt = exc

    def _wait_change(self) -> None:
        """Wait until notified: the lock is held on entry and on every exit, interrupted or not."""
        ev = self.env.Event()
        self._waiters.append(ev)
        self._lock.release()
        try:
            ev.wait()
        except BaseException:
            if ev in self._waiters:
                self._waiters.remove(ev)
            self._relock()
            raise
        interrupt = self._relock()
        if interrupt is not None:
            raise interrupt

    def _notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.set()

    def _fail(self, exc: BaseException, what: str) -> StoreFailed:
        """Turn the store read-only after an I/O failure (under _lock); return the error to raise."""
        self._failed = exc
        self._notify_all()
        log.error("object store %s: %s, now read-only: %s", self.path, what, exc)
        return StoreFailed(f"object store {self.path!r}: {what}: {exc}")

    def _wait_durable(self, seq: int) -> BaseException | None:
        """Group commit (under _lock): return once record ``seq`` is fsynced and applied.

        Returns an interrupt that arrived while this caller was the syncer
        (the sync was finished first); an interrupt while waiting for another
        syncer propagates at once, leaving the record pending.
        """
        while self._durable < seq:
            if self._failed is not None:
                raise StoreFailed(
                    f"object store {self.path!r}: sync failed, write not acknowledged: "
                    f"{self._failed}"
                )
            if self._syncing:
                self._wait_change()
                continue
            interrupt = self._sync_locked()
            if interrupt is not None:
                return interrupt
        return None

    def _sync_locked(self) -> BaseException | None:
        """Fsync the active segment outside the lock, then apply what it made durable."""
        self._syncing = True
        target = self._appended
        batch = self._pending
        self._pending = []
        seg = self._active
        assert seg is not None
        self._lock.release()
        err: Exception | None = None
        interrupt = None
        try:
            interrupt = self._finish(seg.f.fdatasync)
        except Exception as exc:
            err = exc
        finally:
            interrupt = self._relock() or interrupt
        self._syncing = False
        if err is not None:
            raise self._fail(err, "fsync failed") from err
        self.stats.fsyncs += 1
        self.stats.commit_batches += 1
        self._publish(batch)
        self._durable = max(self._durable, target)
        self._notify_all()
        return interrupt

    def _publish(self, batch: list[_Pending]) -> None:
        """Make durable changes visible, in log order (under _lock)."""
        staged = self._staged
        for p in batch:
            self._install(p.key, p.obj)
            if staged.get(p.key) is p:
                del staged[p.key]

    def _roll(self) -> BaseException | None:
        """Seal the active segment (fsync it) and start the next one (under _lock).

        Returns an interrupt that arrived meanwhile (the roll was finished first).
        """
        while self._syncing:
            self._wait_change()
        self._check_writable()
        seg = self._active
        assert seg is not None
        interrupt = self._flush_locked()
        try:
            interrupt = self._new_segment(seg.id + 1) or interrupt
        except Exception as exc:
            raise self._fail(exc, "starting a new segment failed") from exc
        return interrupt

    def _flush_locked(self) -> BaseException | None:
        """Fsync the active segment holding the lock (no syncer running); publish all.

        Returns an interrupt that arrived meanwhile (the fsync was finished first).
        """
        seg = self._active
        assert seg is not None and not self._syncing
        try:
            interrupt = self._finish(seg.f.fdatasync)
        except Exception as exc:
            raise self._fail(exc, "fsync failed") from exc
        self.stats.fsyncs += 1
        if self._pending:
            batch, self._pending = self._pending, []
            self.stats.commit_batches += 1
            self._publish(batch)
        self._durable = self._appended
        self._notify_all()
        return interrupt

    def sync(self) -> None:
        """Make every change appended so far durable (needed only with sync=False)."""
        with self._lock:
            self._check_writable()
            while self._syncing:
                self._wait_change()
            interrupt = self._flush_locked()
        if interrupt is not None:
            self.stats.interrupted_ops += 1
            raise interrupt

    # -- compaction ------------------------------------------------------------

    def compact(
        self, min_garbage: float = 0.5, max_segments: int | None = None
    ) -> CompactionResult:
        """Reclaim the space of overwritten and deleted objects (see "Compaction" above).

        Picks the sealed segments of which at least ``min_garbage`` is not
        live object data (most garbage first, at most ``max_segments``). For
        each: moves every live object that has a record there to the end of
        the log whole (same bytes, same version), keeps its tombstones while
        older segments exist, makes all that durable, then deletes the
        segment. Runs on the caller's stack while reads and writes go on; on
        a tame stack it yields to the reactor at every write and at least
        every 256 KiB copied. One compaction runs at a time.
        """
        if not 0.0 <= min_garbage <= 1.0:
            raise InvalidArgument(f"min_garbage must be in [0, 1], got {min_garbage}")
        if max_segments is not None and max_segments < 0:
            raise InvalidArgument(f"negative max_segments {max_segments}")
        result = CompactionResult()
        st = self.stats
        with self._compact_lock:
            self._check_writable()
            st.compaction_running = 1
            st.compaction_runs += 1
            st.compaction_segments_done = 0
            try:
                victims = self._pick_victims(min_garbage)
                if max_segments is not None:
                    del victims[max_segments:]
                st.compaction_segments_planned = len(victims)
                batch: list[tuple[_Segment, set[bytes]]] = []
                for seg in victims:
                    self._moved = 0
                    keys = self._evacuate(seg, result)
                    result.objects_moved += self._moved
                    if keys is not None:
                        batch.append((seg, keys))
                    if len(batch) >= _COMPACT_BATCH:
                        self._drop(batch, result)
                        batch = []
                self._drop(batch, result)
            finally:
                st.compaction_running = 0
        return result

    def garbage_ratio(self) -> float:
        """The share of the segments' bytes that is not live object data (0.0 .. 1.0)."""
        log_bytes = self.stats.log_bytes
        return 0.0 if log_bytes <= 0 else max(0.0, 1.0 - self.stats.live_bytes / log_bytes)

    def _pick_victims(self, min_garbage: float) -> list[_Segment]:
        live: dict[int, int] = {}
        for obj in list(self._objects.values()):
            for e in obj.exts:
                sid = e.rec.seg.id
                live[sid] = live.get(sid, 0) + e.hi - e.lo
        scored = []
        for seg in list(self._segments):
            if seg is self._active:
                continue
            size = seg.f.size()
            if size and 1.0 - live.get(seg.id, 0) / size >= min_garbage:
                scored.append((live.get(seg.id, 0) / size, seg.id, seg))
        scored.sort(key=lambda t: (t[0], t[1]))
        return [seg for _, _, seg in scored]

    def _segment_keys(self, seg: _Segment) -> tuple[set[bytes], set[bytes]]:
        """(keys with any record in seg, keys with a tombstone in seg), from its headers."""
        f = seg.f
        size = f.size()
        get = _Window(f, size).get
        keys: set[bytes] = set()
        tombstones: set[bytes] = set()
        pos = 0
        n = 0
        while pos < size:
            try:
                (hdr_len, _, length, _, kind, _), name = self._parse_record(
                    get, pos, size, verify_data=False
                )
            except _Torn as why:
                raise StoreCorrupted(
                    f"sealed segment {seg.path!r} is damaged at offset {pos}: {why}"
                ) from None
            keys.add(name)
            if kind == KIND_DELETE:
                tombstones.add(name)
            pos += hdr_len + length
            n += 1
            if n % 1024 == 0:
                self.env.sleep(0)  # cached headers parse without any I/O wait: yield
        return keys, tombstones

    def _evacuate(self, seg: _Segment, result: CompactionResult) -> set[bytes] | None:
        """Move out of seg what replay needs of it; return its keys (None: it must stay)."""
        keys, tombstones = self._segment_keys(seg)
        older = any(s.id < seg.id for s in self._segments)
        st = self.stats
        since_yield = 0
        for key in sorted(keys):
            moved = self._relocate(key, seg, older and key in tombstones)
            if moved < 0:
                st.compaction_skipped_segments += 1
                result.segments_skipped += 1
                return None
            since_yield += moved
            result.bytes_copied += moved
            if since_yield >= _COMPACT_YIELD_BYTES:
                since_yield = 0
                self.env.sleep(0)
        return keys

    def _drop(self, batch: list[tuple[_Segment, set[bytes]]], result: CompactionResult) -> None:
        """Delete evacuated segments, once what was moved out of them is durable."""
        if not batch:
            return
        self.sync()  # the moved objects and tombstones are durable before a segment goes
        st = self.stats
        for seg, keys in batch:
            size = seg.f.size()
            with self._lock:
                if self._closed:
                    return
                if any(_needs(self._objects.get(key), seg) for key in keys):
                    continue  # cannot happen: every key that needs seg was moved; keep it
                self._segments.remove(seg)
                self.env.remove(seg.path)
                st.segments = len(self._segments)
                st.log_bytes -= size
                st.compaction_segments_dropped += 1
                st.compaction_bytes_reclaimed += size
                st.compaction_segments_done += 1
            result.segments_dropped += 1
            result.bytes_reclaimed += size
        self._finish(self.env.fsync_dir, self.path)

    def _relocate(self, key: bytes, seg: _Segment, keep_tombstone: bool) -> int:
        """Move what replay needs of key out of seg to the end of the log.

        That is the whole object if seg holds some of its bytes or the record
        it was made from scratch by (dropping that PUT would let older bytes
        resurface), or its tombstone if it is deleted and older segments may
        still hold its records. Returns the bytes copied, -1 if it cannot.
        """
        st = self.stats
        for _ in range(8):
            obj = self._objects.get(key)
            if obj is None:
                if not keep_tombstone:
                    return 0
                if self._commit(key, KIND_DELETE, 0, b"", expect=None, wait=False) is not None:
                    return 0
            elif not _needs(obj, seg) and not (keep_tombstone and obj.base.kind == KIND_WRITE):
                # (a WRITE that recreated a deleted object needs the tombstone before it,
                # or the object moved whole: older records of the name would merge in)
                return 0
            else:
                if obj.size > MAX_EXTENT:
                    return -1
                data = self._materialize(key, obj)
                if self._commit(key, KIND_RELOCATE, obj.version, data, expect=obj, wait=False):
                    st.compaction_objects_moved += 1
                    st.compaction_bytes_copied += len(data)
                    self._moved += 1
                    return len(data)
            self.sync()  # a change of key is pending: let it land, then look again
        return -1

    def _materialize(self, key: bytes, obj: _Obj) -> bytes:
        """All of an object's bytes (holes as zeros), each extent checked on the way."""
        if len(obj.exts) == 1 and obj.exts[0].lo == 0 and obj.exts[0].hi == obj.size:
            rec = obj.exts[0].rec
            return self._read_rec(key, rec, -rec.lofs, obj.size - rec.lofs)
        out = bytearray(obj.size)
        for e in obj.exts:
            rec = e.rec
            out[e.lo : e.hi] = self._read_rec(key, rec, e.lo - rec.lofs, e.hi - rec.lofs)
        return bytes(out)

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Make everything durable, close the files, drop the directory lock (idempotent).

        An interrupt does not stop it half-way: it is raised once the store is closed.
        """
        interrupt: BaseException | None = None
        with self._lock:
            if self._closed:
                return
            try:
                while self._syncing:
                    try:
                        self._wait_change()
                    except BaseException as exc:
                        if not _is_interrupt(exc):
                            raise
                        interrupt = interrupt or exc
                if self._failed is None and self._appended > self._durable:
                    interrupt = self._flush_locked() or interrupt
            finally:
                self._closed = True
                for seg in self._segments:
                    seg.f.close()
                self._dirlock.release()
                self._notify_all()
        if interrupt is not None:
            raise interrupt

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
