"""Waiting for file descriptors to become ready, without select(); tame select, poll, selectors.

On a tame stack a wait parks the stack on its reactor's loop. The loop keeps
one reader and one writer callback per fd, so every runtime has a registry of
waiters per fd and direction (``FdWaiters``): the first waiter registers the
loop callback, readiness wakes every waiter of that fd and direction (each
retries its call and waits again if it lost the race), and the last one to
leave removes the callback. Any number of stacks may therefore wait on one fd
(two readers, a reader and a writer). Off a tame stack a wait is a blocking
``poll(2)``. Neither uses ``select(2)``, so descriptors at or above
FD_SETSIZE (1024) work.

``tame_select``, ``TamePoll`` and ``TameSelector`` are what a patched module
gets for ``select.select``, ``select.poll()`` and the ``selectors`` classes
on a tame stack: they check readiness with a zero-timeout ``poll(2)`` and wait
through the registry.
"""

from __future__ import annotations

import math
import select
import selectors
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .stacks import Parked, Runtime, checkpoint, current_runtime

__all__ = [
    "FdWaiters",
    "TamePoll",
    "TameSelector",
    "deadline_after",
    "ready_now",
    "tame_select",
    "wait_fd",
    "wait_fds",
]

_READ_EVENTS = select.POLLIN | select.POLLPRI
# What select(2) reports as readable / writable / exceptional, in poll(2) terms (Linux).
_SELECT_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR
_SELECT_WRITABLE = select.POLLOUT | select.POLLERR
_SELECT_EXCEPTIONAL = select.POLLPRI


