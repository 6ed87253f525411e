"""Greenlet-aware locks, conditions, events, semaphores and queues of one reactor.

The TameEnv's versions of ``threading``'s and ``queue``'s primitives: same
semantics, FIFO, waits park the tame stack instead of blocking the thread.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from threading import get_ident
from typing import Any

from greenlet import getcurrent

from .stacks import NotOnTameStack, Parked, Runtime, TameGreenlet

_perf_counter = time.perf_counter


class _Waiter:
    __slots__ = ("p", "granted")

    def __init__(self, p: Parked) -> None:
        self.p = p
        self.granted = False


class _TameSync:
    """Base of the greenlet-aware primitives: FIFO waiters, owner-reactor checks."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def _quota(self) -> None:
        """The quota check (stacks.checkpoint), made *after* an operation that completed
        at once: a stack that yields keeps its place in the object's order."""
        if _perf_counter() > self._rt.deadline:
            self._rt.yield_now()

    def _check(self) -> None:
        if threading.get_ident() != self._rt.thread_id:
            self._rt.check_thread(f"tame {type(self).__name__.removeprefix('Tame')}")

    def _block(
        self, timeout: float | None, what: str, q: collections.deque[_Waiter] | None = None
    ) -> bool:
        """Park the calling stack in q until granted (True) or timeout seconds pass (False)."""
        g = getcurrent()
        if type(g) is not TameGreenlet or g.rt is not self._rt:
            where = (
                "a tame stack of another reactor"
                if type(g) is TameGreenlet
                else "outside a tame stack"
            )
            raise NotOnTameStack(
                f"{what} would block, and it was called {where}: only code running on a tame stack "
                "of the reactor that owns this object may wait on it (run it with `await tame.call(...)`)"
            )
        if timeout is not None and timeout <= 0:
            return False
        if q is None:
            q = self._waiters
        w = _Waiter(Parked(type(self).__name__.removeprefix("Tame").lower(), self))
        q.append(w)
        timer = None if timeout is None else self._rt.loop.call_later(timeout, w.p.wake)
        try:
            w.p.park()
        except BaseException:
            if w.granted:
                self._lost_grant(q)
            else:
                _discard(q, w)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not w.granted:
            _discard(q, w)
        return w.granted

    @staticmethod
    def _grant(q: collections.deque[_Waiter]) -> _Waiter | None:
        """Wake the oldest waiter of q as granted; return it (None if q is empty)."""
        while q:
            w = q.popleft()
            if w.p.armed:
                w.granted = True
                w.p.wake_soon()
                return w
        return None

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        """A granted waiter died (cancelled) before using its grant: pass it on."""
        self._grant(q)


def _discard(q: collections.deque[_Waiter], w: _Waiter) -> None:
    try:
        q.remove(w)
    except ValueError:
        pass


class TameLock(_TameSync):
    """threading.Lock for tame stacks: FIFO hand-off, waiting yields to the reactor."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self._locked = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        rt = self._rt  # the owner check and the quota (stacks.checkpoint), inlined: hot
        if get_ident() != rt.thread_id:
            rt.check_thread("tame Lock")
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if not self._locked and not self._waiters:
            self._locked = True
            if _perf_counter() > rt.deadline:  # after taking it: arrival order is kept
                rt.yield_now()
            return True
        if not blocking:
            if _perf_counter() > rt.deadline:
                rt.yield_now()
            return False
        return self._block(None if timeout < 0 else timeout, "Lock.acquire")

    def release(self) -> None:
        if get_ident() != self._rt.thread_id:
            self._rt.check_thread("tame Lock")
        if not self._locked:
            raise RuntimeError("release unlocked lock")
        if not self._waiters or self._grant(self._waiters) is None:
            self._locked = False

    def locked(self) -> bool:
        return self._locked

    _lost_grant = lambda self, q: self.release()  # noqa: E731 - the grant was the lock itself

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    # Condition support
    def _is_owned(self) -> bool:
        return self._locked

    def _release_save(self) -> None:
        self.release()

    def _acquire_restore(self, state: None) -> None:
        self.acquire()

    def __repr__(self) -> str:
        return (
            f"<tame Lock {'locked' if self._locked else 'unlocked'} waiters={len(self._waiters)}>"
        )


class TameRLock(_TameSync):
    """threading.RLock for tame stacks; the owner is the tame stack (greenlet)."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self._owner: Any = None
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self._check()
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        me = getcurrent()
        if self._owner is me:
            self._count += 1
            self._quota()
            return True
        if self._owner is None and not self._waiters:
            self._owner, self._count = me, 1
            self._quota()
            return True
        if not blocking:
            self._quota()
            return False
        return self._block(None if timeout < 0 else timeout, "RLock.acquire")

    def release(self) -> None:
        self._check()
        if self._owner is not getcurrent():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if not self._count:
            self._hand_off()

    def _hand_off(self) -> None:
        w = self._grant(self._waiters)
        if w is None:
            self._owner = None
        else:
            self._owner, self._count = w.p.g, 1

    def _grant(self, q: collections.deque[_Waiter]) -> _Waiter | None:  # type: ignore[override]
        while q:
            w = q.popleft()
            g = w.p.g
            if g is not None:
                w.granted = True
                w.p.wake_soon()
                self._owner, self._count = g, 1
                return w
        return None

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        self._hand_off()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._owner is getcurrent()

    def _release_save(self) -> tuple[int, Any]:
        state = (self._count, self._owner)
        self._count = 0
        self._hand_off()
        return state

    def _acquire_restore(self, state: tuple[int, Any]) -> None:
        self.acquire()
        self._count = state[0]

    def __repr__(self) -> str:
        return (
            f"<tame RLock owner={self._owner!r} count={self._count} waiters={len(self._waiters)}>"
        )


