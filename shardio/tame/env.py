"""The Env: every blocking operation a storage engine may make, behind one object.

This is RocksDB's ``Env``/``port`` idea (see the ceph-devel "tame reactor"
thread): code written against an ``Env`` runs unchanged on plain threads
(``PosixEnv``) and on a shard's tame stacks (``TameEnv``, where every call
yields to the reactor instead of blocking it). Get the right one with
``shardio.tame.env()``; pass it to the engine; never call ``os``/``time``/
``threading``/``socket`` directly from engine code.

The interface (identical in both implementations)
-------------------------------------------------

Files (byte-oriented; text mode is not supported)::

    f = env.open(path, mode="rb", *, direct=False)
        # mode: "r", "r+", "w", "w+", "a", "a+", "x", "x+", each with an optional "b".
        # direct=True opens with O_DIRECT: offsets and sizes must be multiples of
        # env.DIRECT_ALIGN (4096); buffers are aligned internally.
    f.pread(n, offset) -> bytes        # short only at end of file
    f.pwrite(data, offset) -> int      # writes all of data
    f.read(n=-1) -> bytes              # from the file position; -1 = to end of file
    f.write(data) -> int               # at the file position (end of file in "a" modes)
    f.seek(offset, whence=0) -> int; f.tell() -> int
    f.fsync(); f.fdatasync(); f.truncate(size); f.size() -> int
    f.fadvise(offset, length, advice)  # advice: env.FADV_DONTNEED, FADV_WILLNEED, ...
    f.fileno() -> int; f.close(); f.closed; f.name; f.mode
    with env.open(...) as f: ...

Filesystem helpers::

    env.exists(path); env.isdir(path); env.getsize(path); env.stat(path)
    env.listdir(path) -> list[str]
    env.makedirs(path, exist_ok=True); env.remove(path); env.rmdir(path)
    env.rename(src, dst)               # atomic replace (os.replace)
    env.fsync_dir(path)                # make a create/rename/remove durable
    env.fadvise(path, offset=0, length=0, advice=FADV_DONTNEED)

Time::

    env.sleep(seconds); env.monotonic() -> float; env.time() -> float

Synchronization (same semantics as ``threading``/``queue``; the ``TameEnv``
versions are greenlet-aware and belong to one reactor)::

    env.Lock(); env.RLock(); env.Condition(lock=None); env.Event()
    env.Semaphore(value=1); env.BoundedSemaphore(value=1)
    env.Queue(maxsize=0)   # put/get/put_nowait/get_nowait/qsize/empty/full/task_done/join;
                           # raises queue.Empty / queue.Full like queue.Queue

Threads::

    h = env.start_thread(func, *args, name=None, **kwargs)
    h.join(timeout=None) -> None; h.is_alive() -> bool
    h.result(timeout=None)    # join, then return func's value or re-raise its exception

Sockets (``socket.socket``'s API; on a ``TameEnv`` connect/accept/recv/send yield)::

    env.socket(family=AF_INET, type=SOCK_STREAM, proto=0)
    env.create_connection(address, timeout=None)

``PosixEnv`` is the plain blocking implementation over ``os``, ``threading``,
``queue`` and ``socket``: the baseline ``TameEnv`` is measured against.

``TameEnv`` (``tame.env()`` on a tame stack) implements the same interface
by yielding to the reactor:

* files: reads try ``preadv2(RWF_NOWAIT)`` and go to io_uring when the data
  is not cached; writes, fsync and fdatasync go through io_uring (the
  driver of the loop running the calling stack, ``shardio.io.uring``);
  open/close/truncate/stat and the filesystem helpers are short metadata
  calls made inline (fsync_dir goes through io_uring);
* sleep: a loop timer; sockets (``TameSocket``): add_reader/add_writer;
* Lock/RLock/Condition/Event/Semaphore/BoundedSemaphore/Queue: greenlet-aware
  and FIFO, owned by the Env's reactor: from another thread they raise
  ``WrongThreadError``; a wait outside a tame stack of that reactor raises
  ``NotOnTameStack`` (non-waiting calls work from its coroutines too);
* start_thread: another tame call on the same reactor (it holds a pooled
  stack while it runs); ``join`` on a tame stack parks it.

Called anywhere other than a tame stack (a plain thread, a coroutine), the
TameEnv's file, sleep and socket operations are the plain blocking ones,
so an object built with a TameEnv still works, blocking, off the reactor.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import errno
import mmap
import os
import queue
import select as _select
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent

from . import stacks
from .stacks import NotOnTameStack, Parked, Runtime, TameGreenlet

__all__ = [
    "DIRECT_ALIGN",
    "Env",
    "EnvFile",
    "PosixEnv",
    "PosixFile",
    "TameEnv",
    "TameFile",
    "TameSocket",
    "ThreadHandle",
    "parse_mode",
    "posix_env",
]

#: O_DIRECT offsets, sizes and buffers must be multiples of this.
DIRECT_ALIGN = 4096

_MODE_FLAGS = {
    "r": os.O_RDONLY,
    "r+": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "x+": os.O_RDWR | os.O_CREAT | os.O_EXCL,
}


def parse_mode(mode: str, direct: bool = False) -> tuple[int, bool, bool, bool]:
    """Map an ``open()`` mode to ``(os flags, readable, writable, append)``.

    Raises ValueError for text modes or unknown letters: Env files are bytes.
    """
    if "t" in mode:
        raise ValueError(f"Env files are binary; text mode {mode!r} is not supported")
    key = mode.replace("b", "")
    if mode.count("b") > 1 or key not in _MODE_FLAGS:
        raise ValueError(
            f"invalid mode {mode!r}: use r, r+, w, w+, a, a+, x or x+ (optionally with b)"
        )
    flags = _MODE_FLAGS[key] | getattr(os, "O_CLOEXEC", 0)
    if direct:
        flags |= os.O_DIRECT
    readable = key.startswith("r") or "+" in key
    writable = key != "r"
    append = key.startswith("a")
    return flags, readable, writable, append


def check_direct(n: int, offset: int) -> None:
    """Raise ValueError unless (n, offset) are valid for an O_DIRECT transfer."""
    if n % DIRECT_ALIGN or offset % DIRECT_ALIGN:
        raise ValueError(
            f"O_DIRECT transfer of {n} bytes at offset {offset}: both must be "
            f"multiples of {DIRECT_ALIGN}"
        )


def aligned_buffer(n: int) -> mmap.mmap:
    """A page-aligned, zero-filled buffer of at least n bytes (O_DIRECT needs alignment)."""
    size = max(DIRECT_ALIGN, (n + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN)
    return mmap.mmap(-1, size)


class EnvFile(abc.ABC):
    """An open file of an Env. Byte-oriented; positional I/O is the primary API."""

    name: str
    mode: str
    direct: bool

    @abc.abstractmethod
    def pread(self, n: int, offset: int) -> bytes:
        """Read up to n bytes at offset (short only at end of file)."""

    @abc.abstractmethod
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write all of data at offset; return len(data)."""

    @abc.abstractmethod
    def read(self, n: int = -1) -> bytes:
        """Read up to n bytes at the file position (-1: to end of file)."""

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of data at the file position (at end of file in append modes)."""

    @abc.abstractmethod
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the file position; return the new position."""

    @abc.abstractmethod
    def tell(self) -> int:
        """The file position."""

    @abc.abstractmethod
    def fsync(self) -> None:
        """Flush data and metadata to stable storage."""

    @abc.abstractmethod
    def fdatasync(self) -> None:
        """Flush data (and the metadata needed to read it) to stable storage."""

    @abc.abstractmethod
    def truncate(self, size: int) -> None:
        """Set the file's size."""

    @abc.abstractmethod
    def size(self) -> int:
        """The file's current size in bytes."""

    @abc.abstractmethod
    def fadvise(self, offset: int, length: int, advice: int) -> None:
        """posix_fadvise on this file (e.g. FADV_DONTNEED to drop it from the page cache)."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """The OS file descriptor."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the file (idempotent)."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once closed."""

    def __enter__(self) -> EnvFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<{type(self).__name__} {self.name!r} mode={self.mode!r} {state}>"


class ThreadHandle(abc.ABC):
    """A started Env thread: joinable, with its function's outcome."""

    name: str

    @abc.abstractmethod
    def join(self, timeout: float | None = None) -> None:
        """Wait until the thread finishes or timeout seconds pass."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """True until the thread's function has returned or raised."""

    @abc.abstractmethod
    def result(self, timeout: float | None = None) -> Any:
        """Join, then return the function's value or re-raise its exception.

        Raises TimeoutError if the thread is still running after timeout seconds.
        """


