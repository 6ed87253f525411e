"""Exclusive use of a directory by one process: an ``flock`` on DIR/LOCK.

The object store and the OSD data directory take this lock while open, so
two writers never share a directory. ``flock`` belongs to the open file, so
the kernel drops it when its holder exits for any reason (``kill -9``
included): a crashed holder never blocks a restart. A second opener fails
at once (``LOCK_NB``) with ``DirectoryLocked``, which names the directory
and the pid the holder wrote into the lock file.

The lock file is opened through an Env, so an Env that simulates a crash
(``shardio.testing.CrashSimulatingEnv``) releases it with every other file
of the crashed "process".
"""

from __future__ import annotations

import errno
import fcntl
import os

from shardio.errors import ShardioError
from shardio.tame import Env, EnvFile

__all__ = ["DirectoryLock", "DirectoryLocked"]


class DirectoryLocked(ShardioError):
    """Another open store or OSD holds this directory (EBUSY).

    ``directory`` is the directory; ``holder_pid`` the pid recorded by the
    holder, or None if it could not be read.
    """

    errno = errno.EBUSY

    def __init__(self, message: str, directory: str = "", holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.directory = directory
        self.holder_pid = holder_pid

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.directory, self.holder_pid))


class DirectoryLock:
    """An flock on ``directory/name``, held until ``release()``: exclusive for a
    writer; ``shared=True`` for readers, which may hold it together (but never
    beside a writer)."""

    def __init__(
        self, env: Env, directory: str, what: str, name: str = "LOCK", *, shared: bool = False
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, name)
        f: EnvFile = env.open(self.path, "a+b")
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(f)
            f.close()
            held = f"process {pid}" if pid is not None else "another process"
            raise DirectoryLocked(
                f"{what} {directory!r} is in use by {held} (it holds {self.path}); "
                "stop that process first, or use another directory",
                directory,
                pid,
            ) from None
        except BaseException:
            f.close()
            raise
        if not shared:  # a reader leaves the writer's pid (the last one) in place
            try:
                f.truncate(0)
                f.pwrite(f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                f.close()
                raise
        self._file: EnvFile | None = f

    def release(self) -> None:
        """Drop the lock (idempotent). The pid stays in the file: the next holder overwrites it."""
        f, self._file = self._file, None
        if f is not None:
            f.close()

    @property
    def held(self) -> bool:
        """True until release()."""
        return self._file is not None

    def __repr__(self) -> str:
        return f"<DirectoryLock {self.path!r} {'held' if self.held else 'released'}>"


def _holder_pid(f: EnvFile) -> int | None:
    try:
        text = f.pread(32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
