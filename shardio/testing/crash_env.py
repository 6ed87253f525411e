"""An Env that simulates power loss: only what fsync covered survives a crash.

RocksDB's fault-injection Env, for storage code written against
``shardio.tame.Env``. ``CrashSimulatingEnv(inner)`` passes every call to the
real Env ``inner`` (``PosixEnv`` by default; a ``TameEnv`` works too), so the
files are real files on disk, and it remembers what a crash would undo:

* every write or truncate to a file since that file's last completed
  ``fsync``/``fdatasync`` (the old bytes are saved before the write);
* every directory change (a file created, renamed or removed, a directory
  made) since that directory's last ``fsync_dir``.

``crash()`` then does to the disk what a power loss may do: it undoes the
unsynced writes (newest first, so each file holds exactly its last synced
bytes) and the unsynced directory changes (an unsynced create or rename
target disappears, an unsynced rename or remove is undone), closes every
file opened through it (which also drops their flocks, as a dead process
would), and fences them off: a file object opened before the crash raises
``SimulatedCrash`` on every later call. With ``torn=True`` the crash keeps,
per file, a random prefix of its unsynced writes in the order they were
made, the last one kept cut at a random byte: a torn write.

``crash_after(n)`` arms an automatic crash: the n+1-th mutating operation
(write, truncate, fsync, fsync_dir, create, rename, remove) from now crashes
instead of running, raising ``SimulatedCrash`` to its caller. ``ops`` counts
mutating operations, so a test can run a workload once to learn its length,
then crash it at random points. After a crash the Env is usable again (the
"machine rebooted"): open the store anew through it or through the inner Env.

``sync_to_disk=False`` skips the real fsync calls (the model still counts
them as done): crash tests then run at memory speed, and what survives the
simulated crash is exactly what the model says.

Limits: file contents are tracked per path, so a file renamed after being
written is tracked under its new name; hard links and files modified outside
this Env are not modelled.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat as stat_module
import threading
from collections.abc import Callable
from typing import Any

from shardio.errors import ShardioError
from shardio.tame import Env, EnvFile, posix_env

__all__ = ["CrashSimulatingEnv", "SimulatedCrash"]

_CREATING_MODES = ("w", "a", "x")


class SimulatedCrash(ShardioError, OSError):
    """The CrashSimulatingEnv crashed: this call, and every later call on a file from before, failed.

    An ``OSError`` (EIO) so that storage code treats it as what the lost
    machine would have seen: an I/O error, after which nothing is promised.
    """

    def __init__(self, message: str = "simulated crash") -> None:
        super().__init__(errno.EIO, message)


class _Undo:
    """One unsynced write of a file: the bytes it replaced and the size before it."""

    __slots__ = ("new", "offset", "old", "old_size")

    def __init__(self, offset: int, old: bytes, old_size: int, new: bytes) -> None:
        self.offset = offset
        self.old = old
        self.old_size = old_size
        self.new = new


class _FileState:
    """What a crash would undo in one file (by path)."""

    __slots__ = ("undo",)

    def __init__(self) -> None:
        self.undo: list[_Undo] = []


class CrashFile(EnvFile):
    """A file of a CrashSimulatingEnv: the inner Env's file, with its writes remembered."""

    def __init__(self, env: CrashSimulatingEnv, inner: EnvFile, path: str, epoch: int) -> None:
        self._env = env
        self._inner = inner
        self.name = path
        self.mode = getattr(inner, "mode", "")
        self._epoch = epoch

    def _live(self) -> EnvFile:
        if self._epoch != self._env.epoch:
            raise SimulatedCrash(f"{self.name}: the machine crashed since this file was opened")
        return self._inner

    def pread(self, n: int, offset: int) -> bytes:
        return self._live().pread(n, offset)

    def read(self, n: int = -1) -> bytes:
        return self._live().read(n)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        return self._env._write(self, bytes(memoryview(data).cast("B")), offset)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        f = self._live()
        pos = f.size() if "a" in self.mode else f.tell()
        n = self._env._write(self, bytes(memoryview(data).cast("B")), pos)
        f.seek(pos + n)
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._live().seek(offset, whence)

    def tell(self) -> int:
        return self._live().tell()

    def fsync(self) -> None:
        self._env._sync_file(self, data_only=False)

    def fdatasync(self) -> None:
        self._env._sync_file(self, data_only=True)

    def truncate(self, size: int) -> None:
        self._env._truncate(self, size)

    def size(self) -> int:
        return self._live().size()

    def fadvise(self, offset: int, length: int, advice: int) -> None:
        self._live().fadvise(offset, length, advice)

    def fileno(self) -> int:
        return self._live().fileno()

    def close(self) -> None:
        self._inner.close()

    @property
    def closed(self) -> bool:
        return self._inner.closed or self._epoch != self._env.epoch