class Env(abc.ABC):
    """Every blocking operation foreign code may make. See the module docstring."""

    #: short name: "posix" or "tame"
    name: str = "env"

    DIRECT_ALIGN = DIRECT_ALIGN
    FADV_NORMAL = getattr(os, "POSIX_FADV_NORMAL", 0)
    FADV_RANDOM = getattr(os, "POSIX_FADV_RANDOM", 1)
    FADV_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", 2)
    FADV_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)
    FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)
    FADV_NOREUSE = getattr(os, "POSIX_FADV_NOREUSE", 5)

    # -- files ---------------------------------------------------------------
    @abc.abstractmethod
    def open(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> EnvFile:
        """Open a file (binary). direct=True adds O_DIRECT."""

    # -- filesystem (metadata operations are short; both Envs run them inline) --
    def exists(self, path: str | os.PathLike[str]) -> bool:
        """True if path exists."""
        return os.path.exists(path)

    def isdir(self, path: str | os.PathLike[str]) -> bool:
        """True if path is a directory."""
        return os.path.isdir(path)

    def getsize(self, path: str | os.PathLike[str]) -> int:
        """Size of the file at path in bytes."""
        return os.stat(path).st_size

    def stat(self, path: str | os.PathLike[str]) -> os.stat_result:
        """os.stat(path)."""
        return os.stat(path)

    def listdir(self, path: str | os.PathLike[str] = ".") -> list[str]:
        """Names in directory path (unsorted, like os.listdir)."""
        return os.listdir(path)

    def makedirs(self, path: str | os.PathLike[str], exist_ok: bool = True) -> None:
        """Create path and its parents."""
        os.makedirs(path, exist_ok=exist_ok)

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Remove a file."""
        os.remove(path)

    def rmdir(self, path: str | os.PathLike[str]) -> None:
        """Remove an empty directory."""
        os.rmdir(path)

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        """Atomically rename src to dst, replacing dst (os.replace)."""
        os.replace(src, dst)

    def fsync_dir(self, path: str | os.PathLike[str]) -> None:
        """fsync a directory, making creates/renames/removes in it durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._fsync_fd(fd)
        finally:
            os.close(fd)

    def _fsync_fd(self, fd: int) -> None:
        os.fsync(fd)

    def fadvise(
        self,
        path: str | os.PathLike[str],
        offset: int = 0,
        length: int = 0,
        advice: int | None = None,
    ) -> None:
        """posix_fadvise on the file at path (default FADV_DONTNEED: evict it from the page cache)."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.posix_fadvise(fd, offset, length, self.FADV_DONTNEED if advice is None else advice)
        finally:
            os.close(fd)

    # -- time ----------------------------------------------------------------
    @abc.abstractmethod
    def sleep(self, seconds: float) -> None:
        """Block the caller (not the reactor) for seconds."""

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    def time(self) -> float:
        """time.time()."""
        return time.time()

    # -- synchronization -----------------------------------------------------
    @abc.abstractmethod
    def Lock(self) -> Any:  # noqa: N802 - mirrors threading.Lock
        """A mutual-exclusion lock (threading.Lock semantics)."""

    @abc.abstractmethod
    def RLock(self) -> Any:  # noqa: N802
        """A reentrant lock (threading.RLock semantics)."""

    @abc.abstractmethod
    def Condition(self, lock: Any = None) -> Any:  # noqa: N802
        """A condition variable (threading.Condition semantics)."""

    @abc.abstractmethod
    def Event(self) -> Any:  # noqa: N802
        """An event flag (threading.Event semantics)."""

    @abc.abstractmethod
    def Semaphore(self, value: int = 1) -> Any:  # noqa: N802
        """A counting semaphore (threading.Semaphore semantics)."""

    @abc.abstractmethod
    def BoundedSemaphore(self, value: int = 1) -> Any:  # noqa: N802
        """A semaphore that refuses to be released above its initial value."""

    @abc.abstractmethod
    def Queue(self, maxsize: int = 0) -> Any:  # noqa: N802
        """A FIFO queue (queue.Queue semantics, raising queue.Empty/queue.Full)."""

    # -- threads -------------------------------------------------------------
    @abc.abstractmethod
    def start_thread(
        self, func: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any
    ) -> ThreadHandle:
        """Start func(*args, **kwargs) concurrently; return a joinable handle."""

    # -- sockets -------------------------------------------------------------
    @abc.abstractmethod
    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,  # noqa: A002 - mirrors socket.socket
        proto: int = 0,
    ) -> Any:
        """A socket with socket.socket's API."""

    @abc.abstractmethod
    def create_connection(self, address: tuple[str, int], timeout: float | None = None) -> Any:
        """Connect a TCP socket to address (socket.create_connection semantics)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


# ---------------------------------------------------------------------------
# PosixEnv: plain blocking calls on ordinary threads.
# ---------------------------------------------------------------------------


class PosixFile(EnvFile):
    """A file of the PosixEnv: direct os.* calls on a file descriptor."""

    def __init__(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> None:
        flags, self._readable, self._writable, self._append = parse_mode(mode, direct)
        self.name = os.fspath(path)
        self.mode = mode
        self.direct = direct
        self._fd = os.open(self.name, flags, 0o666)

    def _check(self, write: bool = False, read: bool = False) -> int:
        if self._fd < 0:
            raise ValueError(f"I/O operation on closed file {self.name!r}")
        if write and not self._writable:
            raise OSError(f"file {self.name!r} is not open for writing (mode {self.mode!r})")
        if read and not self._readable:
            raise OSError(f"file {self.name!r} is not open for reading (mode {self.mode!r})")
        return self._fd

    def pread(self, n: int, offset: int) -> bytes:
        fd = self._check(read=True)
        if self.direct:
            check_direct(n, offset)
            buf = aligned_buffer(n)
            try:
                got = os.preadv(fd, [buf], offset)
                return buf[:got]
            finally:
                buf.close()
        chunks = []
        while n > 0:
            data = os.pread(fd, n, offset)
            if not data:
                break
            chunks.append(data)
            n -= len(data)
            offset += len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        fd = self._check(write=True)
        view = memoryview(data).cast("B")
        total = len(view)
        if self.direct:
            check_direct(total, offset)
            buf = aligned_buffer(total)
            try:
                buf[:total] = view
                view = memoryview(buf)[:total]
                return self._pwrite_all(fd, view, offset)
            finally:
                view.release()
                buf.close()
        return self._pwrite_all(fd, view, offset)

    @staticmethod
    def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
        total = len(view)
        done = 0
        while done < total:
            done += os.pwrite(fd, view[done:], offset + done)
        return total

    def read(self, n: int = -1) -> bytes:
        fd = self._check(read=True)
        if self.direct:
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            if n < 0:
                n = max(0, os.fstat(fd).st_size - pos)
                n = (n + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
            data = self.pread(n, pos)
            os.lseek(fd, pos + len(data), os.SEEK_SET)
            return data
        if n < 0:
            chunks = []
            while True:
                data = os.read(fd, 1 << 20)
                if not data:
                    return b"".join(chunks)
                chunks.append(data)
        chunks = []
        while n > 0:
            data = os.read(fd, n)
            if not data:
                break
            chunks.append(data)
            n -= len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        fd = self._check(write=True)
        view = memoryview(data).cast("B")
        if self.direct:
            pos = os.fstat(fd).st_size if self._append else os.lseek(fd, 0, os.SEEK_CUR)
            n = self.pwrite(view, pos)
            os.lseek(fd, pos + n, os.SEEK_SET)
            return n
        total = len(view)
        done = 0
        while done < total:
            done += os.write(fd, view[done:])
        return total

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._check(), offset, whence)

    def tell(self) -> int:
        return os.lseek(self._check(), 0, os.SEEK_CUR)

    def fsync(self) -> None:
        os.fsync(self._check())

    def fdatasync(self) -> None:
        os.fdatasync(self._check())

    def truncate(self, size: int) -> None:
        os.ftruncate(self._check(write=True), size)

    def size(self) -> int:
        return os.fstat(self._check()).st_size

    def fadvise(self, offset: int, length: int, advice: int) -> None:
        os.posix_fadvise(self._check(), offset, length, advice)

    def fileno(self) -> int:
        return self._check()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


class PosixThreadHandle(ThreadHandle):
    """A threading.Thread running func, with its outcome kept for result()."""

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None,
    ) -> None:
        self._func = func
        self._args = args
        self._kwargs = kwargs
        self._value: Any = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.name = self._thread.name

    def _run(self) -> None:
        try:
            self._value = self._func(*self._args, **self._kwargs)
        except BaseException as exc:  # kept for result(); threads have no caller
            self._exc = exc
        finally:
            del self._func, self._args, self._kwargs

    def start(self) -> PosixThreadHandle:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"thread {self.name!r} still running after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._value

    def __repr__(self) -> str:
        return f"<PosixThreadHandle {self.name!r} alive={self.is_alive()}>"


class PosixEnv(Env):
    """The plain blocking Env: os, threading, queue and socket, unchanged."""

    name = "posix"

    def open(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> PosixFile:
        return PosixFile(path, mode, direct=direct)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def Lock(self) -> Any:  # noqa: N802
        return threading.Lock()

    def RLock(self) -> Any:  # noqa: N802
        return threading.RLock()

    def Condition(self, lock: Any = None) -> Any:  # noqa: N802
        return threading.Condition(lock)

    def Event(self) -> Any:  # noqa: N802
        return threading.Event()

    def Semaphore(self, value: int = 1) -> Any:  # noqa: N802
        return threading.Semaphore(value)

    def BoundedSemaphore(self, value: int = 1) -> Any:  # noqa: N802
        return threading.BoundedSemaphore(value)

    def Queue(self, maxsize: int = 0) -> Any:  # noqa: N802
        return queue.Queue(maxsize)

    def start_thread(
        self, func: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any
    ) -> PosixThreadHandle:
        return PosixThreadHandle(func, args, kwargs, name).start()

    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,  # noqa: A002
        proto: int = 0,
    ) -> _socket.socket:
        return _socket.socket(family, type, proto)

    def create_connection(
        self, address: tuple[str, int], timeout: float | None = None
    ) -> _socket.socket:
        if timeout is None:
            return _socket.create_connection(address)
        return _socket.create_connection(address, timeout)


#: The process-wide PosixEnv (it has no state).
posix_env = PosixEnv()


# ---------------------------------------------------------------------------
# TameEnv: the same interface, yielding to the reactor on a tame stack.
# ---------------------------------------------------------------------------


def _stack_runtime() -> Runtime | None:
    """The runtime of the tame stack running the caller, else None."""
    g = getcurrent()
    return g.rt if type(g) is TameGreenlet else None


class TameFile(PosixFile):
    """A file of the TameEnv.

    On a tame stack, reads go through ``preadv2(RWF_NOWAIT)`` then io_uring,
    and writes/fsync through io_uring, using the driver of the loop running
    the caller's stack. Anywhere else (plain threads, the reactor's own
    coroutines) the calls are PosixFile's plain blocking ones. The file
    position is the kernel's, as with PosixFile. open/close/truncate/fstat
    are short metadata calls made inline.
    """

    def pread(self, n: int, offset: int) -> bytes:
        rt = _stack_runtime()
        if rt is None:
            return super().pread(n, offset)
        fd = self._check(read=True)
        if self.direct:
            check_direct(n, offset)
        return rt.uring.read(fd, n, offset, self.direct)  # type: ignore[no-any-return]

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        rt = _stack_runtime()
        if rt is None:
            return super().pwrite(data, offset)
        fd = self._check(write=True)
        if self.direct:
            check_direct(memoryview(data).nbytes, offset)
        return rt.uring.write(fd, data, offset, self.direct)  # type: ignore[no-any-return]

    def read(self, n: int = -1) -> bytes:
        if _stack_runtime() is None:
            return super().read(n)
        fd = self._check(read=True)
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        if n < 0:
            n = max(0, os.fstat(fd).st_size - pos)
            if self.direct:
                n = (n + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
        data = self.pread(n, pos)
        os.lseek(fd, pos + len(data), os.SEEK_SET)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if _stack_runtime() is None:
            return super().write(data)
        fd = self._check(write=True)
        if self._append:
            n = self.pwrite(data, os.fstat(fd).st_size)  # O_APPEND: the kernel appends
            os.lseek(fd, 0, os.SEEK_END)
            return n
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        n = self.pwrite(data, pos)
        os.lseek(fd, pos + n, os.SEEK_SET)
        return n

    def fsync(self) -> None:
        rt = _stack_runtime()
        if rt is None:
            return super().fsync()
        rt.uring.fsync(self._check(), False)

    def fdatasync(self) -> None:
        rt = _stack_runtime()
        if rt is None:
            return super().fdatasync()
        rt.uring.fsync(self._check(), True)


class _Waiter:
    __slots__ = ("p", "granted")

    def __init__(self, p: Parked) -> None:
        self.p = p
        self.granted = False


class _TameSync:
    """Base of the greenlet-aware primitives: FIFO waiters, owner-reactor checks."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def _check(self) -> None:
        if threading.get_ident() != self._rt.thread_id:
            self._rt.check_thread(f"tame {type(self).__name__.removeprefix('Tame')}")

    def _block(
        self, timeout: float | None, what: str, q: collections.deque[_Waiter] | None = None
    ) -> bool:
        """Park the calling stack in q until granted (True) or timeout seconds pass (False)."""
        g = getcurrent()
        if type(g) is not TameGreenlet or g.rt is not self._rt:
            where = (
                "a tame stack of another reactor"
                if type(g) is TameGreenlet
                else "outside a tame stack"
            )
            raise NotOnTameStack(
                f"{what} would block, and it was called {where}: only code running on a tame stack "
                "of the reactor that owns this object may wait on it (run it with `await tame.call(...)`)"
            )
        if timeout is not None and timeout <= 0:
            return False
        if q is None:
            q = self._waiters
        w = _Waiter(Parked())
        q.append(w)
        timer = None if timeout is None else self._rt.loop.call_later(timeout, w.p.wake)
        try:
            w.p.park()
        except BaseException:
            if w.granted:
                self._lost_grant(q)
            else:
                _discard(q, w)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not w.granted:
            _discard(q, w)
        return w.granted

    @staticmethod
    def _grant(q: collections.deque[_Waiter]) -> _Waiter | None:
        """Wake the oldest waiter of q as granted; return it (None if q is empty)."""
        while q:
            w = q.popleft()
            if w.p.armed:
                w.granted = True
                w.p.wake_soon()
                return w
        return None

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        """A granted waiter died (cancelled) before using its grant: pass it on."""
        self._grant(q)


