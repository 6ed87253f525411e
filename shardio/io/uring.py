"""Per-reactor file I/O for tame stacks: io_uring through shardio's own ring.

One driver per event loop (the tame runtime owns it; a ring is used from
its loop's thread only). A tame stack that reads, writes, fsyncs, opens,
stats, truncates, renames or unlinks parks until its completion arrives;
the reactor keeps running meanwhile.

The ring is :mod:`shardio.io._uring`, a C extension on the kernel's
io_uring interface (``<linux/io_uring.h>``, the syscalls, mmap of the
rings, C11 acquire/release on the ring indices; no liburing). It keeps
whatever the kernel may still touch (buffers, paths, the statx buffer)
in the op's slot until the op's CQE is reaped, so a cancelled caller
never frees memory the kernel writes into.

* **Reads** first try ``preadv2(..., RWF_NOWAIT)``: page-cached data costs
  ~1.5 µs and no ring round trip. On EAGAIN (or a short, non-EOF result) the
  read goes to io_uring. O_DIRECT reads go straight to io_uring.
  Measured on this kernel (6.x, ext4 on virtio): a preadv2(RWF_NOWAIT) that
  misses *starts* the read itself (readahead from the syscall path), and the
  io_uring read that follows then no longer overlaps with its neighbours.
  So after a miss the driver switches to asking the page cache first with
  ``cachestat(2)`` (Linux >= 6.5) and sends cold reads straight to
  io_uring, until 64 reads in a row were cached again. Without cachestat it
  stays with RWF_NOWAIT-first.
* **Writes, fsync/fdatasync and metadata** (openat, close, statx, renameat,
  unlinkat, ftruncate) go through io_uring. An opcode this kernel lacks
  (``IORING_REGISTER_PROBE`` says so; IORING_OP_FTRUNCATE needs Linux 6.9)
  runs on the driver's small thread pool instead, so it still does not
  block the reactor.
* **Submission** is batched: every op enters through ``_submit``, which
  makes one C call (``Ring.await_op``: queue the SQE, ask for a submit,
  park, then return the result or raise). The cold read of up to 4 MiB
  (``read(..., direct=True)``, ``read_direct``) is one C call from the
  caller on: ``Ring.read_direct`` checks what ``_submit`` would (driver
  usable, no scheduling group, no slot waiters, a free slot), makes the
  ``Parked("io_uring", "read")``, queues, parks and returns the bytes, and
  hands every other case to ``_submit``'s path. The first SQE queued since the
  last ``io_uring_enter`` schedules one submit (``call_soon``) for the end
  of the loop pass, so the stacks that park in one pass share one
  ``io_uring_enter``; while a completion pass resumes many stacks, every
  ``submit_batch`` (8) new SQEs are submitted at once so the device is not
  left idle while Python runs. It trades system calls (and virtio kicks)
  against the device's idle time: at QD32 on an idle machine 8 reached
  89-94 % of fio, 16 74-79 %, 4 and 32 less (bench/README.md, the sweep of
  2026-12-02); under CPU contention 16 spends ~0.3-0.7 us less CPU per read. If ``io_uring_enter`` fails, the stacks whose
  SQEs the kernel did not take fail with :class:`UringSubmitError`; unless
  the error was a transient one (EAGAIN, EBUSY, ENOMEM) the driver is then
  broken and every later operation fails with the same error.
* **Completions** are reaped when the ring fd becomes readable
  (``loop.add_reader(ring_fd)``: the io_uring fd polls POLLIN once a CQE is
  posted) and, inside a shard, by a reactor poller while ops are in
  flight, so a polling reactor sees completions without an epoll round.
  The ring hands each CQE's result straight to its stack in C
  (``Ring.complete``: no list, no Python loop). On loops other than
  asyncio's own (uvloop) the reap runs from the ready queue rather than the
  reader callback: libuv calls that from deep in its poll phase, and
  greenlet would copy ~15 KiB of that C stack out and back at every switch.
* **Queue depth** is bounded (``max_inflight``, default 128 = ring size):
  further ops wait in FIFO order for a slot; the CQ ring (2x entries) never
  overflows.
* **Cancellation** of a waiting stack drops its interest and queues an
  ``IORING_OP_ASYNC_CANCEL``; the op's memory stays with its slot until its
  CQE, and a cancelled open that succeeded anyway has its fd closed.

Where io_uring cannot be set up (seccomp, old kernel) or
``SHARDIO_NO_URING=1`` is set, :class:`ThreadPoolDriver` runs the same
operations on a small thread pool; this is announced once in the log and
reported by ``driver.stats()["fallback"] == 1``.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shardio.errors import ShardioError

log = logging.getLogger("shardio.io.uring")

__all__ = [
    "ThreadPoolDriver",
    "UringDriver",
    "UringSubmitError",
    "cached_pages",
    "open_driver",
]

PAGE = 4096
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_AT_FDCWD = -100
_AT_REMOVEDIR = 0x200
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC_STATS = 0x7FF
_MAX_IO = 4 << 20  # one io_uring read/write moves at most this much (the ring's MAX_IO)
_TRANSIENT = (errno.EAGAIN, errno.EBUSY, errno.ENOMEM)
# The ring's prep methods, named as dump_stacks shows an op parked on them.
_PREP_NAMES = (
    "read", "write", "fsync", "openat", "close_fd", "statx", "renameat", "unlinkat", "ftruncate",
    "nop",
)  # fmt: skip

try:
    from shardio.io import _uring
except ImportError:  # not built (e.g. a source tree without build_ext): thread pool only
    _uring = None  # type: ignore[assignment]
_pread_nowait: Any = None if _uring is None else _uring.pread_nowait

_announced_fallback = False
_announce_lock = threading.Lock()


class UringSubmitError(ShardioError, OSError):
    """``io_uring_enter`` failed: the operations it did not take were never started.

    Raised in every tame stack that waited for one of those operations, and
    (unless the failure was transient: EAGAIN, EBUSY, ENOMEM) by every later
    operation on the same driver, since its ring is unusable. ``errno`` is
    the failure's.
    """


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of [offset, offset + length) are in the page cache.

    Uses cachestat(2) (Linux >= 6.5), which looks without starting any I/O;
    None where the kernel (or seccomp) does not allow it.
    """
    if _uring is None:
        return None
    try:
        return _uring.cachestat(fd, offset, length)  # type: ignore[no-any-return]
    except OSError:
        return None


