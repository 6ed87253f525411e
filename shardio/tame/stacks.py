"""Pooled greenlet stacks that run blocking code inside an asyncio reactor.

``await tame.call(func, ...)`` runs ``func`` on a greenlet of the calling
loop's pool. When that code blocks through the tame Env (or ``tame.wait``),
its greenlet switches back to the loop (the *hub*) and is switched into
again when the operation completes: the reactor never blocks, and the
foreign code never sees an ``await``.

Runtime state (the pool, the io_uring driver, the alien pool) is per event
loop, so ``tame.call`` works in any running asyncio or uvloop loop; inside a
shard the runtime also registers its shutdown with the reactor.

Cancellation mirrors an asyncio task: cancelling the task that awaits
``tame.call`` raises ``asyncio.CancelledError`` inside the blocking call the
tame code is parked in, so its ``finally`` blocks run; ``tame.call`` returns
only once the tame code has finished (usually by letting CancelledError
propagate), so a stack goes back to the pool only when it is clean. Each
further cancel while the code is still unwinding raises one more
CancelledError at its next blocking call.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

try:
    from shardio.errors import ShardioError
except ImportError:  # pragma: no cover - the core's errors module is always shipped
    ShardioError = Exception  # type: ignore[misc,assignment]

__all__ = [
    "DEFAULT_MAX_STACKS",
    "NotOnTameStack",
    "Parked",
    "TameError",
    "call",
    "configure",
    "on_tame_stack",
    "runtime",
    "stats",
    "wait",
    "warm_up",
]

log = logging.getLogger("shardio.tame")

T = TypeVar("T")

#: Stacks per loop unless ``configure(max_stacks=...)`` says otherwise.
DEFAULT_MAX_STACKS = 256

_BLOCKED = object()  # what a parking stack hands the hub
_DONE = object()  # what a stack that finished its job hands the hub


class TameError(ShardioError):
    """Misuse of tame stacks (see the message for the fix)."""


class NotOnTameStack(TameError, RuntimeError):
    """A tame-stack-only operation was called elsewhere (e.g. tame.wait in a coroutine)."""


class StackKilled(TameError):
    """The loop's tame runtime was closed while this call was still running."""


def _current_reactor() -> Any:
    """shardio.reactor.current_reactor(), or None when there is no core or no shard."""
    global _current_reactor_fn
    if _current_reactor_fn is None:
        try:
            from shardio.reactor import current_reactor
        except ImportError:
            _current_reactor_fn = _no_reactor
        else:
            _current_reactor_fn = current_reactor
    return _current_reactor_fn()


def _no_reactor() -> None:
    return None


_current_reactor_fn: Callable[[], Any] | None = None