def _discard(q: collections.deque[_Waiter], w: _Waiter) -> None:
    try:
        q.remove(w)
    except ValueError:
        pass


class TameLock(_TameSync):
    """threading.Lock for tame stacks: FIFO hand-off, waiting yields to the reactor."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self._locked = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self._check()
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if not self._locked and not self._waiters:
            self._locked = True
            return True
        if not blocking:
            return False
        return self._block(None if timeout < 0 else timeout, "Lock.acquire")

    def release(self) -> None:
        self._check()
        if not self._locked:
            raise RuntimeError("release unlocked lock")
        if self._grant(self._waiters) is None:
            self._locked = False

    def locked(self) -> bool:
        return self._locked

    _lost_grant = lambda self, q: self.release()  # noqa: E731 - the grant was the lock itself

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    # Condition support
    def _is_owned(self) -> bool:
        return self._locked

    def _release_save(self) -> None:
        self.release()

    def _acquire_restore(self, state: None) -> None:
        self.acquire()

    def __repr__(self) -> str:
        return (
            f"<tame Lock {'locked' if self._locked else 'unlocked'} waiters={len(self._waiters)}>"
        )


class TameRLock(_TameSync):
    """threading.RLock for tame stacks; the owner is the tame stack (greenlet)."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self._owner: Any = None
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self._check()
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        me = getcurrent()
        if self._owner is me:
            self._count += 1
            return True
        if self._owner is None and not self._waiters:
            self._owner, self._count = me, 1
            return True
        if not blocking:
            return False
        return self._block(None if timeout < 0 else timeout, "RLock.acquire")

    def release(self) -> None:
        self._check()
        if self._owner is not getcurrent():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if not self._count:
            self._hand_off()

    def _hand_off(self) -> None:
        w = self._grant(self._waiters)
        if w is None:
            self._owner = None
        else:
            self._owner, self._count = w.p.g, 1

    def _grant(self, q: collections.deque[_Waiter]) -> _Waiter | None:  # type: ignore[override]
        while q:
            w = q.popleft()
            g = w.p.g
            if g is not None:
                w.granted = True
                w.p.wake_soon()
                self._owner, self._count = g, 1
                return w
        return None

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        self._hand_off()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._owner is getcurrent()

    def _release_save(self) -> tuple[int, Any]:
        state = (self._count, self._owner)
        self._count = 0
        self._hand_off()
        return state

    def _acquire_restore(self, state: tuple[int, Any]) -> None:
        self.acquire()
        self._count = state[0]

    def __repr__(self) -> str:
        return (
            f"<tame RLock owner={self._owner!r} count={self._count} waiters={len(self._waiters)}>"
        )


