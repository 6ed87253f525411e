"""Tame files: the TameEnv's files, patched ``open`` and the tamed ``os`` file calls.

On a tame stack their I/O goes through the loop's file driver
(``shardio.io.uring``); anywhere else they are the plain blocking calls.
All three have the stdlib's position semantics, from one implementation:
``read``/``write`` use and advance the kernel file position, as ``os.read``,
``os.write`` and ``io.FileIO`` do (``_read_at_position`` and
``_write_at_position``); ``pread``/``pwrite`` leave it alone. So a file
object, its ``fileno()`` used with ``os.lseek``/``os.read``, and a patched
``open`` all see the same position, on a stack and off it.

The metadata calls go through the driver too: open, close, fstat/stat,
ftruncate, rename, unlink/rmdir and the fsync of a directory (the ``tame_*``
functions below, which the TameEnv's filesystem methods use). Left inline:
``lseek`` and the ``fstat`` that routes a tamed ``os.read``/``os.write``
(in-memory inode reads, paid on every call), and closing a patched
``open``'s file.
"""

from __future__ import annotations

import builtins
import fcntl
import io
import os
import stat
from collections.abc import Callable
from typing import Any

from .env import DIRECT_ALIGN, check_direct, parse_mode
from .posix_env import PosixFile
from .readiness import ready_now, wait_fd
from .stacks import Runtime, checkpoint, current_runtime


def _read_at_position(rt: Runtime, fd: int, n: int, direct: bool) -> bytes:
    """read(2) through the driver: at the kernel file position, advancing it."""
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    data: bytes = rt.uring.read(fd, n, pos, direct)
    if data:
        os.lseek(fd, pos + len(data), os.SEEK_SET)
    return data