class TameCondition(_TameSync):
    """threading.Condition for tame stacks (over a tame Lock or RLock)."""

    def __init__(self, rt: Runtime, lock: TameLock | TameRLock | None = None) -> None:
        super().__init__(rt)
        if lock is None:
            lock = TameRLock(rt)
        elif not isinstance(lock, TameLock | TameRLock):
            raise TypeError(
                f"a tame Condition needs a tame lock (env.Lock() or env.RLock()), not {lock!r}: "
                "waiting on a real threading lock would block the whole reactor"
            )
        self._lock = lock
        self.acquire = lock.acquire
        self.release = lock.release

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        self._check()
        if not self._lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        state = self._lock._release_save()
        try:
            return self._block(timeout, "Condition.wait")
        finally:
            self._lock._acquire_restore(state)  # type: ignore[arg-type]

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = time.monotonic() + waittime
                else:
                    waittime = endtime - time.monotonic()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        self._check()
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        for _ in range(n):
            if self._grant(self._waiters) is None:
                break

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


class TameEvent(_TameSync):
    """threading.Event for tame stacks."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._check()
        self._flag = True
        while self._grant(self._waiters) is not None:
            pass

    def clear(self) -> None:
        self._check()
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        self._check()
        if self._flag:
            self._quota()
            return True
        return self._block(timeout, "Event.wait") or self._flag

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        pass  # every waiter was woken anyway


class TameSemaphore(_TameSync):
    """threading.Semaphore for tame stacks (FIFO: a release hands the unit to the oldest waiter)."""

    def __init__(self, rt: Runtime, value: int = 1) -> None:
        super().__init__(rt)
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._value = value

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        self._check()
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        if self._value > 0 and not self._waiters:
            self._value -= 1
            self._quota()
            return True
        if not blocking:
            self._quota()
            return False
        return self._block(timeout, "Semaphore.acquire")

    def release(self, n: int = 1) -> None:
        self._check()
        if n < 1:
            raise ValueError("n must be one or more")
        for _ in range(n):
            if self._grant(self._waiters) is None:
                self._value += 1

    def _lost_grant(self, q: collections.deque[_Waiter]) -> None:
        self.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


class TameBoundedSemaphore(TameSemaphore):
    """threading.BoundedSemaphore for tame stacks."""

    def __init__(self, rt: Runtime, value: int = 1) -> None:
        super().__init__(rt, value)
        self._initial = value

    def release(self, n: int = 1) -> None:
        self._check()
        if n < 1:
            raise ValueError("n must be one or more")
        if self._value + n > self._initial:
            raise ValueError("Semaphore released too many times")
        super().release(n)


class TameQueue(_TameSync):
    """queue.Queue for tame stacks (raises queue.Empty / queue.Full)."""

    def __init__(self, rt: Runtime, maxsize: int = 0) -> None:
        super().__init__(rt)
        self.maxsize = maxsize
        self._items: collections.deque[Any] = collections.deque()
        self._getters: collections.deque[_Waiter] = collections.deque()
        self._putters: collections.deque[_Waiter] = collections.deque()
        self._joiners: collections.deque[_Waiter] = collections.deque()
        self.unfinished_tasks = 0

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def _wait_while(
        self,
        cond: Callable[[], bool],
        q: collections.deque[_Waiter],
        block: bool,
        timeout: float | None,
        what: str,
        exc: type[Exception],
    ) -> None:
        if not cond():
            return
        if not block:
            raise exc
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        deadline = None if timeout is None else time.monotonic() + timeout
        while cond():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise exc
            self._block(remaining, what, q)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._check()
        try:
            self._wait_while(self.full, self._putters, block, timeout, "Queue.put", queue.Full)
            self._items.append(item)
            self.unfinished_tasks += 1
            self._grant(self._getters)
        finally:
            self._quota()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self._check()
        try:
            self._wait_while(self.empty, self._getters, block, timeout, "Queue.get", queue.Empty)
            item = self._items.popleft()
            self._grant(self._putters)
        finally:
            self._quota()
        return item

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def task_done(self) -> None:
        self._check()
        if self.unfinished_tasks <= 0:
            raise ValueError("task_done() called too many times")
        self.unfinished_tasks -= 1
        if not self.unfinished_tasks:
            while self._grant(self._joiners) is not None:
                pass

    def join(self) -> None:
        self._check()
        while self.unfinished_tasks:
            self._block(None, "Queue.join", self._joiners)
        self._quota()