class TameCondition(_TameSync):
    """threading.Condition for tame stacks (over a tame Lock or RLock)."""

    def __init__(self, rt: Runtime, lock: TameLock | TameRLock | None = None) -> None:
        super().__init__(rt)
        if lock is None:
            lock = TameRLock(rt)
        elif not isinstance(lock, TameLock | TameRLock):
            raise TypeError(
                f"a tame Condition needs a tame lock (env.Lock() or env.RLock()), not {lock!r}: "
                "waiting on a real threading lock would block the whole reactor"
            )
        self._lock = lock
        self.acquire = lock.acquire
        self.release = lock.release

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        self._check()
        if not self._lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        state = self._lock._release_save()
        try:
            return self._block(timeout, "Condition.wait")
        finally:
            self._lock._acquire_restore(state)  # type: ignore[arg-type]

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = time.monotonic() + waittime
                else:
                    waittime = endtime - time.monotonic()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        self._check()
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        for _ in range(n):
            if self._grant(self._waiters) is None:
                break

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


class TameEvent(_TameSync):
    """threading.Event for tame stacks."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._check()
        self._flag = True
        while self._grant(self._waiters) is not None:
            pass

    def clear(self) -> None:
        self._check()
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        self._check()
        if self._flag:
            return True
        return self._block(timeout, "Event.wait") or self._flag

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        pass  # every waiter was woken anyway


class TameSemaphore(_TameSync):
    """threading.Semaphore for tame stacks (FIFO: a release hands the unit to the oldest waiter)."""

    def __init__(self, rt: Runtime, value: int = 1) -> None:
        super().__init__(rt)
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._value = value

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        self._check()
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        if self._value > 0 and not self._waiters:
            self._value -= 1
            return True
        if not blocking:
            return False
        return self._block(timeout, "Semaphore.acquire")

    def release(self, n: int = 1) -> None:
        self._check()
        if n < 1:
            raise ValueError("n must be one or more")
        for _ in range(n):
            if self._grant(self._waiters) is None:
                self._value += 1

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        self.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


class TameBoundedSemaphore(TameSemaphore):
    """threading.BoundedSemaphore for tame stacks."""

    def __init__(self, rt: Runtime, value: int = 1) -> None:
        super().__init__(rt, value)
        self._initial = value

    def release(self, n: int = 1) -> None:
        self._check()
        if n < 1:
            raise ValueError("n must be one or more")
        if self._value + n > self._initial:
            raise ValueError("Semaphore released too many times")
        super().release(n)


class TameQueue(_TameSync):
    """queue.Queue for tame stacks (raises queue.Empty / queue.Full)."""

    def __init__(self, rt: Runtime, maxsize: int = 0) -> None:
        super().__init__(rt)
        self.maxsize = maxsize
        self._items: collections.deque[Any] = collections.deque()
        self._getters: collections.deque[_Waiter] = collections.deque()
        self._putters: collections.deque[_Waiter] = collections.deque()
        self._joiners: collections.deque[_Waiter] = collections.deque()
        self.unfinished_tasks = 0

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def _wait_while(
        self,
        cond: Callable[[], bool],
        q: collections.deque[_Waiter],
        block: bool,
        timeout: float | None,
        what: str,
        exc: type[Exception],
    ) -> None:
        if not cond():
            return
        if not block:
            raise exc
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        deadline = None if timeout is None else time.monotonic() + timeout
        while cond():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise exc
            self._block(remaining, what, q)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._check()
        self._wait_while(self.full, self._putters, block, timeout, "Queue.put", queue.Full)
        self._items.append(item)
        self.unfinished_tasks += 1
        self._grant(self._getters)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self._check()
        self._wait_while(self.empty, self._getters, block, timeout, "Queue.get", queue.Empty)
        item = self._items.popleft()
        self._grant(self._putters)
        return item

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def task_done(self) -> None:
        self._check()
        if self.unfinished_tasks <= 0:
            raise ValueError("task_done() called too many times")
        self.unfinished_tasks -= 1
        if not self.unfinished_tasks:
            while self._grant(self._joiners) is not None:
                pass

    def join(self) -> None:
        self._check()
        while self.unfinished_tasks:
            self._block(None, "Queue.join", self._joiners)


class TameThreadHandle(ThreadHandle):
    """A 'thread' of the TameEnv: a tame call running as a task of the same reactor."""

    _counter = 0

    def __init__(
        self,
        rt: Runtime,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None,
    ) -> None:
        rt.check_thread("TameEnv.start_thread")
        TameThreadHandle._counter += 1
        self.name = name or f"tame-thread-{TameThreadHandle._counter}"
        self._rt = rt
        self._task = rt.loop.create_task(stacks.call(func, *args, **kwargs), name=self.name)

    def join(self, timeout: float | None = None) -> None:
        task = self._task
        if task.done():
            return
        self._rt.check_thread("a tame thread handle")
        g = getcurrent()
        if type(g) is not TameGreenlet or g.rt is not self._rt:
            raise NotOnTameStack(
                "join() on a running tame thread would block the reactor; call it from a tame stack "
                "of the same reactor, or await the thread's task from async code"
            )
        p = Parked()

        def done(_t: Any) -> None:
            p.wake()

        task.add_done_callback(done)
        timer = None if timeout is None else self._rt.loop.call_later(max(0.0, timeout), p.wake)
        try:
            p.park()
        finally:
            task.remove_done_callback(done)
            if timer is not None:
                timer.cancel()

    def is_alive(self) -> bool:
        return not self._task.done()

    def result(self, timeout: float | None = None) -> Any:
        self.join(timeout)
        if not self._task.done():
            raise TimeoutError(f"tame thread {self.name!r} still running after {timeout} s")
        return self._task.result()

    @property
    def task(self) -> asyncio.Task[Any]:
        """The asyncio task running the thread (await it from async code)."""
        return self._task

    def __repr__(self) -> str:
        return f"<TameThreadHandle {self.name!r} alive={self.is_alive()}>"


def _is_ip_literal(host: Any) -> bool:
    if not isinstance(host, str):
        return False
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, host.split("%", 1)[0])
            return True
        except (OSError, ValueError):
            pass
    return False


def tame_getaddrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[Any]:  # noqa: A002
    """socket.getaddrinfo; on a tame stack the lookup runs off the reactor (loop.getaddrinfo)."""
    rt = _stack_runtime()
    if rt is None or host is None or _is_ip_literal(host):
        return _socket.getaddrinfo(host, port, family, type, proto, flags)
    return stacks.wait(
        rt.loop.getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
    )  # type: ignore[no-any-return]


_SENTINEL: Any = object()


class TameSocket:
    """A socket whose blocking calls yield to the reactor on a tame stack.

    Wraps a non-blocking ``socket.socket``; recv/recv_into/recvfrom/send/
    sendall/sendto/connect/accept wait with ``loop.add_reader``/``add_writer``
    on a tame stack and with ``select`` elsewhere, honouring settimeout().
    Every other attribute is the wrapped socket's. One socket should be read
    (or written) by one stack at a time: the loop keeps one reader and one
    writer callback per fd.
    """

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._timeout: float | None = sock.gettimeout()
        sock.setblocking(False)

    @classmethod
    def create(
        cls,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
        proto: int = 0,
        fileno: int | None = None,
    ) -> TameSocket:  # noqa: A002
        return cls(_socket.socket(family, type, proto, fileno))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def _wait(self, write: bool) -> None:
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "Bad file descriptor")
        rt = _stack_runtime()
        if rt is None:
            r, w, _ = _select.select(
                [] if write else [fd], [fd] if write else [], [], self._timeout
            )
            if not (r or w):
                raise TimeoutError("timed out")
            return
        loop = rt.loop
        p = Parked()
        if write:
            loop.add_writer(fd, p.wake, True)
        else:
            loop.add_reader(fd, p.wake, True)
        timer = None if self._timeout is None else loop.call_later(self._timeout, p.wake, False)
        try:
            ok = p.park()
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
        if not ok:
            raise TimeoutError("timed out")

    def _io(self, write: bool, fn: Callable[..., Any], *args: Any) -> Any:
        while True:
            try:
                return fn(*args)
            except (BlockingIOError, InterruptedError):
                if self._timeout == 0.0:
                    raise
            self._wait(write)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self._io(False, self._sock.recv, bufsize, flags)  # type: ignore[no-any-return]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self._io(False, self._sock.recv_into, buffer, nbytes, flags)  # type: ignore[no-any-return]

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        return self._io(False, self._sock.recvfrom, bufsize, flags)  # type: ignore[no-any-return]

    def send(self, data: Any, flags: int = 0) -> int:
        return self._io(True, self._sock.send, data, flags)  # type: ignore[no-any-return]

    def sendto(self, data: Any, *args: Any) -> int:
        return self._io(True, self._sock.sendto, data, *args)  # type: ignore[no-any-return]

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = self.send(view, flags)
            view = view[sent:]

    def connect(self, address: Any) -> None:
        err = self.connect_ex(address)
        if err:
            raise OSError(err, os.strerror(err))

    def connect_ex(self, address: Any) -> int:
        if (
            isinstance(address, tuple)
            and self._sock.family in (_socket.AF_INET, _socket.AF_INET6)
            and not _is_ip_literal(address[0])
        ):
            infos = tame_getaddrinfo(address[0], address[1], self._sock.family, self._sock.type)
            address = infos[0][4]
        err = self._sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            if self._timeout == 0.0:
                return err
            self._wait(True)
            err = self._sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        return err

    def accept(self) -> tuple[TameSocket, Any]:
        conn, addr = self._io(False, self._sock.accept)
        tconn = TameSocket(conn)
        tconn._timeout = self._timeout if self._timeout != 0.0 else None
        return tconn, addr

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """socket.makefile over this tame socket (e.g. for http.client)."""
        import io as _io

        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing, reading, binary = "w" in mode, "r" in mode or "w" not in mode, "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = _socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = _io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = _io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = _io.BufferedReader(raw, buffering)
        else:
            buffer = _io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = _io.TextIOWrapper(buffer, encoding, errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:  # called by socket.SocketIO.close
        pass

    def close(self) -> None:
        self._sock.close()

    def detach(self) -> int:
        return self._sock.detach()

    def __enter__(self) -> TameSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TameSocket {self._sock!r}>"


def tame_create_connection(
    address: tuple[str, int],
    timeout: Any = _SENTINEL,
    source_address: Any = None,
    *,
    all_errors: bool = False,
) -> TameSocket:
    """socket.create_connection returning a TameSocket (yields on a tame stack)."""
    host, port = address[0], address[1]
    errors: list[OSError] = []
    for family, type_, proto, _canon, sa in tame_getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = None
        try:
            sock = TameSocket.create(family, type_, proto)
            if timeout is not _SENTINEL:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sa)
            return sock
        except OSError as exc:
            errors.append(exc)
            if sock is not None:
                sock.close()
    if not errors:
        raise OSError(f"getaddrinfo returned an empty list for {host!r}")
    if all_errors:
        raise ExceptionGroup("create_connection failed", errors)
    raise errors[0]


class TameEnv(Env):
    """The Env of one reactor's tame stacks. See the module docstring.

    Files, sleep and sockets yield when called on a tame stack (any
    reactor's: they use the loop running the caller) and are plain blocking
    calls anywhere else. Locks, conditions, events, semaphores and queues
    belong to this Env's reactor: using them from another thread raises
    ``WrongThreadError``, and waiting on them outside a tame stack of that
    reactor raises ``NotOnTameStack`` (non-waiting calls such as release,
    set, put_nowait work from the reactor's coroutines too).
    """

    name = "tame"

    def __init__(self, rt: Runtime) -> None:
        self.runtime = rt

    def open(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> TameFile:
        return TameFile(path, mode, direct=direct)

    def _fsync_fd(self, fd: int) -> None:
        rt = _stack_runtime()
        if rt is None:
            os.fsync(fd)
        else:
            rt.uring.fsync(fd, False)

    def sleep(self, seconds: float) -> None:
        g = getcurrent()
        if type(g) is not TameGreenlet:
            time.sleep(seconds)
            return
        rt = g.rt
        # The timer handle is the wake-up token: cancelled on any early exit
        # (cancellation), so it can only fire while this stack sleeps here.
        if seconds > 0:
            handle = rt.loop.call_later(seconds, g.switch)
        else:
            handle = rt.loop.call_soon(g.switch)
        try:
            rt.hub.switch(stacks._BLOCKED)
        except BaseException:
            handle.cancel()
            raise

    def Lock(self) -> TameLock:  # noqa: N802
        return TameLock(self.runtime)

    def RLock(self) -> TameRLock:  # noqa: N802
        return TameRLock(self.runtime)

    def Condition(self, lock: Any = None) -> TameCondition:  # noqa: N802
        return TameCondition(self.runtime, lock)

    def Event(self) -> TameEvent:  # noqa: N802
        return TameEvent(self.runtime)

    def Semaphore(self, value: int = 1) -> TameSemaphore:  # noqa: N802
        return TameSemaphore(self.runtime, value)

    def BoundedSemaphore(self, value: int = 1) -> TameBoundedSemaphore:  # noqa: N802
        return TameBoundedSemaphore(self.runtime, value)

    def Queue(self, maxsize: int = 0) -> TameQueue:  # noqa: N802
        return TameQueue(self.runtime, maxsize)

    def start_thread(
        self, func: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any
    ) -> TameThreadHandle:
        return TameThreadHandle(self.runtime, func, args, kwargs, name)

    def socket(
        self, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM, proto: int = 0
    ) -> TameSocket:  # noqa: A002
        return TameSocket.create(family, type, proto)

    def create_connection(
        self, address: tuple[str, int], timeout: float | None = None
    ) -> TameSocket:
        return tame_create_connection(address, timeout)

    def __repr__(self) -> str:
        return f"<TameEnv of {self.runtime!r}>"
