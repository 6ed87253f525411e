"""Scoped taming of unmodified modules: their own names, never the global ones.

``tame.patch(module)`` rewrites references *inside that module* (its
globals, the attributes of classes it defines, and default arguments of its
functions and methods) so that the blocking calls it makes resolve to tame
versions when they run on a tame stack and to the original objects anywhere
else. Nothing global changes: ``os.read`` is still ``os.read`` for every
other module, and even the patched module behaves exactly as before when
called from a plain thread or a coroutine. ``tame.unpatch(module)`` restores
every reference it changed; ``with tame.patched(module):`` scopes it.

What is rewritten in the module's namespace
-------------------------------------------

* references to the modules ``os``, ``io``, ``time``, ``threading``,
  ``socket``, ``select`` and ``queue`` (``import os``, ``import io as _io``,
  class attributes such as dbm.dumb's ``_os = _os``) become per-module
  proxy objects: every attribute is the real module's, except the
  intercepted names below;
* functions and classes imported by name (``from time import sleep``,
  ``from threading import Lock``) that are among the intercepted names;
* ``open``: if the module does not define its own ``open``, a tame ``open``
  is placed in its globals (shadowing the builtin for that module only).

Intercepted names (tame on a tame stack, the original elsewhere)
----------------------------------------------------------------

* ``open`` / ``io.open``: regular files get an io-compatible file object
  (buffered and text layers are io's own) whose raw reads/writes go through
  the loop's io_uring driver; FIFOs, devices and integer fds get the real
  ``open``. ``os.fsync/fdatasync`` on its fileno() go through io_uring too.
* ``os.read``, ``os.write``, ``os.pread``, ``os.pwrite``, ``os.fsync``,
  ``os.fdatasync``: regular files through io_uring (read/write use and
  advance the kernel file position); pipes and sockets wait for readiness
  with ``loop.add_reader/add_writer``.
* ``time.sleep``: a loop timer.
* ``threading.Lock``, ``RLock``, ``Condition``, ``Event``, ``Semaphore``,
  ``BoundedSemaphore``, ``Thread`` and ``queue.Queue``: objects created on a
  tame stack are tame (greenlet-aware, owned by that reactor; a Thread is a
  tame thread: another tame call on the same reactor). ``isinstance`` checks
  against these names accept both kinds.
* ``socket.socket``, ``socket.create_connection``, ``socket.getaddrinfo``:
  TameSocket (connect/accept/recv/send yield), resolution off the reactor.
* ``select.select``: waits with add_reader/add_writer on a tame stack.

What is NOT intercepted (and what happens)
------------------------------------------

* Objects created *before* the call reached a tame stack are the real ones:
  a real ``threading.Lock`` held by another tame stack blocks the whole
  reactor thread (a deadlock if its holder is parked on the same reactor);
  a module-level lock made at import time is real. Create such objects on
  the stack, or patch before importing/constructing them.
* Code outside the patched module: a raw ``time.sleep`` or ``os.read`` in
  an unpatched helper module blocks the reactor. Patch that module too.
* ``threading.local`` (shared by all tame stacks of one reactor thread),
  ``threading.current_thread``/``get_ident`` (the reactor thread),
  ``queue.LifoQueue``/``PriorityQueue``/``SimpleQueue``, ``select.poll``/
  ``epoll``, ``os.readv``/``preadv``/``writev``, subprocess, DNS outside
  ``socket.getaddrinfo``, and anything blocking inside C code (sqlite3,
  lmdb, zlib on huge inputs): use ``tame.alien`` for C-level blocking.
* One buffered file object used by two tame stacks at once raises
  ``RuntimeError: reentrant call`` (io's own check), where threads would
  serialize; open one file object per stack.

Blocking that is not intercepted shows up as a reactor stall, which the
stall detector reports with the reactor thread's stack.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import importlib
import io
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from greenlet import getcurrent

from .stacks import Parked, TameError, TameGreenlet

__all__ = ["is_patched", "patch", "patched", "tame_open", "unpatch"]


def _rt() -> Any:
    g = getcurrent()
    return g.rt if type(g) is TameGreenlet else None


# ---------------------------------------------------------------------------
# Tame implementations
# ---------------------------------------------------------------------------


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
        self._fd = opener(file, flags) if opener is not None else os.open(file, flags, 0o666)
        self._pos = os.fstat(self._fd).st_size if self._append else 0
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
        rt = _rt()
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
            want = max(os.fstat(fd).st_size - self._pos, 0) or io.DEFAULT_BUFFER_SIZE
            buf = bytearray(want)
            n = self.readinto(buf)
            if not n:
                return b"".join(chunks)
            chunks.append(bytes(buf[:n]))

    def write(self, b: Any) -> int:
        fd = self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        rt = _rt()
        view = memoryview(b).cast("B")
        if rt is not None:
            n = rt.uring.write(fd, view, self._pos)  # O_APPEND: the kernel appends
        else:
            n = 0
            while n < len(view):
                n += os.pwrite(fd, view[n:], self._pos + n)
        self._pos = os.fstat(fd).st_size if self._append else self._pos + n
        return n  # type: ignore[no-any-return]

    def seek(self, pos: int, whence: int = 0) -> int:
        fd = self._check_open()
        if whence == os.SEEK_SET:
            new = pos
        elif whence == os.SEEK_CUR:
            new = self._pos + pos
        elif whence == os.SEEK_END:
            new = os.fstat(fd).st_size + pos
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
        os.ftruncate(fd, size)
        return size

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                super().close()
            finally:
                if self._closefd:
                    os.close(fd)
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


def _wait_fd(fd: int, write: bool) -> None:
    rt = _rt()
    p = Parked()
    loop = rt.loop
    (loop.add_writer if write else loop.add_reader)(fd, p.wake, None)
    try:
        p.park()
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _ready_now(fd: int, write: bool) -> bool:
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], 0)
    return bool(r or w)


def tame_os_read(fd: int, n: int) -> bytes:
    rt = _rt()
    if _seekable_regular(fd):
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        data: bytes = rt.uring.read(fd, n, pos, _is_direct(fd))
        os.lseek(fd, pos + len(data), os.SEEK_SET)
        return data
    if not _ready_now(fd, False):
        _wait_fd(fd, False)
    return os.read(fd, n)


def tame_os_write(fd: int, data: Any) -> int:
    rt = _rt()
    if _seekable_regular(fd):
        if _fd_appends(fd):
            n: int = rt.uring.write(fd, data, 0)
            os.lseek(fd, 0, os.SEEK_END)
            return n
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        n = rt.uring.write(fd, data, pos, _is_direct(fd))
        os.lseek(fd, pos + n, os.SEEK_SET)
        return n
    if not _ready_now(fd, True):
        _wait_fd(fd, True)
    return os.write(fd, data)


def _fd_appends(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def tame_os_pread(fd: int, n: int, offset: int) -> bytes:
    return _rt().uring.read(fd, n, offset, _is_direct(fd))  # type: ignore[no-any-return]


def tame_os_pwrite(fd: int, data: Any, offset: int) -> int:
    return _rt().uring.write(fd, data, offset, _is_direct(fd))  # type: ignore[no-any-return]


def tame_os_fsync(fd: Any) -> None:
    if not isinstance(fd, int):
        fd = fd.fileno()
    _rt().uring.fsync(fd, False)


def tame_os_fdatasync(fd: Any) -> None:
    if not isinstance(fd, int):
        fd = fd.fileno()
    _rt().uring.fsync(fd, True)


def tame_sleep(seconds: float) -> None:
    _rt().env.sleep(seconds)


def tame_select(
    rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """select.select on a tame stack: the wait happens in the loop (read/write sets)."""
    r, w, x = select.select(rlist, wlist, xlist, 0)
    if r or w or x or timeout == 0:
        return r, w, x
    rt = _rt()
    loop = rt.loop
    p = Parked()
    rfds = [o if isinstance(o, int) else o.fileno() for o in rlist]
    wfds = [o if isinstance(o, int) else o.fileno() for o in wlist]
    for fd in rfds:
        loop.add_reader(fd, p.wake, None)
    for fd in wfds:
        loop.add_writer(fd, p.wake, None)
    timer = None if timeout is None else loop.call_later(timeout, p.wake, None)
    try:
        p.park()
    finally:
        for fd in rfds:
            loop.remove_reader(fd)
        for fd in wfds:
            loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
    return select.select(rlist, wlist, xlist, 0)


class TameThread:
    """threading.Thread's API on a tame stack: a tame thread of the same reactor."""

    _count = 0

    def __init__(
        self,
        group: None = None,
        target: Callable[..., Any] | None = None,
        name: str | None = None,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        TameThread._count += 1
        self._target = target
        self._args = tuple(args)
        self._kwargs = kwargs or {}
        self._name = name or f"TameThread-{TameThread._count}"
        self.daemon = bool(daemon)
        self._handle: Any = None
        self.ident: int | None = None
        self.native_id: int | None = None

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    def getName(self) -> str:  # noqa: N802
        return self._name

    def setName(self, name: str) -> None:  # noqa: N802
        self._name = name

    def isDaemon(self) -> bool:  # noqa: N802
        return self.daemon

    def setDaemon(self, daemonic: bool) -> None:  # noqa: N802
        self.daemon = daemonic

    def start(self) -> None:
        if self._handle is not None:
            raise RuntimeError("threads can only be started once")
        rt = _rt()
        if rt is None:
            raise TameError("a TameThread can only be started on a tame stack")
        self._handle = rt.env.start_thread(self._bootstrap, name=self._name)
        self.ident = id(self._handle)

    def _bootstrap(self) -> None:
        try:
            self.run()
        except BaseException:
            threading.excepthook(threading.ExceptHookArgs([*sys.exc_info(), self]))  # type: ignore[attr-defined]

    def run(self) -> None:
        if self._target is not None:
            self._target(*self._args, **self._kwargs)

    def join(self, timeout: float | None = None) -> None:
        if self._handle is None:
            raise RuntimeError("cannot join thread before it is started")
        self._handle.join(timeout)

    def is_alive(self) -> bool:
        return self._handle is not None and self._handle.is_alive()

    def __repr__(self) -> str:
        return f"<TameThread({self._name}, {'started' if self._handle else 'initial'})>"


# ---------------------------------------------------------------------------
# Dispatchers: tame on a tame stack, the original elsewhere
# ---------------------------------------------------------------------------


def _dispatch_function(orig: Callable[..., Any], tame_fn: Callable[..., Any]) -> Callable[..., Any]:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if type(getcurrent()) is TameGreenlet:
            return tame_fn(*args, **kwargs)
        return orig(*args, **kwargs)

    dispatch.__name__ = getattr(orig, "__name__", "dispatch")
    dispatch.__qualname__ = getattr(orig, "__qualname__", dispatch.__name__)
    dispatch.__doc__ = getattr(orig, "__doc__", None)
    dispatch.__wrapped__ = orig  # type: ignore[attr-defined]
    dispatch._tame_dispatch = True  # type: ignore[attr-defined]
    return dispatch


class _DispatchMeta(type):
    """Classes that construct the tame or the real object, and accept both in isinstance."""

    _orig: Any
    _tame: Callable[..., Any]
    _tame_types: tuple[type, ...]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if type(getcurrent()) is TameGreenlet:
            return cls._tame(*args, **kwargs)
        return cls._orig(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, (cls._orig, cls._tame_types))

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._orig) or issubclass(sub, cls._tame_types)


