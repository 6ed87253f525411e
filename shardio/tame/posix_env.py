"""PosixEnv: the Env over plain blocking os, threading, queue and socket calls.

The baseline TameEnv is measured against, and what the same engine code uses on
ordinary threads.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .env import DIRECT_ALIGN, Env, EnvFile, ThreadHandle, aligned_buffer, check_direct, parse_mode


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
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,  # noqa: A002
        proto: int = 0,
    ) -> socket.socket:
        return socket.socket(family, type, proto)

    def create_connection(
        self, address: tuple[str, int], timeout: float | None = None
    ) -> socket.socket:
        if timeout is None:
            return socket.create_connection(address)
        return socket.create_connection(address, timeout)


#: The process-wide PosixEnv (it has no state).
posix_env = PosixEnv()
