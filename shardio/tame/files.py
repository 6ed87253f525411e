"""Tame files: the TameEnv's files, patched ``open`` and the tamed ``os`` file calls.

On a tame stack their I/O goes through the loop's file driver
(``shardio.io.uring``); anywhere else they are the plain blocking calls.
That includes the metadata calls: open, close, fstat/stat, ftruncate,
rename, unlink/rmdir and the fsync of a directory (the ``tame_*`` functions
below, which the TameEnv's filesystem methods use). Left inline: ``lseek``
and the ``fstat`` that routes a tamed ``os.read``/``os.write`` (in-memory
inode reads, paid on every call).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import stat
from collections.abc import Callable
from typing import Any

from .env import DIRECT_ALIGN, check_direct, parse_mode
from .posix_env import PosixFile
from .readiness import ready_now, wait_fd
from .stacks import current_runtime


class TameFile(PosixFile):
    """A file of the TameEnv.

    On a tame stack, reads go through ``preadv2(RWF_NOWAIT)`` then io_uring,
    and writes/fsync through io_uring, using the driver of the loop running
    the caller's stack, and so do open, close, truncate and size. Anywhere
    else (plain threads, the reactor's own coroutines) the calls are
    PosixFile's plain blocking ones. The file position is the kernel's, as
    with PosixFile.
    """

    def __init__(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> None:
        rt = current_runtime()
        if rt is None:
            super().__init__(path, mode, direct=direct)
            return
        flags, self._readable, self._writable, self._append = parse_mode(mode, direct)
        self.name = os.fspath(path)
        self.mode = mode
        self.direct = direct
        self._fd = -1
        self._fd = rt.uring.open(self.name, flags, 0o666)

    def pread(self, n: int, offset: int) -> bytes:
        rt = current_runtime()
        if rt is None:
            return super().pread(n, offset)
        fd = self._check(read=True)
        if self.direct:
            check_direct(n, offset)
        return rt.uring.read(fd, n, offset, self.direct)  # type: ignore[no-any-return]

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        rt = current_runtime()
        if rt is None:
            return super().pwrite(data, offset)
        fd = self._check(write=True)
        if self.direct:
            check_direct(memoryview(data).nbytes, offset)
        return rt.uring.write(fd, data, offset, self.direct)  # type: ignore[no-any-return]

    def read(self, n: int = -1) -> bytes:
        if current_runtime() is None:
            return super().read(n)
        fd = self._check(read=True)
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        if n < 0:
            n = max(0, self.size() - pos)
            if self.direct:
                n = (n + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
        data = self.pread(n, pos)
        os.lseek(fd, pos + len(data), os.SEEK_SET)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if current_runtime() is None:
            return super().write(data)
        fd = self._check(write=True)
        if self._append:
            n = self.pwrite(data, 0)  # O_APPEND: the kernel appends, whatever the offset
            os.lseek(fd, 0, os.SEEK_END)
            return n
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        n = self.pwrite(data, pos)
        os.lseek(fd, pos + n, os.SEEK_SET)
        return n

    def fsync(self) -> None:
        rt = current_runtime()
        if rt is None:
            return super().fsync()
        rt.uring.fsync(self._check(), False)

    def fdatasync(self) -> None:
        rt = current_runtime()
        if rt is None:
            return super().fdatasync()
        rt.uring.fsync(self._check(), True)

    def truncate(self, size: int) -> None:
        rt = current_runtime()
        if rt is None:
            return super().truncate(size)
        rt.uring.ftruncate(self._check(write=True), size)
        return None

    def size(self) -> int:
        rt = current_runtime()
        if rt is None:
            return super().size()
        return rt.uring.stat(self._check()).st_size  # type: ignore[no-any-return]

    def close(self) -> None:
        rt = current_runtime()
        if rt is None:
            return super().close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            rt.uring.close_fd(fd)
        return None


class TameRawFile(io.RawIOBase):
    """A raw file (FileIO's role) whose I/O goes through io_uring on a tame stack.

    Positional reads/writes at a Python-side position (like FileIO's use of
    the kernel position, but without an lseek per call); plain os.pread/
    os.pwrite off a stack.
    """

    def __init__(
        self,
        file: str | bytes | os.PathLike[Any],
        mode: str = "r",
        closefd: bool = True,
        opener: Callable[..., int] | None = None,
    ) -> None:
        super().__init__()
        self._fd = -1
        plus = "+" in mode
        self._readable = "r" in mode or plus
        self._writable = any(c in mode for c in "wax") or plus
        self._append = "a" in mode
        if "x" in mode:
            flags = os.O_EXCL | os.O_CREAT
        elif "r" in mode:
            flags = 0
        elif "w" in mode:
            flags = os.O_CREAT | os.O_TRUNC
        else:
            flags = os.O_CREAT | os.O_APPEND
        flags |= os.O_RDWR if plus else (os.O_RDONLY if mode == "r" else os.O_WRONLY)
        flags |= os.O_CLOEXEC
        self.name = file
        self._closefd = closefd
        if opener is not None:
            self._fd = opener(file, flags)
        else:
            self._fd = tame_os_open(file, flags, 0o666)
        self._pos = _fstat(self._fd).st_size if self._append else 0
        self._mode = (
            "xb" if "x" in mode else "ab" if self._append else "rb" if "r" in mode else "wb"
        ) + ("+" if plus else "")

    @property
    def mode(self) -> str:
        return self._mode

    def _check_open(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed file")
        return self._fd

    def readable(self) -> bool:
        self._check_open()
        return self._readable

    def writable(self) -> bool:
        self._check_open()
        return self._writable

    def seekable(self) -> bool:
        self._check_open()
        return True

    def fileno(self) -> int:
        return self._check_open()

    def isatty(self) -> bool:
        return os.isatty(self._check_open())

    def readinto(self, b: Any) -> int:
        fd = self._check_open()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        view = memoryview(b).cast("B")
        rt = current_runtime()
        data = (
            rt.uring.read(fd, len(view), self._pos)
            if rt is not None
            else os.pread(fd, len(view), self._pos)
        )
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        fd = self._check_open()
        chunks = []
        while True:
            want = max(_fstat(fd).st_size - self._pos, 0) or io.DEFAULT_BUFFER_SIZE
            buf = bytearray(want)
            n = self.readinto(buf)
            if not n:
                return b"".join(chunks)
            chunks.append(bytes(buf[:n]))

    def write(self, b: Any) -> int:
        fd = self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        rt = current_runtime()
        view = memoryview(b).cast("B")
        if rt is not None:
            n = rt.uring.write(fd, view, self._pos)  # O_APPEND: the kernel appends
        else:
            n = 0
            while n < len(view):
                n += os.pwrite(fd, view[n:], self._pos + n)
        # after an append, the end of the file (lseek: no second ring round trip)
        self._pos = os.lseek(fd, 0, os.SEEK_END) if self._append else self._pos + n
        return n  # type: ignore[no-any-return]

    def seek(self, pos: int, whence: int = 0) -> int:
        fd = self._check_open()
        if whence == os.SEEK_SET:
            new = pos
        elif whence == os.SEEK_CUR:
            new = self._pos + pos
        elif whence == os.SEEK_END:
            new = _fstat(fd).st_size + pos
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if new < 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        self._pos = new
        return new

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        fd = self._check_open()
        if size is None:
            size = self._pos
        rt = current_runtime()
        if rt is None:
            os.ftruncate(fd, size)
        else:
            rt.uring.ftruncate(fd, size)
        return size

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                super().close()
            finally:
                if self._closefd:
                    tame_os_close(fd)
        else:
            super().close()

    def __repr__(self) -> str:
        return f"<TameRawFile name={self.name!r} mode={self._mode!r}>"


_real_open = builtins.open


def tame_open(
    file: Any,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[..., int] | None = None,
) -> Any:
    """builtins.open for tame stacks (io's buffered/text layers over TameRawFile)."""
    if isinstance(file, int) or not _is_regular_or_new(file):
        return _real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    modes = set(mode)
    if modes - set("axrwb+t") or len(mode) > len(modes):
        raise ValueError(f"invalid mode: {mode!r}")
    creating, reading, writing, appending = "x" in modes, "r" in modes, "w" in modes, "a" in modes
    updating, text, binary = "+" in modes, "t" in modes, "b" in modes
    if text and binary:
        raise ValueError("can't have text and binary mode at once")
    if creating + reading + writing + appending > 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    if not (creating or reading or writing or appending):
        raise ValueError(
            "Must have exactly one of create/read/write/append mode and at most one plus"
        )
    if binary and (encoding is not None or errors is not None or newline is not None):
        raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
    rawmode = (
        ("x" if creating else "")
        + ("r" if reading else "")
        + ("w" if writing else "")
        + ("a" if appending else "")
        + ("+" if updating else "")
    )
    raw = TameRawFile(file, rawmode, closefd, opener)
    result: Any = raw
    try:
        line_buffering = False
        if buffering == 1 or (buffering < 0 and raw.isatty()):
            buffering = -1
            line_buffering = True
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
            try:
                bs = _fstat(raw.fileno()).st_blksize
                if bs > 1:
                    buffering = bs
            except OSError:
                pass
        if buffering == 0:
            if binary:
                return result
            raise ValueError("can't have unbuffered text I/O")
        if updating:
            buffer: Any = io.BufferedRandom(raw, buffering)
        elif creating or writing or appending:
            buffer = io.BufferedWriter(raw, buffering)
        else:
            buffer = io.BufferedReader(raw, buffering)
        result = buffer
        if binary:
            return result
        text_io = io.TextIOWrapper(
            buffer, io.text_encoding(encoding), errors, newline, line_buffering
        )
        result = text_io
        text_io.mode = mode  # type: ignore[misc]
        return result
    except BaseException:
        result.close()
        raise


def _is_regular_or_new(file: Any) -> bool:
    try:
        return stat.S_ISREG(tame_stat(file).st_mode)
    except FileNotFoundError:
        return True  # will be created as a regular file (or fail like open does)
    except (OSError, TypeError, ValueError):
        return False


def _seekable_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def tame_os_read(fd: int, n: int) -> bytes:
    rt = current_runtime()
    if _seekable_regular(fd):
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        data: bytes = rt.uring.read(fd, n, pos, _is_direct(fd))
        os.lseek(fd, pos + len(data), os.SEEK_SET)
        return data
    if not ready_now(fd, False):
        wait_fd(fd, False)
    return os.read(fd, n)


def tame_os_write(fd: int, data: Any) -> int:
    rt = current_runtime()
    if _seekable_regular(fd):
        if _fd_appends(fd):
            n: int = rt.uring.write(fd, data, 0)
            os.lseek(fd, 0, os.SEEK_END)
            return n
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        n = rt.uring.write(fd, data, pos, _is_direct(fd))
        os.lseek(fd, pos + n, os.SEEK_SET)
        return n
    if not ready_now(fd, True):
        wait_fd(fd, True)
    return os.write(fd, data)


def _fd_appends(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def tame_os_pread(fd: int, n: int, offset: int) -> bytes:
    return current_runtime().uring.read(fd, n, offset, _is_direct(fd))  # type: ignore[no-any-return]


def tame_os_pwrite(fd: int, data: Any, offset: int) -> int:
    return current_runtime().uring.write(fd, data, offset, _is_direct(fd))  # type: ignore[no-any-return]


def tame_os_fsync(fd: Any) -> None:
    if not isinstance(fd, int):
        fd = fd.fileno()
    current_runtime().uring.fsync(fd, False)


def tame_os_fdatasync(fd: Any) -> None:
    if not isinstance(fd, int):
        fd = fd.fileno()
    current_runtime().uring.fsync(fd, True)


# -- metadata: through the driver on a tame stack, the os call elsewhere ----------


def _fstat(fd: int) -> os.stat_result:
    rt = current_runtime()
    return os.fstat(fd) if rt is None else rt.uring.stat(fd)


def tame_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """os.open, through the driver on a tame stack."""
    rt = current_runtime()
    if rt is None:
        return os.open(path, flags, mode, dir_fd=dir_fd)
    return rt.uring.open(path, flags, mode, dir_fd)  # type: ignore[no-any-return]


def tame_os_close(fd: int) -> None:
    """os.close, through the driver on a tame stack."""
    rt = current_runtime()
    if rt is None:
        os.close(fd)
    else:
        rt.uring.close_fd(fd)


def tame_stat(path: Any, follow_symlinks: bool = True) -> os.stat_result:
    """os.stat (an int is an fd: os.fstat), through the driver on a tame stack."""
    rt = current_runtime()
    if rt is None:
        return os.stat(path, follow_symlinks=follow_symlinks)
    return rt.uring.stat(path, follow_symlinks)  # type: ignore[no-any-return]


def tame_replace(src: Any, dst: Any) -> None:
    """os.replace, through the driver on a tame stack."""
    rt = current_runtime()
    if rt is None:
        os.replace(src, dst)
    else:
        rt.uring.rename(src, dst)


def tame_unlink(path: Any, rmdir: bool = False) -> None:
    """os.unlink (os.rmdir with rmdir=True), through the driver on a tame stack."""
    rt = current_runtime()
    if rt is None:
        (os.rmdir if rmdir else os.unlink)(path)
    else:
        rt.uring.unlink(path, rmdir)


def tame_fsync_dir(path: Any) -> None:
    """Open the directory at path, fsync it, close it: all through the driver on a tame stack."""
    fd = tame_os_open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rt = current_runtime()
        if rt is None:
            os.fsync(fd)
        else:
            rt.uring.fsync(fd, False)
    finally:
        tame_os_close(fd)