def _dispatch_class(
    orig: Any, tame_factory: Callable[..., Any], tame_types: tuple[type, ...]
) -> Any:
    name = getattr(orig, "__name__", "Dispatch")
    return _DispatchMeta(
        name,
        (),
        {
            "_orig": orig,
            "_tame": staticmethod(tame_factory),
            "_tame_types": tame_types,
            "__doc__": getattr(orig, "__doc__", None),
            "_tame_dispatch": True,
        },
    )


def _env_factory(attr: str) -> Callable[..., Any]:
    def make(*args: Any, **kwargs: Any) -> Any:
        return getattr(_rt().env, attr)(*args, **kwargs)

    return make


def _build_overrides() -> dict[types.ModuleType, dict[str, Any]]:
    """Per real module: intercepted attribute name -> dispatcher."""
    e = importlib.import_module("shardio.tame.env")  # (the package's `env` is the function)
    sync = {
        "Lock": ("Lock", (e.TameLock,)),
        "RLock": ("RLock", (e.TameRLock,)),
        "Condition": ("Condition", (e.TameCondition,)),
        "Event": ("Event", (e.TameEvent,)),
        "Semaphore": ("Semaphore", (e.TameSemaphore,)),
        "BoundedSemaphore": ("BoundedSemaphore", (e.TameBoundedSemaphore,)),
    }
    th: dict[str, Any] = {
        name: _dispatch_class(getattr(threading, name), _env_factory(attr), types_)
        for name, (attr, types_) in sync.items()
    }
    th["Thread"] = _dispatch_class(threading.Thread, TameThread, (TameThread,))
    return {
        builtins: {"open": _dispatch_function(builtins.open, tame_open)},  # type: ignore[dict-item]
        io: {"open": _dispatch_function(io.open, tame_open)},
        os: {
            "read": _dispatch_function(os.read, tame_os_read),
            "write": _dispatch_function(os.write, tame_os_write),
            "pread": _dispatch_function(os.pread, tame_os_pread),
            "pwrite": _dispatch_function(os.pwrite, tame_os_pwrite),
            "fsync": _dispatch_function(os.fsync, tame_os_fsync),
            "fdatasync": _dispatch_function(os.fdatasync, tame_os_fdatasync),
        },
        time: {"sleep": _dispatch_function(time.sleep, tame_sleep)},
        threading: th,
        queue: {"Queue": _dispatch_class(queue.Queue, _env_factory("Queue"), (e.TameQueue,))},
        socket: {
            "socket": _dispatch_class(socket.socket, e.TameSocket.create, (e.TameSocket,)),
            "create_connection": _dispatch_function(
                socket.create_connection, e.tame_create_connection
            ),
            "getaddrinfo": _dispatch_function(socket.getaddrinfo, e.tame_getaddrinfo),
        },
        select: {"select": _dispatch_function(select.select, tame_select)},
    }