def _write_at_position(rt: Runtime, fd: int, data: Any, append: bool, direct: bool) -> int:
    """write(2) through the driver: at the kernel file position (with O_APPEND at the
    end: the kernel appends whatever offset a write names), advancing it."""
    if append:
        n: int = rt.uring.write(fd, data, 0, direct)
        os.lseek(fd, 0, os.SEEK_END)
        return n
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    n = rt.uring.write(fd, data, pos, direct)
    os.lseek(fd, pos + n, os.SEEK_SET)
    return n


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
        rt = checkpoint()
        if rt is None:
            return super().pread(n, offset)
        # The hot path of every tame read: _check and check_direct only when they raise.
        fd = self._fd
        if fd < 0 or not self._readable:
            self._check(read=True)
        if self.direct:  # one C call on the io_uring driver (Ring.read_direct)
            if n % DIRECT_ALIGN or offset % DIRECT_ALIGN:
                check_direct(n, offset)
            return rt.uring.read_direct(fd, n, offset)  # type: ignore[no-any-return]
        return rt.uring.read(fd, n, offset, False)  # type: ignore[no-any-return]

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        rt = checkpoint()
        if rt is None:
            return super().pwrite(data, offset)
        fd = self._check(write=True)
        if self.direct:
            check_direct(memoryview(data).nbytes, offset)
        return rt.uring.write(fd, data, offset, self.direct)  # type: ignore[no-any-return]

    def read(self, n: int = -1) -> bytes:
        rt = checkpoint()
        if rt is None:
            return super().read(n)
        fd = self._check(read=True)
        if n < 0 or self.direct:
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            if n < 0:
                n = max(0, self.size() - pos)
                if self.direct:
                    n = (n + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
            if self.direct:
                check_direct(n, pos)
        return _read_at_position(rt, fd, n, self.direct)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        rt = checkpoint()
        if rt is None:
            return super().write(data)
        fd = self._check(write=True)
        if self.direct:
            check_direct(memoryview(data).nbytes, os.lseek(fd, 0, os.SEEK_CUR))
        return _write_at_position(rt, fd, data, self._append, self.direct)

    def fsync(self) -> None:
        rt = checkpoint()
        if rt is None:
            return super().fsync()
        rt.uring.fsync(self._check(), False)

    def fdatasync(self) -> None:
        rt = checkpoint()
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


class TameRawFile(io.FileIO):
    """``io.FileIO`` whose reads and writes go through the loop's file driver on a tame
    stack (the raw layer of a patched ``open``).

    Everything else is FileIO's own (opening, modes, ``seek``/``tell``/``truncate``
    on the kernel file position, closing); off a stack, so are reads and writes.
    """

    def __init__(
        self,
        file: str | bytes | os.PathLike[Any] | int,
        mode: str = "r",
        closefd: bool = True,
        opener: Callable[..., int] | None = None,
    ) -> None:
        if opener is None and current_runtime() is not None:
            opener = _driver_opener  # the open(2) through the loop's file driver
        super().__init__(file, mode, closefd, opener)
        flags = fcntl.fcntl(self.fileno(), fcntl.F_GETFL)
        self._appending = bool(flags & os.O_APPEND)
        self._direct = bool(flags & os.O_DIRECT)

    def readinto(self, b: Any) -> int:
        rt = checkpoint()
        if rt is None:
            return super().readinto(b)
        if not self.readable():
            raise io.UnsupportedOperation("File not open for reading")
        view = memoryview(b).cast("B")
        data = _read_at_position(rt, self.fileno(), len(view), self._direct)
        n = len(data)
        view[:n] = data
        return n

    def read(self, size: int | None = -1) -> bytes:
        if checkpoint() is None:
            return super().read(size)
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def readall(self) -> bytes:
        if checkpoint() is None:
            return super().readall()
        fd = self.fileno()
        chunks = []
        while True:
            left = os.fstat(fd).st_size - os.lseek(fd, 0, os.SEEK_CUR)
            chunk = self.read(max(left, io.DEFAULT_BUFFER_SIZE))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def write(self, b: Any) -> int:
        rt = checkpoint()
        if rt is None:
            return super().write(b)  # type: ignore[no-any-return]
        if not self.writable():
            raise io.UnsupportedOperation("File not open for writing")
        view = memoryview(b).cast("B")
        return _write_at_position(rt, self.fileno(), view, self._appending, self._direct)


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
                bs = os.fstat(raw.fileno()).st_blksize
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
        return stat.S_ISREG(os.stat(file).st_mode)
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
    rt = checkpoint()
    if _seekable_regular(fd):
        return _read_at_position(rt, fd, n, _is_direct(fd))  # type: ignore[arg-type]
    if not ready_now(fd, False):
        wait_fd(fd, False)
    return os.read(fd, n)


def tame_os_write(fd: int, data: Any) -> int:
    rt = checkpoint()
    if _seekable_regular(fd):
        return _write_at_position(rt, fd, data, _fd_appends(fd), _is_direct(fd))  # type: ignore[arg-type]
    if not ready_now(fd, True):
        wait_fd(fd, True)
    return os.write(fd, data)


def _fd_appends(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def tame_os_pread(fd: int, n: int, offset: int) -> bytes:
    return checkpoint().uring.read(fd, n, offset, _is_direct(fd))  # type: ignore[no-any-return]


def tame_os_pwrite(fd: int, data: Any, offset: int) -> int:
    return checkpoint().uring.write(fd, data, offset, _is_direct(fd))  # type: ignore[no-any-return]


def tame_os_fsync(fd: Any) -> None:
    if not isinstance(fd, int):
        fd = fd.fileno()
    checkpoint().uring.fsync(fd, False)


def tame_os_fdatasync(fd: Any) -> None:
    if not isinstance(fd, int):
        fd = fd.fileno()
    checkpoint().uring.fsync(fd, True)


# -- metadata: through the driver on a tame stack, the os call elsewhere ----------


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


def _driver_opener(path: Any, flags: int) -> int:
    return tame_os_open(path, flags, 0o666)
