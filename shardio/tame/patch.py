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
  (buffered and text layers are io's own; the raw layer is an ``io.FileIO``,
  with its kernel file position) whose raw reads/writes go through the loop's
  io_uring driver; FIFOs, devices and integer fds get the real
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
* ``socket.socket``, ``socket.create_connection``, ``socket.create_server``,
  ``socket.socketpair``, ``socket.fromfd``: TameSocket, a ``socket.socket``
  subclass whose waits yield (``shardio.tame.sockets``); ``socket.getaddrinfo``
  (and host names given to ``connect``) resolved off the reactor.
* ``select.select``, ``select.poll``, ``selectors.DefaultSelector``/
  ``EpollSelector``/``PollSelector``/``SelectSelector``: wait on the loop,
  any fd number (``shardio.tame.readiness``).
* ``ssl.SSLContext``, ``ssl.create_default_context``: contexts whose
  ``wrap_socket`` returns a TameSSLSocket (``shardio.tame.tls``).

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
  ``queue.LifoQueue``/``PriorityQueue``/``SimpleQueue``, ``select.epoll``,
  ``os.readv``/``preadv``/``writev``, subprocess, DNS outside
  ``socket.getaddrinfo``, sockets and ``ssl`` contexts created off a tame
  stack (wrap a context with ``shardio.tame.tls.tame_context``), and anything blocking inside C code (sqlite3,
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
import io
import os
import queue
import select
import selectors
import socket
import ssl
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from greenlet import getcurrent

from . import sync
from .files import (
    tame_open,
    tame_os_fdatasync,
    tame_os_fsync,
    tame_os_pread,
    tame_os_pwrite,
    tame_os_read,
    tame_os_write,
)
from .readiness import TamePoll, TameSelector, tame_select
from .sockets import (
    TameSocket,
    tame_create_connection,
    tame_create_server,
    tame_fromfd,
    tame_getaddrinfo,
    tame_socketpair,
)
from .stacks import TameError, TameGreenlet, current_runtime
from .threads import TameThread
from .timers import tame_sleep
from .tls import tame_create_default_context, tame_ssl_context

__all__ = ["is_patched", "patch", "patched", "unpatch"]


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
        return getattr(current_runtime().env, attr)(*args, **kwargs)

    return make


def _build_overrides() -> dict[types.ModuleType, dict[str, Any]]:
    """Per real module: intercepted attribute name -> dispatcher."""
    primitives = {
        "Lock": ("Lock", (sync.TameLock,)),
        "RLock": ("RLock", (sync.TameRLock,)),
        "Condition": ("Condition", (sync.TameCondition,)),
        "Event": ("Event", (sync.TameEvent,)),
        "Semaphore": ("Semaphore", (sync.TameSemaphore,)),
        "BoundedSemaphore": ("BoundedSemaphore", (sync.TameBoundedSemaphore,)),
    }
    th: dict[str, Any] = {
        name: _dispatch_class(getattr(threading, name), _env_factory(attr), types_)
        for name, (attr, types_) in primitives.items()
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
        queue: {"Queue": _dispatch_class(queue.Queue, _env_factory("Queue"), (sync.TameQueue,))},
        **_network_overrides(),
    }


def _network_overrides() -> dict[types.ModuleType, dict[str, Any]]:
    """socket, select, selectors and ssl: see shardio.tame.sockets, .readiness and .tls."""
    tame_selector = {}  # one dispatcher per real class (DefaultSelector is EpollSelector)
    for name in ("DefaultSelector", "SelectSelector", "PollSelector", "EpollSelector"):
        real = getattr(selectors, name, None)
        if real is not None and real not in tame_selector:
            tame_selector[real] = _dispatch_class(real, TameSelector, (TameSelector,))
    return {
        socket: {
            "socket": _dispatch_class(socket.socket, TameSocket, (TameSocket,)),
            "create_connection": _dispatch_function(
                socket.create_connection, tame_create_connection
            ),
            "getaddrinfo": _dispatch_function(socket.getaddrinfo, tame_getaddrinfo),
            "socketpair": _dispatch_function(socket.socketpair, tame_socketpair),
            "create_server": _dispatch_function(socket.create_server, tame_create_server),
            "fromfd": _dispatch_function(socket.fromfd, tame_fromfd),
        },
        select: {
            "select": _dispatch_function(select.select, tame_select),
            "poll": _dispatch_function(select.poll, TamePoll),
        },
        selectors: {
            name: tame_selector[getattr(selectors, name)]
            for name in ("DefaultSelector", "SelectSelector", "PollSelector", "EpollSelector")
            if hasattr(selectors, name)
        },
        ssl: {
            "SSLContext": _dispatch_class(ssl.SSLContext, tame_ssl_context, (ssl.SSLContext,)),
            "create_default_context": _dispatch_function(
                ssl.create_default_context, tame_create_default_context
            ),
        },
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