_OVERRIDES = _build_overrides()
# original object (by id) -> its dispatcher, for names imported directly
_BY_ORIGINAL: dict[int, tuple[Any, Any]] = {}
for _mod, _names in _OVERRIDES.items():
    for _name, _disp in _names.items():
        _orig = getattr(_mod, _name)
        _BY_ORIGINAL[id(_orig)] = (_orig, _disp)


class ModuleProxy(types.ModuleType):
    """A module as seen from one patched module: the real one, except intercepted names."""

    def __init__(self, real: types.ModuleType, overrides: dict[str, Any]) -> None:
        super().__init__(real.__name__, real.__doc__)
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_overrides", overrides)
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._real, name)

    def __dir__(self) -> list[str]:
        return dir(self._real)

    def __repr__(self) -> str:
        return f"<tame proxy of {self._real!r}>"


_PROXIES: dict[types.ModuleType, ModuleProxy] = {
    m: ModuleProxy(m, o) for m, o in _OVERRIDES.items() if m is not builtins
}

# -- patch bookkeeping ---------------------------------------------------------

_MISSING = object()
_lock = threading.Lock()
_patched: dict[str, tuple[int, list[tuple[Any, str, Any]]]] = {}


def _replacement(value: Any) -> Any:
    """The tame stand-in for value, or None if value is not something we intercept."""
    if isinstance(value, types.ModuleType):
        return _PROXIES.get(value)
    hit = _BY_ORIGINAL.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    return None