class _Job:
    """One tame.call: what to run and, once finished, its outcome."""

    __slots__ = ("func", "args", "kwargs", "fut", "ok", "value", "finished")

    def __init__(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.fut: asyncio.Future[None] | None = None
        self.ok = False
        self.value: Any = None
        self.finished = False


class TameGreenlet(greenlet):
    """A pooled stack. Runs one job after another; parks in the hub between jobs."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(self._main, rt.hub)
        self.rt = rt

    def _main(self, job: _Job) -> None:
        rt = self.rt
        hub = rt.hub
        while True:
            try:
                job.value = job.func(*job.args, **job.kwargs)
                job.ok = True
            except GreenletExit:
                # The runtime is closing (or the stack was collected) mid-job.
                job.value = StackKilled("the tame runtime was closed while this call ran")
                self._finish(job)
                raise
            except BaseException as exc:  # every outcome goes to the awaiting caller
                job.value = exc
                del exc
            self._finish(job)
            job = None  # type: ignore[assignment]  # drop references while pooled
            rt._release(self)
            job = hub.switch(_DONE)

    @staticmethod
    def _finish(job: _Job) -> None:
        job.finished = True
        job.func = job.args = job.kwargs = None  # type: ignore[assignment]
        fut = job.fut
        if fut is not None and not fut.done() and not fut.get_loop().is_closed():
            fut.set_result(None)


class Parked:
    """A tame stack waiting for one event; ``wake(value)`` resumes it with value.

    Usage on a tame stack: ``p = Parked(); <arrange for p.wake(v) later>;
    v = p.park()``. ``wake`` must run on the hub (a loop callback); from
    anywhere on the loop's thread use ``wake_soon``. Waking a stack that no
    longer waits (cancelled meanwhile) does nothing.
    """

    __slots__ = ("g", "rt")

    def __init__(self) -> None:
        g = getcurrent()
        if type(g) is not TameGreenlet:
            raise NotOnTameStack(
                "this blocking operation needs a tame stack (run it with tame.call)"
            )
        self.g: TameGreenlet | None = g
        self.rt: Runtime = g.rt

    def park(self) -> Any:
        """Switch to the hub until woken; return the wake value. Disarms on exceptions."""
        try:
            return self.rt.hub.switch(_BLOCKED)
        except BaseException:
            self.g = None
            raise

    def wake(self, value: Any = None) -> None:
        """Resume the parked stack now (call on the hub only)."""
        g = self.g
        if g is not None:
            self.g = None
            g.switch(value)

    def wake_soon(self, value: Any = None) -> None:
        """Resume the parked stack from the loop's next iteration (safe from a tame stack)."""
        self.rt.loop.call_soon(self.wake, value)

    @property
    def armed(self) -> bool:
        """True while the stack still waits for this wake-up."""
        return self.g is not None


class Stats:
    """Counters of one loop's tame runtime (read by the metrics layer)."""

    __slots__ = (
        "calls",
        "blocked_calls",
        "stacks_created",
        "stack_waits",
        "cancellations",
        "waits",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.blocked_calls = 0
        self.stacks_created = 0
        self.stack_waits = 0
        self.cancellations = 0
        self.waits = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Runtime:
    """The tame state of one event loop: stack pool, FIFO of waiters, Env, drivers."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_stacks: int = DEFAULT_MAX_STACKS
    ) -> None:
        self.loop = loop
        self.hub = getcurrent()
        self.thread_id = threading.get_ident()
        self.max_stacks = max_stacks
        self.free: list[TameGreenlet] = []
        self.n_stacks = 0
        self.waiters: collections.deque[asyncio.Future[TameGreenlet]] = collections.deque()
        self.stats = Stats()
        self.closed = False
        self.reactor = _current_reactor()
        if self.reactor is not None and getattr(self.reactor, "loop", None) is not loop:
            self.reactor = None
        self._env: Any = None
        self._uring: Any = None
        self._alien: Any = None
        self._sentinel: Any = None
        if self.reactor is not None:
            self.reactor.add_shutdown_hook(self.close)
        else:
            self._close_at_loop_shutdown()

    def _close_at_loop_shutdown(self) -> None:
        """Close with the loop: asyncio.run / uvloop.run call loop.shutdown_asyncgens()
        before closing the loop, which finalizes this suspended async generator."""

        async def sentinel() -> Any:
            try:
                yield
            finally:
                self.close()

        agen = sentinel()
        try:
            agen.asend(None).send(None)  # first iteration: the loop's asyncgen hooks see it
        except StopIteration:
            self._sentinel = agen  # the loop keeps only a weak reference

    # -- pool ------------------------------------------------------------------
    def _new_stack(self) -> TameGreenlet:
        self.n_stacks += 1
        self.stats.stacks_created += 1
        return TameGreenlet(self)

    async def _wait_for_stack(self) -> TameGreenlet:
        fut: asyncio.Future[TameGreenlet] = self.loop.create_future()
        self.waiters.append(fut)
        self.stats.stack_waits += 1
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(fut.result())  # handed a stack, then cancelled: pass it on
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _release(self, g: TameGreenlet) -> None:
        """A clean stack: hand it to the oldest waiter, else back to the pool."""
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(g)
                return
        if self.closed or self.n_stacks > self.max_stacks:
            self.n_stacks -= 1
            self.loop.call_soon(_kill, g)
        else:
            self.free.append(g)

    # -- services owned by the runtime -----------------------------------------
    @property
    def env(self) -> Any:
        """This loop's TameEnv."""
        if self._env is None:
            from .tame_env import TameEnv

            self._env = TameEnv(self)
        return self._env

    @property
    def uring(self) -> Any:
        """This loop's file I/O driver (io_uring, or the thread-pool fallback)."""
        if self._uring is None:
            from shardio.io.uring import open_driver

            self._uring = open_driver(self)
        return self._uring

    @property
    def alien(self) -> Any:
        """This loop's alien thread pool."""
        if self._alien is None:
            from .alien import AlienPool

            self._alien = AlienPool(self)
        return self._alien

    def check_thread(self, what: str) -> None:
        """Raise WrongThreadError unless called on this runtime's reactor thread."""
        if threading.get_ident() != self.thread_id:
            from shardio.errors import WrongThreadError

            raise WrongThreadError(
                f"{what} belongs to the reactor on thread {self.thread_id}; it was used from "
                f"thread {threading.get_ident()}. Tame objects are owned by one reactor: "
                "create one per shard, or send the work there (submit_to / external_submit)."
            )

    def close(self) -> None:
        """Kill idle stacks and release drivers; later tame.call on this loop makes a new runtime."""
        if self.closed:
            return
        self.closed = True
        self._sentinel = None
        _runtimes.pop(self.loop, None)
        if getattr(_tls, "rt", None) is self:
            _tls.rt = None
        free, self.free = self.free, []
        for g in free:
            self.n_stacks -= 1
            _kill(g)
        for w in self.waiters:
            if not w.done():
                w.set_exception(StackKilled("the tame runtime was closed"))
        self.waiters.clear()
        if self._alien is not None:
            self._alien.close()
        if self._uring is not None:
            self._uring.close()

    def __repr__(self) -> str:
        return (
            f"<tame.Runtime stacks={self.n_stacks}/{self.max_stacks} free={len(self.free)} "
            f"waiters={len(self.waiters)}>"
        )


def _kill(g: greenlet) -> None:
    if not g.dead and threading.get_ident() == g.rt.thread_id:
        g.throw(GreenletExit)


_tls = threading.local()
_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = (
    weakref.WeakKeyDictionary()
)
_configured: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


def runtime(loop: asyncio.AbstractEventLoop | None = None) -> Runtime:
    """The tame runtime of the running loop (created on first use)."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise TameError(
                "tame needs a running asyncio loop: call tame.call from a coroutine "
                "(in a shard, or under asyncio.run)"
            ) from None
    rt = getattr(_tls, "rt", None)
    if rt is not None and rt.loop is loop:
        return rt
    rt = _runtimes.get(loop)
    if rt is None or rt.closed:
        _close_stale_runtimes()
        rt = Runtime(loop, _configured.get(loop, DEFAULT_MAX_STACKS))
        _runtimes[loop] = rt
    _tls.rt = rt
    return rt


def _close_stale_runtimes() -> None:
    """Close the runtimes of loops that were closed without shutting them down."""
    for loop, rt in list(_runtimes.items()):
        if loop.is_closed() and threading.get_ident() == rt.thread_id:
            rt.close()


def configure(*, max_stacks: int) -> None:
    """Set the stack-pool bound of the running loop's tame runtime.

    Lowering it below the stacks in use takes effect as calls finish.
    """
    if max_stacks < 1:
        raise ValueError(f"max_stacks must be >= 1, got {max_stacks}")
    loop = asyncio.get_running_loop()
    _configured[loop] = max_stacks
    rt = runtime(loop)
    rt.max_stacks = max_stacks
    while rt.free and rt.n_stacks > max_stacks:
        rt.n_stacks -= 1
        _kill(rt.free.pop())
    while rt.waiters and rt.n_stacks < max_stacks:  # raising the bound frees waiters
        w = rt.waiters.popleft()
        if not w.done():
            w.set_result(rt._new_stack())


def warm_up(stacks: int = 0, file_io: bool = True) -> Runtime:
    """Create the running loop's tame runtime now: its file I/O driver (setting up
    the io_uring ring and its registered buffers takes ~1 ms)
    and up to ``stacks`` pooled stacks (~8 µs each). Call it when a shard starts,
    so the first tame call does not pay for this on the reactor."""
    rt = runtime()
    if file_io:
        rt.uring  # noqa: B018 - creating the driver is the point
    while len(rt.free) < stacks and rt.n_stacks < rt.max_stacks:
        rt.free.append(rt._new_stack())
    return rt


def stats() -> dict[str, int]:
    """Counters of the running loop's tame runtime, plus current pool occupancy."""
    rt = runtime()
    d = rt.stats.as_dict()
    d.update(
        stacks=rt.n_stacks,
        free_stacks=len(rt.free),
        max_stacks=rt.max_stacks,
        stack_waiters=len(rt.waiters),
    )
    return d


async def call(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` on a pooled tame stack of this loop; return its result.

    Blocking calls made through the tame Env (or ``tame.wait``) yield to the
    loop. Exceptions propagate with their traceback. If the pool is
    exhausted, the call waits (FIFO) for a stack. See the module docstring
    for cancellation.
    """
    rt = getattr(_tls, "rt", None)
    loop = asyncio.get_running_loop()
    if rt is None or rt.loop is not loop:
        rt = runtime(loop)
    if rt.free:
        g = rt.free.pop()
    elif rt.n_stacks < rt.max_stacks:
        g = rt._new_stack()
    else:
        g = await rt._wait_for_stack()
    if getcurrent() is not rt.hub:
        rt._release(g)
        raise TameError(
            "tame.call must be awaited by a task of the loop, not driven from a tame stack"
        )
    rt.stats.calls += 1
    job = _Job(func, args, kwargs)
    g.gr_context = contextvars.copy_context()
    if g.switch(job) is not _DONE:
        rt.stats.blocked_calls += 1
        fut = job.fut = loop.create_future()
        while not job.finished:
            try:
                await fut
            except asyncio.CancelledError as exc:
                if job.finished:
                    raise
                rt.stats.cancellations += 1
                fut = job.fut = loop.create_future()
                g.throw(asyncio.CancelledError(*exc.args))
    if job.ok:
        return job.value  # type: ignore[no-any-return]
    exc = job.value
    job.value = None
    try:
        raise exc
    finally:
        del exc


def wait(awaitable: Awaitable[T]) -> T:
    """On a tame stack: wait for an awaitable (future, task, coroutine) without blocking the loop.

    A coroutine becomes a task of the loop. If the tame call is cancelled
    meanwhile, the awaited future is cancelled and CancelledError is raised here.
    """
    g = getcurrent()
    if type(g) is not TameGreenlet:
        raise NotOnTameStack(
            "tame.wait() called outside a tame stack; in a coroutine use `await`, "
            "and run blocking code with `await tame.call(func)`"
        )
    rt = g.rt
    if asyncio.isfuture(awaitable):
        fut = awaitable
        if fut.get_loop() is not rt.loop:
            raise TameError("tame.wait: the future belongs to another event loop")
    else:
        fut = asyncio.ensure_future(awaitable, loop=rt.loop)
    if fut.done():
        return fut.result()  # type: ignore[no-any-return]
    rt.stats.waits += 1
    p = Parked()
    cb = _resume_cb(p)
    fut.add_done_callback(cb)
    try:
        p.park()
    except BaseException:
        fut.remove_done_callback(cb)
        fut.cancel()
        raise
    return fut.result()  # type: ignore[no-any-return]


def _resume_cb(p: Parked) -> Callable[[Any], None]:
    def cb(_fut: Any) -> None:
        p.wake(None)

    return cb


def on_tame_stack() -> bool:
    """True when called from code running on a tame stack."""
    return type(getcurrent()) is TameGreenlet


def current_runtime() -> Runtime | None:
    """The runtime of the tame stack running this code, else None."""
    g = getcurrent()
    return g.rt if type(g) is TameGreenlet else None
