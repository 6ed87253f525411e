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
"""

from __future__ import annotations

import abc
import mmap
import os
import queue
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "DIRECT_ALIGN",
    "Env",
    "EnvFile",
    "PosixEnv",
    "PosixFile",
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