def _stat_result(t: tuple[int, ...]) -> os.stat_result:
    """An os.stat_result from the ring's statx tuple, with os.stat's float/ns fields."""
    mode, ino, dev, nlink, uid, gid, size, a_ns, m_ns, c_ns, blksize, blocks, rdev = t
    a_s, a_n = divmod(a_ns, 1_000_000_000)
    m_s, m_n = divmod(m_ns, 1_000_000_000)
    c_s, c_n = divmod(c_ns, 1_000_000_000)
    extra = {
        "st_atime": a_s + a_n * 1e-9,
        "st_mtime": m_s + m_n * 1e-9,
        "st_ctime": c_s + c_n * 1e-9,
        "st_atime_ns": a_ns,
        "st_mtime_ns": m_ns,
        "st_ctime_ns": c_ns,
        "st_blksize": blksize,
        "st_blocks": blocks,
        "st_rdev": rdev,
    }
    # (sequence, dict): the constructor pickling uses; the dict fills the named-only fields
    return os.stat_result((mode, ino, dev, nlink, uid, gid, size, a_s, m_s, c_s), extra)


class _Counters:
    """Plain-int counters (cheaper than a Counter on the hot path)."""

    __slots__ = (
        "read_cached",
        "read_uring",
        "read_cold_probed",
        "read_thread",
        "write",
        "fsync",
        "fdatasync",
        "metadata",
        "metadata_thread",
        "slot_waits",
        "submit_calls",
        "submit_failures",
        "cancels",
        "reaps",
        "cqes",
        "inflight_peak",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class UringDriver:
    """The io_uring driver of one event loop. Its I/O methods run on that loop's tame stacks."""

    kind = "io_uring"

    #: The metadata operations, each named after its io_uring opcode.
    METADATA_OPS = ("openat", "close", "statx", "renameat", "unlinkat", "ftruncate")

    def __init__(
        self,
        rt: Any,
        entries: int = 128,
        max_inflight: int | None = None,
        submit_batch: int = 8,
        thread_ops: tuple[str, ...] = (),
    ) -> None:
        """thread_ops: metadata ops (see METADATA_OPS) to run on the thread pool even
        where the kernel has their opcode, as happens by itself where it does not."""
        unknown = set(thread_ops) - set(self.METADATA_OPS)
        if unknown:
            raise ValueError(
                f"thread_ops: unknown operation(s) {sorted(unknown)}; known: {self.METADATA_OPS}"
            )
        if _uring is None:
            raise OSError(errno.ENOSYS, "shardio.io._uring is not built (run pip install -e .)")
        self._Parked = rt.Parked  # the runtime hands its wake-up token: no tame import here
        self.rt = rt
        self.loop = rt.loop
        self._ring = ring = _uring.Ring(entries)
        self._prep_read = ring.read  # bound once: the read path uses them per op
        # What dump_stacks shows for an op ("io_uring", name), computed once per opcode.
        self._op_names = {
            getattr(ring, name): sys.intern(name) for name in _PREP_NAMES
        }
        self._kick_once = self._kick
        try:
            self._self_test()
        except BaseException:
            ring.close()
            raise
        self.ring_fd: int = ring.fd
        self.max_inflight = min(max_inflight or entries, ring.slots)
        self.submit_batch = submit_batch
        self._broken: UringSubmitError | None = None
        self._reap_scheduled = False
        self._reap_inline = isinstance(self.loop, asyncio.BaseEventLoop)
        self._unusable = False  # broken or closed (one test on the hot path)
        self._cachestat = cached_pages(ring.fd, 0, 0) is not None
        self._probe_first = False
        self._probe_hits = 0
        self._slot_waiters: collections.deque[Any] = collections.deque()
        self._threads: ThreadPoolDriver | None = None  # for opcodes this kernel lacks
        self._has = {
            name: name not in thread_ops and ring.supported(getattr(_uring, "OP_" + name.upper()))
            for name in self.METADATA_OPS
        }
        self.closed = False
        self.counters = _Counters()
        # The cold read's whole path in one C call (Ring.read_direct), with this
        # driver's slow path for every case it does not take itself.
        ring.configure_direct_reads(
            rt.Parked, self._kick_once, rt, self._slot_waiters, self.max_inflight,
            self._read_direct_slow, self._read_rest,
        )
        self.read_direct = ring.read_direct
        self.loop.add_reader(self.ring_fd, self._on_readable)
        self._reactor = rt.reactor
        if self._reactor is not None:
            self._reactor.add_poller(self._poll)

    def _self_test(self) -> None:
        """One NOP through submit, the ring fd's readability and reap."""
        ring = self._ring
        token = object()
        if ring.nop(_uring.OP_NOP, token) is None or ring.submit() != 1:
            raise OSError(errno.EIO, "io_uring self-test: NOP not submitted")
        if not ring.wait(2000):
            raise OSError(errno.ETIMEDOUT, "io_uring self-test: ring fd never became readable")
        done = ring.reap()
        if done != [token, 0]:
            raise OSError(errno.EPROTO, f"io_uring self-test: unexpected completions {done!r}")

    def supports(self, op: str) -> bool:
        """True if op (openat, close, statx, renameat, unlinkat, ftruncate) uses io_uring here."""
        return self._has[op]

    # -- public operations (on a tame stack) ------------------------------------
    def read(self, fd: int, n: int, offset: int, direct: bool = False) -> bytes:
        """pread(fd, n, offset): short only at end of file."""
        if not direct:
            if not self._probe_first and n > 0:  # the cached hot path: one C call
                data = _pread_nowait(fd, n, offset)
                if data is not None and len(data) == n:
                    self.counters.read_cached += 1
                    return data  # type: ignore[no-any-return]
                return self._read_after_nowait(fd, n, offset, data)
        else:  # the cold hot path: one C call (Ring.read_direct)
            return self.read_direct(fd, n, offset)  # type: ignore[no-any-return]
        if n <= 0:
            return b""
        # After a miss, ask the page cache first, so that a cold read does not
        # start its I/O from preadv2 (see the module docstring).
        first = offset // PAGE
        pages = (offset + n + PAGE - 1) // PAGE - first
        cached = _uring.cachestat(fd, first * PAGE, pages * PAGE)
        if cached is not None and cached < pages:
            self._probe_hits = 0
            self.counters.read_cold_probed += 1
            return self._read_uring(fd, n, offset)
        self._probe_hits += 1
        if self._probe_hits >= 64:
            self._probe_first = False
        return self._read_after_nowait(fd, n, offset, _pread_nowait(fd, n, offset))

    def read_direct(self, fd: int, n: int, offset: int) -> bytes:  # replaced per instance
        """read(fd, n, offset, direct=True): the instance's Ring.read_direct (see __init__)."""
        return self._read_direct_slow(fd, n, offset)

    def _read_direct_slow(self, fd: int, n: int, offset: int) -> bytes:
        """What Ring.read_direct does not take itself: a scheduling group's stack (its
        I/O queue admits the op), slot waiters or a full ring, a broken or closed
        driver, reads of 0 or more than MAX_IO bytes."""
        if n <= 0:
            return b""
        if n > _MAX_IO:
            return self._read_uring(fd, n, offset)
        data: bytes = self._submit(self._prep_read, (fd, n, offset))
        self.counters.read_uring += 1
        if len(data) == n or not data:
            return data
        return self._read_rest(fd, n, offset, data)

    def _read_rest(self, fd: int, n: int, offset: int, data: bytes) -> bytes:
        """A read that returned less than asked: short only at the end of the file."""
        if offset + len(data) >= os.fstat(fd).st_size:
            return data
        return data + self._read_uring(fd, n - len(data), offset + len(data))

    def _read_after_nowait(self, fd: int, n: int, offset: int, data: bytes | None) -> bytes:
        """The rest of a read whose RWF_NOWAIT attempt gave data (None: nothing cached)."""
        if data is not None:
            got = len(data)
            if got == n or (got and offset + got >= os.fstat(fd).st_size):
                self.counters.read_cached += 1
                return data  # all of it, or the end of the file
        else:
            data = b""
            got = 0
        if self._cachestat:
            self._probe_first = True
            self._probe_hits = 0
        rest = self._read_uring(fd, n - got, offset + got)
        return data + rest if data else rest

    def write(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int, direct: bool = False
    ) -> int:
        """pwrite(fd, data, offset) through io_uring; writes all of data.

        O_DIRECT data is copied into the ring's page-aligned buffers; other
        data is handed to the kernel in place (the ring holds it until done).
        """
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        prep = self._ring.write
        while done < total:
            chunk = view[done : done + _MAX_IO] if total - done > _MAX_IO or done else view
            res = self._submit(prep, (fd, chunk, offset + done, direct))
            if res == 0:
                raise OSError(errno.EIO, "pwrite through io_uring wrote 0 bytes")
            done += res
        self.counters.write += 1
        return total

    def fsync(self, fd: int, datasync: bool = False) -> None:
        """fsync (or fdatasync) through io_uring."""
        self._submit(self._ring.fsync, (fd, datasync))
        if datasync:
            self.counters.fdatasync += 1
        else:
            self.counters.fsync += 1

    def open(
        self,
        path: str | bytes | os.PathLike[Any],
        flags: int,
        mode: int = 0o777,
        dir_fd: int | None = None,
    ) -> int:
        """os.open(path, flags, mode, dir_fd=dir_fd), non-inheritable like os.open's fds."""
        self.counters.metadata += 1
        if not self._has["openat"]:
            return self._thread_pool().open(path, flags, mode, dir_fd)
        name = os.fsencode(path)
        d = _AT_FDCWD if dir_fd is None else dir_fd
        return self._submit(self._ring.openat, (d, name, flags | _CLOEXEC, mode), path)

    def close_fd(self, fd: int) -> None:
        """os.close(fd) (inline once the driver is closed or broken: the fd must not leak)."""
        self.counters.metadata += 1
        if self._unusable:
            return os.close(fd)
        if not self._has["close"]:
            return self._thread_pool().close_fd(fd)
        self._submit(self._ring.close_fd, (fd,))
        return None

    def stat(
        self, path: int | str | bytes | os.PathLike[Any], follow_symlinks: bool = True
    ) -> os.stat_result:
        """os.stat(path) (an int path is an fd: os.fstat)."""
        self.counters.metadata += 1
        if not self._has["statx"]:
            return self._thread_pool().stat(path, follow_symlinks)
        if isinstance(path, int):
            args: tuple[Any, ...] = (path, b"", _AT_EMPTY_PATH, _STATX_BASIC_STATS)
            what: Any = None
        else:
            flags = 0 if follow_symlinks else _AT_SYMLINK_NOFOLLOW
            args = (_AT_FDCWD, os.fsencode(path), flags, _STATX_BASIC_STATS)
            what = path
        return _stat_result(self._submit(self._ring.statx, args, what))

    def ftruncate(self, fd: int, length: int) -> None:
        """os.ftruncate(fd, length) (IORING_OP_FTRUNCATE needs Linux 6.9)."""
        self.counters.metadata += 1
        if not self._has["ftruncate"]:
            return self._thread_pool().ftruncate(fd, length)
        self._submit(self._ring.ftruncate, (fd, length))
        return None

    def rename(
        self, src: str | bytes | os.PathLike[Any], dst: str | bytes | os.PathLike[Any]
    ) -> None:
        """os.replace(src, dst): atomically, replacing dst."""
        self.counters.metadata += 1
        if not self._has["renameat"]:
            return self._thread_pool().rename(src, dst)
        args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), 0)
        self._submit(self._ring.renameat, args, src, dst)
        return None

    def unlink(self, path: str | bytes | os.PathLike[Any], rmdir: bool = False) -> None:
        """os.unlink(path), or os.rmdir(path) with rmdir=True."""
        self.counters.metadata += 1
        if not self._has["unlinkat"]:
            return self._thread_pool().unlink(path, rmdir)
        flags = _AT_REMOVEDIR if rmdir else 0
        self._submit(self._ring.unlinkat, (_AT_FDCWD, os.fsencode(path), flags), path)
        return None

    # -- internals --------------------------------------------------------------
    def _thread_pool(self) -> ThreadPoolDriver:
        if self._threads is None:
            self._threads = ThreadPoolDriver(self.rt, workers=2)
        self.counters.metadata_thread += 1
        return self._threads

    def _read_uring(self, fd: int, n: int, offset: int) -> bytes:
        prep = self._prep_read
        if n <= _MAX_IO:
            data: bytes = self._submit(prep, (fd, n, offset))
            self.counters.read_uring += 1
            if len(data) == n or not data:
                return data
            return self._read_rest(fd, n, offset, data)
        chunks = []
        while n > 0:
            chunk = self._submit(prep, (fd, min(n, _MAX_IO), offset))
            self.counters.read_uring += 1
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
            offset += len(chunk)
            if len(chunk) < _MAX_IO and offset >= os.fstat(fd).st_size:
                break
        return b"".join(chunks)

    def _wait_for_slot(self) -> None:
        self.counters.slot_waits += 1
        first = False
        while self._ring.inflight >= self.max_inflight or (self._slot_waiters and not first):
            w = self._Parked("io_uring", "a free slot")
            if first:
                self._slot_waiters.appendleft(w)  # woken but beaten to the slot: keep our place
            else:
                self._slot_waiters.append(w)
            try:
                w.park()  # woken in FIFO order as slots free up
            except BaseException:
                try:
                    self._slot_waiters.remove(w)
                except ValueError:  # already woken: pass the slot on
                    if self._slot_waiters:
                        self._slot_waiters.popleft().wake_soon()
                raise
            first = True
            self._check_usable()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise UringSubmitError(
                self._broken.errno,
                f"the io_uring driver is unusable since a submit failed ({self._broken.strerror})",
            )
        if self.closed:
            raise OSError(errno.EBADF, "the io_uring driver is closed")

    def _submit(
        self, prep: Any, args: tuple[Any, ...], filename: Any = None, filename2: Any = None,
        admitted: bool = False,
    ) -> Any:
        """Queue one op (``prep(*args, parked)``), park until its CQE, return its result.

        The one entry point of every operation on the ring. A negative result
        raises the OSError os.* would (naming filename).

        The op's memory belongs to its ring slot until the CQE is reaped, even
        if this wait is cancelled (the ring then drops our token and asks the
        kernel to cancel the op). SQEs queued during one loop pass go to the
        kernel together (``_flush``, once per pass, or in batches while a
        completion pass resumes stacks).
        """
        if self._unusable:
            self._check_usable()
        if not admitted and self.rt.running_group is not None:  # a scheduling group's op:
            return self.rt.running_group.io_submit(self, prep, args, filename, filename2)
        ring = self._ring
        if self._slot_waiters or ring.inflight >= self.max_inflight:
            self._wait_for_slot()
        name = self._op_names.get(prep)
        if name is None:  # a prep of another object (a builtin method's __name__ is a new str)
            name = prep.__name__
        p = self._Parked("io_uring", name)
        # Queue, kick the pass's submit, park, raise or return the result; cancel on
        # an exception in park: all in C (Ring.await_op).
        if filename is None:
            res = ring.await_op(prep, args, p, self._kick_once)
        else:
            res = ring.await_op(prep, args, p, self._kick_once, filename, filename2)
        if res is None:  # the SQ is full of prepared SQEs: hand them over and retry
            self._flush()
            res = ring.await_op(prep, args, p, self._kick_once, filename, filename2)
            if res is None:
                self._check_usable()
                raise OSError(errno.EBUSY, "io_uring submission queue full")
        return res

    def _kick(self) -> None:
        """The ring queued the first SQE since its last submit: submit at the end of this pass."""
        self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand every queued SQE to the kernel (one io_uring_enter); fail their stacks if it fails."""
        ring = self._ring
        if self.closed or self._broken is not None:
            return
        try:
            ring.submit()
        except OSError as exc:
            if exc.errno in _TRANSIENT:  # out of memory for a moment: try once more
                try:
                    ring.submit()
                    return
                except OSError as again:
                    exc = again
            self._submit_failed(exc)

    def _submit_failed(self, exc: OSError) -> None:
        """Fail the stacks whose SQEs the kernel did not take; break the driver unless transient."""
        self.counters.submit_failures += 1
        waiting = self._ring.retract()
        error = UringSubmitError(
            exc.errno,
            f"io_uring_enter failed ({exc.strerror}): {len(waiting)} queued operation(s) were "
            "never started",
        )
        if exc.errno not in _TRANSIENT:
            self._broken = error
            self._unusable = True
            self._ring.direct_open = False
            log.error("io_uring driver broken: %s", error)
            for w in self._slot_waiters:
                w.wake_soon()
            self._slot_waiters.clear()
        for p in waiting:
            p.wake_soon(error)

    def _reap(self) -> int:
        """Collect every posted CQE, resume the stacks waiting for them; return how many.

        The ring does it in C (``complete``): each CQE's result goes straight to
        its Parked's ``wake``, and every ``submit_batch`` SQEs the resumed
        stacks queue are submitted at once, so the device is not left idle
        while Python resumes the rest.
        """
        ring = self._ring
        try:
            n: int = ring.complete(self.submit_batch)
        finally:
            if ring.unsubmitted:  # what the resumed stacks queued after the last batch
                self._flush()
        if not n:
            return 0
        c = self.counters
        c.reaps += 1
        c.cqes += n
        waiters = self._slot_waiters
        free = self.max_inflight - ring.inflight
        while free > 0 and waiters:
            waiters.popleft().wake_soon()
            free -= 1
        return n

    def _on_readable(self) -> None:
        # On loops other than asyncio's own, reap from the ready queue, not from
        # here: uvloop runs this inside libuv's poll phase, whose frame holds a
        # 12 KiB epoll_event array, and a stack resumed this deep makes greenlet
        # copy ~15 KiB of the loop's C stack out and back on every switch
        # (measured: 15.6 KiB vs 0.6 KiB per switch; ~0.8 us per read). Tame
        # stacks start from ready callbacks, as this reap then does. asyncio's
        # own loops run reader callbacks from the ready queue already.
        if self._reap_inline:
            if not self.closed:
                self._reap()
        elif not self._reap_scheduled and not self.closed:
            self._reap_scheduled = True
            self.loop.call_soon(self._reap_ready)

    def _reap_ready(self) -> None:
        self._reap_scheduled = False
        if not self.closed:
            self._reap()

    def _poll(self) -> bool:
        """Reactor poller: reap without an epoll round while ops are in flight."""
        ring = self._ring
        if self.closed or not ring.inflight or not ring.ready():
            return False
        return self._reap() > 0

    def stats(self) -> dict[str, int]:
        """Counters plus current occupancy; ``fallback`` is 0 (io_uring in use)."""
        d = self.counters.as_dict()
        ring = self._ring
        d["read_uring"] += ring.direct_reads
        d.update(
            inflight=ring.inflight,
            inflight_peak=ring.inflight_peak,
            submit_calls=ring.enters,
            cancels=ring.cancels,
            max_inflight=self.max_inflight,
            fixed_buffers=int(ring.fixed_buffers),
            fallback=0,
        )
        return d

    def close(self) -> None:
        """Stop reaping, wait (bounded) for ops still in the kernel, release the ring."""
        if self.closed:
            return
        self.closed = True
        self._unusable = True
        self._ring.direct_open = False
        self.read_direct = self._read_direct_slow  # the ring forgets its configuration at close
        try:
            self.loop.remove_reader(self.ring_fd)
        except Exception:  # the loop may already be closed, or the fd replaced
            pass
        if self._reactor is not None:
            try:
                self._reactor.remove_poller(self._poll)
            except Exception:
                pass
        ring = self._ring
        if ring.unsubmitted:
            try:
                ring.submit()
            except OSError:
                ring.retract()  # never started: nothing of theirs is in the kernel
        # The kernel may still write into the memory of ops in flight: wait for them.
        deadline = time.monotonic() + 5.0
        while ring.inflight and time.monotonic() < deadline:
            if not ring.wait(10) or not ring.ready():
                time.sleep(0.001)
            ring.reap()  # results nobody waits for any more
        leaked = ring.close()
        if leaked:
            log.error(
                "io_uring driver closed with %d ops still in the kernel; leaking their memory",
                leaked,
            )
        for w in self._slot_waiters:
            w.wake_soon()
        self._slot_waiters.clear()
        if self._threads is not None:
            self._threads.close()


class ThreadPoolDriver:
    """Fallback when io_uring is unavailable: the same operations on a few threads."""

    kind = "threads"

    def __init__(self, rt: Any, workers: int = 4) -> None:
        self._Parked = rt.Parked
        self.rt = rt
        self.loop = rt.loop
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardio-file-io")
        self.closed = False
        self.counters = _Counters()

    def supports(self, op: str) -> bool:
        """False: no operation uses io_uring here."""
        return False

    def _run(self, fn: Any, *args: Any) -> Any:
        if self.closed:
            raise OSError(errno.EBADF, "the file I/O thread pool is closed")
        p = self._Parked("file thread")
        reactor = self.rt.reactor
        post = reactor.call_threadsafe if reactor is not None else self.loop.call_soon_threadsafe

        def done(fut: Any) -> None:
            post(p.wake, fut)

        self._pool.submit(fn, *args).add_done_callback(done)
        return p.park().result()

    def read(self, fd: int, n: int, offset: int, direct: bool = False) -> bytes:
        if n <= 0:
            return b""
        if not direct and _uring is not None:
            data = _uring.pread_nowait(fd, n, offset)
            if data is not None and (
                len(data) == n or (data and offset + len(data) >= os.fstat(fd).st_size)
            ):
                self.counters.read_cached += 1
                return data  # type: ignore[no-any-return]
        self.counters.read_thread += 1
        return self._run(_blocking_read, fd, n, offset, direct)  # type: ignore[no-any-return]

    def read_direct(self, fd: int, n: int, offset: int) -> bytes:
        """read(fd, n, offset, direct=True), as UringDriver.read_direct."""
        return self.read(fd, n, offset, True)

    def write(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int, direct: bool = False
    ) -> int:
        self.counters.write += 1
        return self._run(_blocking_write, fd, bytes(data), offset, direct)  # type: ignore[no-any-return]

    def fsync(self, fd: int, datasync: bool = False) -> None:
        if datasync:
            self.counters.fdatasync += 1
        else:
            self.counters.fsync += 1
        self._run(os.fdatasync if datasync else os.fsync, fd)

    def open(
        self,
        path: str | bytes | os.PathLike[Any],
        flags: int,
        mode: int = 0o777,
        dir_fd: int | None = None,
    ) -> int:
        self.counters.metadata += 1
        return self._run(_open, path, flags, mode, dir_fd)  # type: ignore[no-any-return]

    def close_fd(self, fd: int) -> None:
        self.counters.metadata += 1
        self._run(os.close, fd)

    def stat(
        self, path: int | str | bytes | os.PathLike[Any], follow_symlinks: bool = True
    ) -> os.stat_result:
        self.counters.metadata += 1
        if isinstance(path, int):
            return self._run(os.fstat, path)  # type: ignore[no-any-return]
        return self._run(_stat, path, follow_symlinks)  # type: ignore[no-any-return]

    def ftruncate(self, fd: int, length: int) -> None:
        self.counters.metadata += 1
        self._run(os.ftruncate, fd, length)

    def rename(
        self, src: str | bytes | os.PathLike[Any], dst: str | bytes | os.PathLike[Any]
    ) -> None:
        self.counters.metadata += 1
        self._run(os.replace, src, dst)

    def unlink(self, path: str | bytes | os.PathLike[Any], rmdir: bool = False) -> None:
        self.counters.metadata += 1
        self._run(os.rmdir if rmdir else os.unlink, path)

    def stats(self) -> dict[str, int]:
        """Counters; ``fallback`` is 1 (thread pool in use)."""
        d = self.counters.as_dict()
        d.update(fallback=1)
        return d

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pool.shutdown(wait=True)


def _open(path: Any, flags: int, mode: int, dir_fd: int | None) -> int:
    return os.open(path, flags, mode, dir_fd=dir_fd)


def _stat(path: Any, follow_symlinks: bool) -> os.stat_result:
    return os.stat(path, follow_symlinks=follow_symlinks)


def _blocking_read(fd: int, n: int, offset: int, direct: bool) -> bytes:
    if direct:
        mm = mmap.mmap(-1, (n + PAGE - 1) // PAGE * PAGE)
        try:
            got = os.preadv(fd, [memoryview(mm)[:n]], offset)
            return mm[:got]
        finally:
            mm.close()
    chunks = []
    while n > 0:
        data = os.pread(fd, n, offset)
        if not data:
            break
        chunks.append(data)
        n -= len(data)
        offset += len(data)
    return b"".join(chunks)


def _blocking_write(fd: int, data: bytes, offset: int, direct: bool) -> int:
    total = len(data)
    if direct:
        mm = mmap.mmap(-1, (total + PAGE - 1) // PAGE * PAGE)
        try:
            mm[:total] = data
            view = memoryview(mm)[:total]
            done = 0
            while done < total:
                done += os.pwrite(fd, view[done:], offset + done)
            view.release()
            return total
        finally:
            mm.close()
    done = 0
    while done < total:
        done += os.pwrite(fd, data[done:], offset + done)
    return total


def open_driver(rt: Any) -> UringDriver | ThreadPoolDriver:
    """The best file I/O driver for this runtime: io_uring, else the announced thread pool."""
    reason = None
    if os.environ.get("SHARDIO_NO_URING"):
        reason = "SHARDIO_NO_URING is set"
    else:
        try:
            return UringDriver(rt)
        except OSError as exc:  # ENOSYS (old kernel, not built), EPERM (seccomp), ENOMEM
            reason = f"{type(exc).__name__}: {exc}"
    global _announced_fallback
    with _announce_lock:
        if not _announced_fallback:
            _announced_fallback = True
            log.warning(
                "io_uring unavailable (%s): tame file I/O falls back to a thread pool "
                "(reported as fallback=1 in the driver stats)",
                reason,
            )
    return ThreadPoolDriver(rt)