class CrashSimulatingEnv(Env):
    """An Env whose simulated crash keeps only what fsync covered; see the module docstring."""

    name = "crash"

    def __init__(
        self,
        inner: Env | None = None,
        *,
        torn: bool = False,
        seed: int | None = None,
        sync_to_disk: bool = True,
    ) -> None:
        self.inner = inner if inner is not None else posix_env
        self.torn = torn
        self.sync_to_disk = sync_to_disk
        self.random = random.Random(seed)
        self.epoch = 0  #: crashes so far
        self.ops = 0  #: mutating operations so far
        self.crashes = 0
        self._crash_at: int | None = None
        self._files: dict[str, _FileState] = {}
        self._open: list[CrashFile] = []
        # directory -> {name: kind} as of its last fsync_dir (kind: "f" file, "d" dir)
        self._dirs: dict[str, dict[str, str]] = {}
        # paths removed or renamed over while their directory was unsynced: saved copies
        self._removed: dict[str, str] = {}
        self._lock = threading.Lock()  # bookkeeping only: never held across a yield

    # -- arming and crashing ------------------------------------------------------

    def crash_after(self, n: int | None) -> None:
        """Crash at the (n+1)-th mutating operation from now (None: disarm)."""
        self._crash_at = None if n is None else self.ops + n

    def _tick(self) -> None:
        """Count a mutating operation; crash instead of it if armed for this one."""
        self.ops += 1
        if self._crash_at is not None and self.ops > self._crash_at:
            self._crash_at = None
            self.crash()
            raise SimulatedCrash(f"simulated crash at mutating operation {self.ops}")

    def crash(self) -> None:
        """Lose everything not fsynced, close every file, fence off the old file objects."""
        with self._lock:
            self.epoch += 1
            self.crashes += 1
            for f in self._open:
                try:
                    f._inner.close()
                except OSError:
                    pass
            self._open.clear()
            for path, state in self._files.items():
                self._undo_file(path, state)
            self._files.clear()
            self._restore_dirs()
            self._dirs.clear()
            for saved in self._removed.values():
                _remove_tree(saved)
            self._removed.clear()

    def _undo_file(self, path: str, state: _FileState) -> None:
        undo = state.undo
        if not undo or not os.path.lexists(path):
            return
        keep: list[_Undo] = []
        cut = 0
        if self.torn:
            k = self.random.randint(0, len(undo))
            keep = undo[:k]
            if k < len(undo) and undo[k].new:
                cut = self.random.randint(0, len(undo[k].new))
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for u in reversed(undo):
                os.ftruncate(fd, max(u.old_size, u.offset + len(u.old)))
                if u.old:
                    os.pwrite(fd, u.old, u.offset)
                os.ftruncate(fd, u.old_size)
            for u in keep:
                _replay(fd, u, len(u.new))
            if cut:
                u = undo[len(keep)]
                _replay(fd, u, cut)
        finally:
            os.close(fd)

    def _restore_dirs(self) -> None:
        for d, durable in self._dirs.items():
            if not os.path.isdir(d):
                continue
            current = {n for n in os.listdir(d) if not n.startswith(".crash-env-saved-")}
            for name in current - set(durable):
                _remove_tree(os.path.join(d, name))
            for name, kind in durable.items():
                p = os.path.join(d, name)
                saved = self._removed.pop(p, None)
                if saved is not None:
                    _remove_tree(p)
                    os.replace(saved, p)
                elif not os.path.lexists(p) and kind == "d":
                    os.mkdir(p)

    # -- bookkeeping -------------------------------------------------------------

    def _track_dir(self, d: str) -> None:
        """Record directory d's entries as durable, the first time it is touched."""
        if d not in self._dirs and os.path.isdir(d):
            self._dirs[d] = _entries(d)

    def _before_dir_change(self, path: str) -> None:
        """path's entry is about to change: keep a copy if a crash must bring it back."""
        d, name = os.path.split(path)
        self._track_dir(d)
        if name in self._dirs.get(d, {}) and path not in self._removed and os.path.lexists(path):
            saved = os.path.join(d, f".crash-env-saved-{self.epoch}-{len(self._removed)}-{name}")
            _copy_synced(path, saved, self._files.get(path))
            self._removed[path] = saved

    def _write(self, f: CrashFile, data: bytes, offset: int) -> int:
        inner = f._live()
        self._tick()
        with self._lock:  # plain os calls only: the inner Env's could yield while it is held
            fd = inner.fileno()
            size = os.fstat(fd).st_size
            old = os.pread(fd, min(len(data), size - offset), offset) if offset < size else b""
            self._files.setdefault(f.name, _FileState()).undo.append(_Undo(offset, old, size, data))
        return inner.pwrite(data, offset)

    def _truncate(self, f: CrashFile, size: int) -> None:
        inner = f._live()
        self._tick()
        with self._lock:
            fd = inner.fileno()
            old_size = os.fstat(fd).st_size
            old = os.pread(fd, old_size - size, size) if size < old_size else b""
            self._files.setdefault(f.name, _FileState()).undo.append(
                _Undo(min(size, old_size), old, old_size, b"")
            )
        inner.truncate(size)

    def _sync_file(self, f: CrashFile, data_only: bool) -> None:
        inner = f._live()
        self._tick()
        state = self._files.get(f.name)
        covered = len(state.undo) if state is not None else 0
        epoch = self.epoch
        if self.sync_to_disk:
            if data_only:
                inner.fdatasync()
            else:
                inner.fsync()
        with self._lock:
            if self.epoch != epoch:
                raise SimulatedCrash(f"{f.name}: the machine crashed during this fsync")
            if state is not None and self._files.get(f.name) is state:
                del state.undo[:covered]

    # -- the Env interface --------------------------------------------------------

    def open(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> CrashFile:
        p = os.path.abspath(os.fspath(path))
        key = mode.replace("b", "").replace("+", "")
        creates = key in _CREATING_MODES and (key == "x" or not os.path.exists(p))
        truncates = key == "w" and os.path.exists(p)
        if creates or truncates:
            self._tick()
        with self._lock:
            if creates:
                self._track_dir(os.path.dirname(p))
            if truncates:
                size = os.path.getsize(p)
                with open(p, "rb") as old:
                    content = old.read()
                self._files.setdefault(p, _FileState()).undo.append(_Undo(0, content, size, b""))
        inner = self.inner.open(p, mode, direct=direct)
        f = CrashFile(self, inner, p, self.epoch)
        with self._lock:
            self._open = [o for o in self._open if not o._inner.closed]
            self._open.append(f)
        return f

    def makedirs(self, path: str | os.PathLike[str], exist_ok: bool = True) -> None:
        p = os.path.abspath(os.fspath(path))
        missing = []
        q = p
        while not os.path.exists(q):
            missing.append(q)
            q = os.path.dirname(q)
        if missing:
            self._tick()
            with self._lock:
                for m in reversed(missing):
                    self._track_dir(os.path.dirname(m))
        self.inner.makedirs(p, exist_ok=exist_ok)

    def remove(self, path: str | os.PathLike[str]) -> None:
        p = os.path.abspath(os.fspath(path))
        self._tick()
        with self._lock:
            self._before_dir_change(p)
            self._files.pop(p, None)
        self.inner.remove(p)

    def rmdir(self, path: str | os.PathLike[str]) -> None:
        p = os.path.abspath(os.fspath(path))
        self._tick()
        with self._lock:
            self._track_dir(os.path.dirname(p))
        self.inner.rmdir(p)

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        s = os.path.abspath(os.fspath(src))
        d = os.path.abspath(os.fspath(dst))
        self._tick()
        with self._lock:
            self._before_dir_change(s)
            self._before_dir_change(d)
            state = self._files.pop(s, None)
            self._files.pop(d, None)
        self.inner.rename(s, d)
        with self._lock:
            if state is not None:
                self._files[d] = state

    def fsync_dir(self, path: str | os.PathLike[str]) -> None:
        p = os.path.abspath(os.fspath(path))
        self._tick()
        epoch = self.epoch
        if self.sync_to_disk:
            self.inner.fsync_dir(p)
        with self._lock:
            if self.epoch != epoch:
                raise SimulatedCrash(f"{p}: the machine crashed during this fsync")
            self._dirs[p] = _entries(p)
            for removed in [r for r in self._removed if os.path.dirname(r) == p]:
                _remove_tree(self._removed.pop(removed))

    def listdir(self, path: str | os.PathLike[str] = ".") -> list[str]:
        return [n for n in self.inner.listdir(path) if not n.startswith(".crash-env-saved-")]

    def fadvise(
        self,
        path: str | os.PathLike[str],
        offset: int = 0,
        length: int = 0,
        advice: int | None = None,
    ) -> None:
        self.inner.fadvise(path, offset, length, advice)

    # everything else is the inner Env's
    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.inner.exists(path)

    def isdir(self, path: str | os.PathLike[str]) -> bool:
        return self.inner.isdir(path)

    def getsize(self, path: str | os.PathLike[str]) -> int:
        return self.inner.getsize(path)

    def stat(self, path: str | os.PathLike[str]) -> os.stat_result:
        return self.inner.stat(path)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)

    def monotonic(self) -> float:
        return self.inner.monotonic()

    def time(self) -> float:
        return self.inner.time()

    def Lock(self) -> Any:  # noqa: N802
        return self.inner.Lock()

    def RLock(self) -> Any:  # noqa: N802
        return self.inner.RLock()

    def Condition(self, lock: Any = None) -> Any:  # noqa: N802
        return self.inner.Condition(lock)

    def Event(self) -> Any:  # noqa: N802
        return self.inner.Event()

    def Semaphore(self, value: int = 1) -> Any:  # noqa: N802
        return self.inner.Semaphore(value)

    def BoundedSemaphore(self, value: int = 1) -> Any:  # noqa: N802
        return self.inner.BoundedSemaphore(value)

    def Queue(self, maxsize: int = 0) -> Any:  # noqa: N802
        return self.inner.Queue(maxsize)

    def start_thread(
        self, func: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any
    ) -> Any:
        return self.inner.start_thread(func, *args, name=name, **kwargs)

    def socket(self, family: int = 2, type: int = 1, proto: int = 0) -> Any:  # noqa: A002
        return self.inner.socket(family, type, proto)

    def create_connection(self, address: tuple[str, int], timeout: float | None = None) -> Any:
        return self.inner.create_connection(address, timeout)

    def __repr__(self) -> str:
        return f"<CrashSimulatingEnv over {self.inner!r} ops={self.ops} crashes={self.crashes}>"