def _patch_mapping(
    owner: Any,
    mapping: dict[str, Any],
    records: list[tuple[Any, str, Any]],
    setter: Callable[[str, Any], None],
) -> None:
    for name, value in list(mapping.items()):
        if name.startswith("__") and name.endswith("__"):
            continue
        new = _replacement(value)
        if new is not None:
            records.append((owner, name, value))
            setter(name, new)


def _patch_defaults(func: Any, records: list[tuple[Any, str, Any]]) -> None:
    func = getattr(func, "__func__", func)
    if not isinstance(func, types.FunctionType):
        return
    if func.__defaults__:
        new = tuple(_replacement(v) or v for v in func.__defaults__)
        if new != func.__defaults__:
            records.append((func, "__defaults__", func.__defaults__))
            func.__defaults__ = new
    if func.__kwdefaults__:
        newk = {k: _replacement(v) or v for k, v in func.__kwdefaults__.items()}
        if newk != func.__kwdefaults__:
            records.append((func, "__kwdefaults__", dict(func.__kwdefaults__)))
            func.__kwdefaults__ = newk


def patch(module: types.ModuleType) -> None:
    """Tame module's own references to blocking calls (see the module docstring).

    Patching is counted: n patch() calls need n unpatch() calls.
    """
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"tame.patch expects a module, got {module!r}")
    if module in _OVERRIDES or module.__name__.startswith("shardio."):
        raise TameError(
            f"refusing to patch {module.__name__}: patch the modules that use it instead"
        )
    with _lock:
        key = module.__name__
        entry = _patched.get(key)
        if entry is not None:
            _patched[key] = (entry[0] + 1, entry[1])
            return
        records: list[tuple[Any, str, Any]] = []
        ns = module.__dict__
        _patch_mapping(module, ns, records, lambda n, v: ns.__setitem__(n, v))
        if "open" not in ns:
            records.append((module, "open", _MISSING))
            ns["open"] = _OVERRIDES[builtins]["open"]
        for value in list(ns.values()):
            if isinstance(value, type) and getattr(value, "__module__", None) == module.__name__:
                cls = value
                _patch_mapping(
                    cls, dict(cls.__dict__), records, lambda n, v, c=cls: setattr(c, n, v)
                )
                for attr in cls.__dict__.values():
                    _patch_defaults(attr, records)
            elif isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
                _patch_defaults(value, records)
        _patched[key] = (1, records)


def unpatch(module: types.ModuleType) -> None:
    """Undo one patch(module); the last one restores every changed reference."""
    with _lock:
        key = module.__name__
        entry = _patched.get(key)
        if entry is None:
            raise TameError(f"{key} is not patched")
        count, records = entry
        if count > 1:
            _patched[key] = (count - 1, records)
            return
        del _patched[key]
        for owner, name, old in reversed(records):
            if name in ("__defaults__", "__kwdefaults__"):
                setattr(owner, name, old)
            elif owner is module:
                if old is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = old
            else:
                setattr(owner, name, old)


def is_patched(module: types.ModuleType) -> bool:
    """True while module is patched."""
    return module.__name__ in _patched


@contextlib.contextmanager
def patched(*modules: types.ModuleType) -> Iterator[None]:
    """``with tame.patched(mod, ...):`` patch the modules for the block's duration."""
    done = []
    try:
        for m in modules:
            patch(m)
            done.append(m)
        yield
    finally:
        for m in reversed(done):
            unpatch(m)