def deadline_after(timeout: float | None) -> float | None:
    """The time.monotonic() deadline ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


class _FdEntry:
    __slots__ = ("fd", "readers", "writers", "reading", "writing")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.readers: list[Parked] = []  # stacks waiting for readability
        self.writers: list[Parked] = []
        self.reading = False  # a loop reader callback is registered
        self.writing = False


class FdWaiters:
    """The per-fd waiter registry of one tame runtime (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.loop = runtime.loop
        self.entries: dict[int, _FdEntry] = {}

    def __len__(self) -> int:
        """Number of fds with at least one waiter."""
        return len(self.entries)

    def wait(self, reads: Iterable[int], writes: Iterable[int], deadline: float | None) -> bool:
        """Park the calling stack until one fd is ready (True) or the deadline passes (False)."""
        waiter = Parked()
        joined: list[tuple[_FdEntry, bool]] = []
        timer = None
        try:
            for fd in reads:
                joined.append((self._join(fd, False, waiter), False))
            for fd in writes:
                joined.append((self._join(fd, True, waiter), True))
            if deadline is not None:
                timer = self.loop.call_later(
                    max(0.0, deadline - time.monotonic()), waiter.wake, False
                )
            return bool(waiter.park())
        finally:
            if timer is not None:
                timer.cancel()
            for entry, write in joined:
                self._leave(entry, write, waiter)

    def _join(self, fd: int, write: bool, waiter: Parked) -> _FdEntry:
        entry = self.entries.get(fd)
        if entry is None:
            entry = self.entries[fd] = _FdEntry(fd)
        try:
            if write and not entry.writing:
                self.loop.add_writer(fd, self._ready, entry, True)
                entry.writing = True
            elif not write and not entry.reading:
                self.loop.add_reader(fd, self._ready, entry, False)
                entry.reading = True
        except BaseException:
            self._release(entry)
            raise
        (entry.writers if write else entry.readers).append(waiter)
        return entry

    def _leave(self, entry: _FdEntry, write: bool, waiter: Parked) -> None:
        waiters = entry.writers if write else entry.readers
        try:
            waiters.remove(waiter)
        except ValueError:
            pass  # already taken off by _ready
        self._release(entry)

    def _release(self, entry: _FdEntry) -> None:
        """Drop loop callbacks (and the entry) that no waiter needs any more."""
        if entry.reading and not entry.readers:
            entry.reading = False
            self.loop.remove_reader(entry.fd)
        if entry.writing and not entry.writers:
            entry.writing = False
            self.loop.remove_writer(entry.fd)
        if not (entry.reading or entry.writing) and self.entries.get(entry.fd) is entry:
            del self.entries[entry.fd]

    def _ready(self, entry: _FdEntry, write: bool) -> None:
        """Loop callback: wake every waiter of this fd and direction."""
        if write:
            woken, entry.writers = entry.writers, []
        else:
            woken, entry.readers = entry.readers, []
        for waiter in woken:
            waiter.wake(True)
        self._release(entry)


_registries: weakref.WeakKeyDictionary[Runtime, FdWaiters] = weakref.WeakKeyDictionary()


def _registry(rt: Runtime) -> FdWaiters:
    reg = _registries.get(rt)
    if reg is None:
        reg = _registries[rt] = FdWaiters(rt)
    return reg


def _poll_timeout_ms(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def wait_fds(reads: Iterable[int], writes: Iterable[int], deadline: float | None = None) -> bool:
    """Wait until one of the fds is ready; False if the deadline (time.monotonic) passed first.

    On a tame stack the stack parks on its loop; elsewhere the thread blocks in poll(2).
    """
    rt = current_runtime()
    if rt is not None:
        return _registry(rt).wait(reads, writes, deadline)
    poller = select.poll()
    masks: dict[int, int] = {}
    for fd in reads:
        masks[fd] = masks.get(fd, 0) | select.POLLIN
    for fd in writes:
        masks[fd] = masks.get(fd, 0) | select.POLLOUT
    for fd, mask in masks.items():
        poller.register(fd, mask)
    return bool(poller.poll(_poll_timeout_ms(deadline)))


def wait_fd(fd: int, write: bool, deadline: float | None = None) -> bool:
    """Wait until fd is readable (or writable); False if the deadline passed first."""
    return wait_fds((), (fd,), deadline) if write else wait_fds((fd,), (), deadline)


def ready_now(fd: int, write: bool) -> bool:
    """True if fd is readable (or writable) right now (poll(2), any fd number)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(0))


def _fileno(obj: Any) -> int:
    """An fd from an int or an object with fileno(), with select's own error messages."""
    if isinstance(obj, int):
        fd = obj
    else:
        try:
            method = obj.fileno
        except AttributeError:
            raise TypeError("argument must be an int, or have a fileno() method.") from None
        fd = method()
        if not isinstance(fd, int):
            raise TypeError("fileno() returned a non-integer")
    if fd < 0:
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


def tame_select(
    rlist: Iterable[Any], wlist: Iterable[Any], xlist: Iterable[Any], timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """select.select on a tame stack: the wait parks on the loop, and any fd number works."""
    if timeout is not None:
        if timeout < 0:
            raise ValueError("timeout must be non-negative")
        deadline: float | None = time.monotonic() + timeout
    else:
        deadline = None
    rl, wl, xl = list(rlist), list(wlist), list(xlist)
    masks: dict[int, int] = {}
    for objs, bit in ((rl, select.POLLIN), (wl, select.POLLOUT), (xl, select.POLLPRI)):
        for obj in objs:
            fd = _fileno(obj)
            masks[fd] = masks.get(fd, 0) | bit
    reads = [fd for fd, mask in masks.items() if mask & _READ_EVENTS]
    writes = [fd for fd, mask in masks.items() if mask & select.POLLOUT]
    waited = False
    while True:
        revents = _poll_now(masks)
        if revents:
            r = [o for o in rl if revents.get(_fileno(o), 0) & _SELECT_READABLE]
            w = [o for o in wl if revents.get(_fileno(o), 0) & _SELECT_WRITABLE]
            x = [o for o in xl if revents.get(_fileno(o), 0) & _SELECT_EXCEPTIONAL]
            if r or w or x:
                if not waited:
                    checkpoint()
                return r, w, x
        if timeout == 0 or (waited and deadline is not None and time.monotonic() >= deadline):
            if not waited:
                checkpoint()
            return [], [], []
        if not wait_fds(reads, writes, deadline):
            return [], [], []
        waited = True


def _poll_now(masks: Mapping[int, int]) -> dict[int, int]:
    """fd -> revents of the ready fds, by a zero-timeout poll(2); EBADF as select raises it."""
    if not masks:
        return {}
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    revents = dict(poller.poll(0))
    if any(ev & select.POLLNVAL for ev in revents.values()):
        raise OSError(9, "Bad file descriptor")
    return revents


class TamePoll:
    """select.poll() on a tame stack: register/modify/unregister/poll, the wait on the loop."""

    def __init__(self) -> None:
        self._poller = select.poll()
        self._masks: dict[int, int] = {}

    def register(
        self, fd: Any, eventmask: int = select.POLLIN | select.POLLPRI | select.POLLOUT
    ) -> None:
        fd = _fileno(fd)
        self._poller.register(fd, eventmask)
        self._masks[fd] = eventmask

    def modify(self, fd: Any, eventmask: int) -> None:
        fd = _fileno(fd)
        self._poller.modify(fd, eventmask)
        self._masks[fd] = eventmask

    def unregister(self, fd: Any) -> None:
        fd = _fileno(fd)
        self._poller.unregister(fd)
        del self._masks[fd]

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Like poll.poll: timeout in milliseconds, None or negative waits for ever."""
        if timeout is not None and timeout >= 0:
            deadline: float | None = time.monotonic() + timeout / 1000
        else:
            deadline = None
        events = self._poller.poll(0)
        if events or timeout == 0:
            checkpoint()
            return events
        reads = [fd for fd, mask in self._masks.items() if mask & _READ_EVENTS]
        writes = [fd for fd, mask in self._masks.items() if mask & select.POLLOUT]
        while True:
            if not wait_fds(reads, writes, deadline):
                return self._poller.poll(0)
            events = self._poller.poll(0)
            if events:
                return events


class _KeyMap(Mapping[Any, selectors.SelectorKey]):
    """A selector's fileobj -> SelectorKey mapping (read-only view)."""

    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            return self._keys[_fileno(fileobj)]
        except (TypeError, ValueError):
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)


class TameSelector(selectors.BaseSelector):
    """A selectors selector whose select() parks a tame stack on the loop (any fd number)."""

    def __init__(self) -> None:
        self._poll = TamePoll()
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._map: _KeyMap | None = _KeyMap(self._keys)

    def _fd_of(self, fileobj: Any) -> int:
        try:
            return _fileno(fileobj)
        except (TypeError, ValueError):
            # a closed file object can still be unregistered, by identity
            for key in self._keys.values():
                if key.fileobj is fileobj:
                    return key.fd
            raise ValueError(f"Invalid file object: {fileobj!r}") from None

    @staticmethod
    def _mask(events: int) -> int:
        return (select.POLLIN if events & selectors.EVENT_READ else 0) | (
            select.POLLOUT if events & selectors.EVENT_WRITE else 0
        )

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = self._fd_of(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._poll.register(fd, self._mask(events))
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = self._fd_of(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        self._poll.unregister(fd)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = self._fd_of(fileobj)
        try:
            key = self._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            self.unregister(fileobj)
            return self.register(fileobj, events, data)
        if data != key.data:
            key = self._keys[fd] = key._replace(data=data)
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            ms: float | None = None
        elif timeout <= 0:
            ms = 0
        else:
            ms = math.ceil(timeout * 1e3)
        ready = []
        for fd, revents in self._poll.poll(ms):
            events = 0
            if revents & ~select.POLLIN:
                events |= selectors.EVENT_WRITE
            if revents & ~select.POLLOUT:
                events |= selectors.EVENT_READ
            key = self._keys.get(fd)
            if key is not None:
                ready.append((key, events & key.events))
        return ready

    def close(self) -> None:
        self._keys.clear()
        self._map = None

    def get_map(self) -> Mapping[Any, selectors.SelectorKey] | None:
        return self._map