def _entries(d: str) -> dict[str, str]:
    out = {}
    for name in os.listdir(d):
        if name.startswith(".crash-env-saved-"):
            continue
        st = os.lstat(os.path.join(d, name))
        out[name] = "d" if stat_module.S_ISDIR(st.st_mode) else "f"
    return out


def _remove_tree(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.remove(p)


def _replay(fd: int, u: _Undo, n: int) -> None:
    """Re-apply the first n bytes of an undone write (a truncate when u.new is empty)."""
    if u.new:
        os.pwrite(fd, u.new[:n], u.offset)
    else:
        os.ftruncate(fd, u.offset)


def _copy_synced(src: str, dst: str, state: _FileState | None) -> None:
    """Copy src to dst as a crash would leave it: with its unsynced writes undone."""
    if os.path.isdir(src):
        shutil.copytree(src, dst)
        return
    shutil.copyfile(src, dst)
    if state is not None and state.undo:
        fd = os.open(dst, os.O_RDWR | os.O_CLOEXEC)
        try:
            for u in reversed(state.undo):
                os.ftruncate(fd, max(u.old_size, u.offset + len(u.old)))
                if u.old:
                    os.pwrite(fd, u.old, u.offset)
                os.ftruncate(fd, u.old_size)
        finally:
            os.close(fd)
