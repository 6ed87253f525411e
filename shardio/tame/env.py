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

This module holds the interface only. The implementations live beside it:
``posix_env`` (PosixEnv), ``tame_env`` (TameEnv), which composes ``files``,
``sync``, ``threads``, ``sockets``, ``readiness`` and ``timers``.
"""

from __future__ import annotations

import abc
import mmap
import os
import socket as _socket
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "DIRECT_ALIGN",
    "Env",
    "EnvFile",
    "ThreadHandle",
    "parse_mode",
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
