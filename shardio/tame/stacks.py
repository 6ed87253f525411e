"""Pooled greenlet stacks that run blocking code inside an asyncio reactor.

``await tame.call(func, ...)`` runs ``func`` on a greenlet of the calling
loop's pool. When that code blocks through the tame Env (or ``tame.wait``),
its greenlet switches back to the loop (the *hub*) and is switched into
again when the operation completes: the reactor never blocks, and the
foreign code never sees an ``await``.

Runtime state (the pool, the io_uring driver, the alien pool) is per event
loop, so ``tame.call`` works in any running asyncio or uvloop loop; inside a
shard the runtime also registers its shutdown with the reactor.

The quota. A stack that has run for ``quota`` (default 0.5 ms, Seastar's
task quota; ``configure(quota=...)``, ``ShardGroup(tame_quota_ms=...)``)
yields to the loop at its next tamed call, even when that call could
complete at once (a page-cache hit, a ready socket, an uncontended lock):
every tamed call site calls :func:`checkpoint`. The budget belongs to the
loop turn, not to one stack: the scheduler resumes stacks back to back only
until the turn has spent ``quota`` on tame work, then defers the remaining
resumptions to the next turn, so the loop polls its I/O and timers at least
once per quota. The runtime keeps its own accounting of every slice it
grants (``stats()["longest_slice_ns"]``, ``["longest_turn_ns"]``), in thread
CPU time, when asked to with ``configure(account_cpu=True)``.

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
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

from . import _parking
from ._parking import Parked, RuntimeCore

try:
    from shardio.errors import ShardioError
except ImportError:  # pragma: no cover - the core's errors module is always shipped
    ShardioError = Exception  # type: ignore[misc,assignment]

__all__ = [
    "DEFAULT_MAX_STACKS",
    "DEFAULT_QUOTA",
    "NotOnTameStack",
    "Parked",
    "TameConfigError",
    "TameError",
    "call",
    "checkpoint",
    "configure",
    "on_tame_stack",
    "runtime",
    "start",
    "turn_spent",
    "stats",
    "wait",
    "warm_up",
]

log = logging.getLogger("shardio.tame")

T = TypeVar("T")

#: Stacks per loop unless ``configure(max_stacks=...)`` says otherwise.
DEFAULT_MAX_STACKS = 256

#: Seconds of tame work per loop turn before stacks yield (Seastar's task quota).
DEFAULT_QUOTA = 0.0005

_perf_counter = time.perf_counter
_thread_time = time.thread_time

_BLOCKED = object()  # what a parking stack hands the hub
_DONE = object()  # what a stack that finished its job hands the hub


class TameError(ShardioError):
    """Misuse of tame stacks (see the message for the fix)."""


class NotOnTameStack(TameError, RuntimeError):
    """A tame-stack-only operation was called elsewhere (e.g. tame.wait in a coroutine)."""


class TameConfigError(TameError, ValueError):
    """A tame setting (``configure``, ``ShardGroup`` tame options) has an invalid value."""


class StackKilled(TameError):
    """The loop's tame runtime was closed while this call was still running."""


class _Job:
    """One tame.call: what to run and, once finished, its outcome.

    ``started`` (False while a deferred start waits for its turn) and
    ``abandoned`` (cancelled before that start) are set only on deferred
    starts: read them with ``job_started`` / ``getattr(job, "abandoned", False)``.
    """

    __slots__ = ("func", "args", "kwargs", "fut", "ok", "value", "finished", "started", "abandoned")

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


def job_started(job: _Job) -> bool:
    """False while a deferred start waits for its turn."""
    return getattr(job, "started", True)


#: How far below the creating frame a new stack is first entered (Runtime._new_stack):
#: deeper than the loop's callback frames reach above it (measured: ~13 KiB).
_STACK_BASE_OFFSET = 64 << 10
_PRIME: Any = object()  # the first switch into a new stack: no job yet


class TameGreenlet(greenlet):
    """A pooled stack. Runs one job after another; parks in the hub between jobs."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(self._main, rt.hub)
        self.rt = rt
        # What it waits on while parked in an operation: a Parked, or the seconds of a sleep.
        self.parked: Parked | float | None = None
        self.parked_at = 0.0  # perf_counter() when its last slice ended
        self.job: _Job | None = None

    def _main(self, job: _Job) -> None:
        rt = self.rt
        hub = rt.hub
        if job is _PRIME:  # entered by _new_stack: wait in the hub for the first job
            job = hub.switch(_PRIME)
        while True:
            if rt.account_cpu:
                rt._account_start()
            try:
                job.value = job.func(*job.args, **job.kwargs)
                job.ok = True
            except GreenletExit:
                # The runtime is closing (or the stack was collected) mid-job.
                job.value = StackKilled("the tame runtime was closed while this call ran")
                self._finish(job)
                self.job = None
                raise
            except BaseException as exc:  # every outcome goes to the awaiting caller
                job.value = exc
                del exc
            self._finish(job)
            self.job = job = None  # type: ignore[assignment]  # drop references while pooled
            rt._release(self)
            if rt.account_cpu:
                rt._account_end()
            job = hub.switch(_DONE)

    @staticmethod
    def _finish(job: _Job) -> None:
        job.finished = True
        job.func = job.args = job.kwargs = None  # type: ignore[assignment]
        fut = job.fut
        if fut is not None and not fut.done() and not fut.get_loop().is_closed():
            fut.set_result(None)


# The wake-up token and the park/resume/checkpoint protocol live in C (_parking.c): a
# blocking call costs no Python frame of its own. It needs to know the stack type, the
# hub's marker and the exceptions to raise.
_parking.setup(TameGreenlet, getcurrent, _BLOCKED, NotOnTameStack, TameError)


class Stats:
    """Counters of one loop's tame runtime (read by the metrics layer)."""

    __slots__ = (
        "calls",
        "blocked_calls",
        "stacks_created",
        "stack_waits",
        "cancellations",
        "waits",
        "quota_yields",
        "deferred_resumes",
        "deferred_starts",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.blocked_calls = 0
        self.stacks_created = 0
        self.stack_waits = 0
        self.cancellations = 0
        self.waits = 0
        self.quota_yields = 0  # checkpoints that yielded: the stack had used up the quota
        self.deferred_resumes = 0  # wake-ups moved to the next turn: the turn's quota was spent
        self.deferred_starts = 0  # tame.call starts moved to the next turn, likewise

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _MadeOnFirstUse:
    """``Runtime.uring``: a non-data descriptor that opens the file driver on the first
    read and stores it as an instance attribute, which later reads find first (a
    property would cost a Python call per read; a ``__getattr__`` on the class would
    stop CPython from specializing every attribute access to the runtime)."""

    def __get__(self, rt: Runtime | None, owner: type | None = None) -> Any:
        if rt is None:
            return self
        from shardio.io.uring import open_driver

        rt._uring = rt.uring = open_driver(rt)
        return rt._uring


class Runtime(RuntimeCore):
    """The tame state of one event loop: stack pool, FIFO of waiters, Env, drivers.

    Its base, ``_parking.RuntimeCore``, holds the fields the C park/wake/checkpoint
    paths read on every call: ``hub_switch``, ``call_soon``, ``deadline``,
    ``half_deadline``, ``last_end``, ``account_cpu``.
    """

    #: The wake-up token of a parking stack, for drivers the runtime owns (``rt.Parked(
    #: "io_uring", op)``): they need not import tame to park a stack.
    Parked = Parked

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_stacks: int = DEFAULT_MAX_STACKS,
        quota: float | None = DEFAULT_QUOTA,
        account_cpu: bool = False,
    ) -> None:
        self.loop = loop
        self.hub = getcurrent()
        self.hub_switch = self.hub.switch  # bound once: the hot paths use them
        self.call_soon = loop.call_soon
        self.call_later = loop.call_later
        self.thread_id = threading.get_ident()
        self.max_stacks = max_stacks
        self.free: list[TameGreenlet] = []
        self.stacks: weakref.WeakSet[TameGreenlet] = weakref.WeakSet()  # for dump_stacks
        self.n_stacks = 0
        self.waiters: collections.deque[asyncio.Future[TameGreenlet]] = collections.deque()
        self.stats = Stats()
        self.closed = False
        # The scheduler's budget (see the module docstring): the tame work of one
        # window, which starts with a loop turn, is limited to the quota.
        self.account_cpu = account_cpu
        self.turn_start = 0.0  # start of the current window
        self.half_deadline = self.deadline = math.inf  # turn_start + quota / 2, + quota
        self.turn_used = 0.0  # tame CPU time of the window (account_cpu only)
        self.quota = self.half_quota = math.inf
        self.set_quota(quota)
        self.marker_pending = False  # _close_turn is scheduled: the window's turn goes on
        self.last_end = 0.0  # perf_counter() at the end of the last slice
        self.longest_slice = 0.0
        self.longest_turn = 0.0
        self.slice_cpu = 0.0  # thread_time() when the running slice began (account_cpu)
        # Wake-ups and starts that found the quota spent, run in order on later turns.
        self.ready: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self.ready_scheduled = False
        # The scheduling group whose slice runs now (shardio.scheduling sets it): a
        # tame.call or tame.start made meanwhile joins that group.
        self.running_group: Any = None
        self.reactor = _reactors.get(loop)
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

    # -- scheduler ---------------------------------------------------------------
    # A window of tame work starts with a loop turn and may run stacks back to back
    # for ``quota``. Knowing that the loop has turned costs a callback (_close_turn),
    # so one is scheduled only once a window is half spent, not on every turn; until
    # it runs, the window is taken to go on (a stack may then yield a little early,
    # never late). A window also starts afresh when no stack ran for half a quota.
    def set_quota(self, quota: float | None) -> None:
        """Seconds of tame work per window (None: no preemption)."""
        self.quota = math.inf if quota is None else float(quota)
        self.half_quota = self.quota / 2
        self._set_window(self.turn_start)

    def _set_window(self, start: float) -> None:
        # The deadline is the same for every stack of the window: past it, a stack
        # yields at its next tamed call (checkpoint compares one clock read with it).
        self.turn_start = start
        self.half_deadline = start + self.half_quota
        self.deadline = start + self.quota
        self.turn_used = 0.0

    def _may_run(self, now: float) -> bool:
        """Past half the window: may a stack still be resumed now? (Schedules the marker.)"""
        if not self.marker_pending:
            self.marker_pending = True
            self.loop.call_soon(self._close_turn)
            if now - self.last_end > self.half_quota:  # idle, or the loop was busy elsewhere
                self._set_window(now)
                return True
        return now - self.turn_start <= self.quota

    def _close_turn(self) -> None:
        # Runs on a later loop iteration: the loop has polled I/O and timers since.
        self.marker_pending = False
        self._set_window(_perf_counter())

    def _defer(self, resume: Callable[[Any], None], arg: Any) -> None:
        """Queue ``resume(arg)`` (a wake-up or a start) for a later turn (safe from a stack)."""
        if not self.marker_pending:  # first the new window, then the queue
            self.marker_pending = True
            self.loop.call_soon(self._close_turn)
        self.ready.append((resume, arg))
        if not self.ready_scheduled:
            self.ready_scheduled = True
            self.loop.call_soon(self._run_ready)

    def _run_ready(self) -> None:
        """Resume deferred stacks, oldest first, while the window's quota lasts."""
        self.ready_scheduled = False
        ready = self.ready
        while ready:
            now = _perf_counter()
            if now > self.half_deadline and not self._may_run(now):
                if not self.ready_scheduled:  # a stack resumed here may have queued it
                    self.ready_scheduled = True
                    self.loop.call_soon(self._run_ready)
                return
            resume, arg = ready.popleft()
            resume(arg)

    def _start_deferred(self, start: tuple[TameGreenlet, _Job]) -> None:
        g, job = start
        if getattr(job, "abandoned", False):
            return
        job.started = True
        self.last_end = _perf_counter()
        g.switch(job)

    # Stacks keep the books themselves, at their switches (a resumption from the
    # loop is then just greenlet.switch): after every resumption the arrival check
    # (in C: Parked.park, _parking.suspend), and before every switch to the hub,
    # last_end/parked_at (and _account_end).
    def _arrive_late(self, now: float) -> None:
        """On a stack just resumed past half the window (the arrival check calls it):
        queue it for a later turn, and switch out at once, if the quota is spent."""
        if not self._may_run(now):
            self.stats.deferred_resumes += 1
            self._requeue()

    def _account_start(self) -> None:
        self.slice_cpu = _thread_time()

    def _account_end(self) -> None:
        used = _thread_time() - self.slice_cpu
        if used > self.longest_slice:
            self.longest_slice = used
        self.turn_used += used
        if self.turn_used > self.longest_turn:
            self.longest_turn = self.turn_used

    def yield_now(self) -> None:
        """On one of this runtime's stacks: let the loop run a turn, then continue.

        Does nothing elsewhere (the hub, where a quota check may also run)."""
        g = getcurrent()
        if type(g) is not TameGreenlet or g.rt is not self:
            return
        self.stats.quota_yields += 1
        self._requeue()

    def _requeue(self) -> None:
        p = Parked("quota")
        p.deferred = True  # "ready" in dump_stacks
        self._defer(p._wake_deferred, None)
        p.park()

    # -- pool ------------------------------------------------------------------
    def _new_stack(self) -> TameGreenlet:
        self.n_stacks += 1
        self.stats.stacks_created += 1
        g = TameGreenlet(self)
        self.stacks.add(g)
        if getcurrent() is self.hub:  # (else it starts where it is first switched to)
            # First entered far below the loop's frames, so that later switches to
            # it copy only its own stack (see call_below in _parking.c).
            _parking.call_below(_STACK_BASE_OFFSET, g.switch, _PRIME)
        return g

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

    # This loop's file I/O driver (io_uring, or the thread-pool fallback): made on first
    # use, then a plain instance attribute, since every tamed file call reads it.
    uring: Any = _MadeOnFirstUse()

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
_configured: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
# The shard reactor of a loop, registered by the reactor's start hook (``attach_reactor``).
_reactors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


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
        rt = Runtime(loop, **_configured.get(loop, {}))
        _runtimes[loop] = rt
    _tls.rt = rt
    return rt


def _close_stale_runtimes() -> None:
    """Close the runtimes of loops that were closed without shutting them down."""
    for loop, rt in list(_runtimes.items()):
        if loop.is_closed() and threading.get_ident() == rt.thread_id:
            rt.close()


_UNSET: Any = object()


def configure(
    *,
    max_stacks: int | None = None,
    quota: float | None = _UNSET,
    account_cpu: bool | None = None,
) -> None:
    """Set the running loop's tame runtime: stack-pool bound, quota, slice accounting.

    ``max_stacks``: lowering it below the stacks in use takes effect as calls
    finish. ``quota``: seconds of tame work per loop turn before stacks yield
    at their next tamed call (default :data:`DEFAULT_QUOTA`, 0.5 ms); None
    turns preemption off. ``account_cpu``: measure every granted slice in
    thread CPU time (``time.thread_time``, a system call per switch: about
    1 µs each on a VM), for ``stats()``'s longest slice and turn. Settings outlive the
    runtime: a runtime made later on the same loop gets them too.
    """
    if max_stacks is not None and (not isinstance(max_stacks, int) or max_stacks < 1):
        raise TameConfigError(f"max_stacks must be an integer >= 1, got {max_stacks!r}")
    if (
        quota is not _UNSET
        and quota is not None
        and not (isinstance(quota, int | float) and 0 < quota < math.inf)
    ):
        raise TameConfigError(
            f"quota must be a positive number of seconds (e.g. 0.0005) or None for no "
            f"preemption, got {quota!r}"
        )
    loop = asyncio.get_running_loop()
    settings = _configured.setdefault(loop, {})
    rt = runtime(loop)
    if quota is not _UNSET:
        settings["quota"] = quota
        rt.set_quota(quota)
    if account_cpu is not None:
        settings["account_cpu"] = bool(account_cpu)
        rt.account_cpu = bool(account_cpu)
    if max_stacks is None:
        return
    settings["max_stacks"] = max_stacks
    rt.max_stacks = max_stacks
    while rt.free and rt.n_stacks > max_stacks:
        rt.n_stacks -= 1
        _kill(rt.free.pop())
    while rt.waiters and rt.n_stacks < max_stacks:  # raising the bound frees waiters
        w = rt.waiters.popleft()
        if not w.done():
            w.set_result(rt._new_stack())


def attach_reactor(reactor: Any) -> None:
    """Start hook of a shard reactor (on its thread, loop running): tame runtimes of
    this loop belong to ``reactor``: they close with it, reap I/O from its poll
    loop, post from other threads through its inbox, and appear in its stall
    reports. The reactor never imports tame; ``shardio.launch`` registers this."""
    loop = asyncio.get_running_loop()
    _reactors[loop] = reactor
    rt = _runtimes.get(loop)
    if rt is not None and rt.reactor is None:  # made before the hook ran: adopt it
        rt.close()


def loop_runtime(loop: asyncio.AbstractEventLoop) -> Runtime | None:
    """The live tame runtime of ``loop``, without creating one (any thread may ask)."""
    rt = _runtimes.get(loop)
    return None if rt is None or rt.closed else rt


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


def stats() -> dict[str, Any]:
    """Counters of the running loop's tame runtime, pool occupancy and slice accounting.

    With ``configure(account_cpu=True)`` (else they stay 0):
    ``longest_slice_ns``: the longest slice the scheduler granted one stack;
    ``longest_turn_ns``: the most tame time one window (a loop turn, or a few)
    spent back to back; both in thread CPU time;
    ``slice_clock``: "thread_cpu", or "off" when not measured;
    ``quota_ns``: the quota (0 when preemption is off).
    """
    rt = runtime()
    d: dict[str, Any] = rt.stats.as_dict()
    d.update(
        stacks=rt.n_stacks,
        free_stacks=len(rt.free),
        max_stacks=rt.max_stacks,
        stack_waiters=len(rt.waiters),
        longest_slice_ns=round(rt.longest_slice * 1e9),
        longest_turn_ns=round(rt.longest_turn * 1e9),
        slice_clock="thread_cpu" if rt.account_cpu else "off",
        quota_ns=0 if rt.quota == math.inf else round(rt.quota * 1e9),
    )
    return d


def reset_accounting() -> None:
    """Forget the running loop's longest slice and turn (e.g. after a warm-up phase)."""
    rt = runtime()
    rt.longest_slice = rt.longest_turn = 0.0


_CALL_MISUSE = "tame.call must be awaited by a task of the loop, not driven from a tame stack"
_START_MISUSE = "tame.start must be called from the loop, not from a tame stack"


def _pooled_stack(rt: Runtime) -> TameGreenlet | None:
    """A free stack of the pool, else a new one while the pool may grow, else None.

    (Compare with None: an unstarted greenlet is false.)"""
    if rt.free:
        return rt.free.pop()
    if rt.n_stacks < rt.max_stacks:
        return rt._new_stack()
    return None


def _from_the_hub(rt: Runtime, g: TameGreenlet, misuse: str) -> None:
    """Stacks start from the loop (the hub) only: elsewhere, give ``g`` back and raise."""
    if getcurrent() is not rt.hub:
        rt._release(g)
        raise TameError(misuse)


async def call(func: Callable[..., T], /, *args: Any, group: Any = None, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` on a pooled tame stack of this loop; return its result.

    Blocking calls made through the tame Env (or ``tame.wait``) yield to the
    loop. Exceptions propagate with their traceback. If the pool is
    exhausted, the call waits (FIFO) for a stack; if this loop turn has
    used up its quota, the call starts on the next turn. See the module
    docstring for cancellation.

    ``group``: a ``shardio.SchedulingGroup``: the stack runs in that group's
    time (docs/scheduling.md); a call made while a group's slice runs joins that
    group. ``group`` is therefore not passed on to ``func``.
    """
    rt = getattr(_tls, "rt", None)
    loop = asyncio.get_running_loop()
    if rt is None or rt.loop is not loop:
        rt = runtime(loop)
    if group is not None or rt.running_group is not None:
        return await _call_in_group(rt, loop, group, func, args, kwargs)  # type: ignore[no-any-return]
    now = _perf_counter()
    deferred = now > rt.half_deadline and not rt._may_run(now)
    g = _pooled_stack(rt)
    if g is None:
        g = await rt._wait_for_stack()
    _from_the_hub(rt, g, _CALL_MISUSE)
    rt.stats.calls += 1
    job = g.job = _Job(func, args, kwargs)
    g.gr_context = contextvars.copy_context()
    if deferred:  # this turn's quota is spent: start in order on a later turn
        rt.stats.deferred_starts += 1
        job.started = False
        job.fut = loop.create_future()
        rt._defer(rt._start_deferred, (g, job))
        blocked = True
    else:
        rt.last_end = now  # a stack runs: the window is not idle (see Runtime._may_run)
        blocked = g.switch(job) is not _DONE
    if blocked:
        rt.stats.blocked_calls += 1
        fut = job.fut
        if fut is None:
            fut = job.fut = loop.create_future()
        while not job.finished:
            try:
                await fut
            except asyncio.CancelledError as exc:
                if job.finished:
                    raise
                if not job_started(job):  # never ran: nothing to unwind
                    job.abandoned = True
                    g.job = None
                    rt._release(g)
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


def start(func: Callable[..., Any], /, *args: Any, group: Any = None) -> bool | None:
    """From the loop itself (a protocol or loop callback): run ``func(*args)`` on a
    pooled tame stack now, with no future, task or awaitable in between.

    Returns True when ``func`` finished before ``start`` returned, False when it
    parked (a blocking call, or the quota: it then resumes and finishes on its
    own, from the loop), and None when nothing ran: every stack is in use
    (``tame.call`` waits for one) or this loop turn has spent its quota
    (``turn_spent()``: start it on a later turn). ``func`` owns its outcome:
    an exception it lets out is logged, since nobody awaits it. It runs in a
    copy of the caller's context, like ``tame.call``.

    This is the connection core's entry (``shardio.net``): a batch of
    requests costs two greenlet switches, against a coroutine, a job future
    and a loop callback per request through ``tame.call``.

    With ``group`` (a ``shardio.SchedulingGroup``; also when called during a
    group's slice) the stack is queued in that group and starts at its next
    turn: the result is then False, or None when every stack is in use.
    """
    rt = getattr(_tls, "rt", None)
    if rt is None or rt.closed:
        rt = runtime()
    if group is not None or rt.running_group is not None:
        return _start_in_group(rt, group, func, args)
    now = _perf_counter()
    if rt.ready or (now > rt.half_deadline and not rt._may_run(now)):
        return None  # the window is spent, or deferred work waits: do not overtake it
    g = _pooled_stack(rt)
    if g is None:
        return None
    _from_the_hub(rt, g, _START_MISUSE)
    rt.stats.calls += 1
    job = g.job = _Job(_logged, (func, args), {})
    g.gr_context = contextvars.copy_context()
    rt.last_end = now  # a stack runs: the window is not idle (see Runtime._may_run)
    if g.switch(job) is _DONE:
        return True
    rt.stats.blocked_calls += 1
    return False


# -- stacks in scheduling groups ---------------------------------------------------
# A stack running a group's job has its own ``switch``: an instance attribute that
# shadows greenlet.switch, so every resumption of it (Parked.wake, a sleep's timer,
# a deferred start) goes through the group: at once while the group's slice runs,
# else queued for the group's next slice. Other stacks have no such attribute and
# pay nothing. The group's queue (shardio.scheduling.scheduler.GroupQueue) has
# ``running`` and ``defer(resume, arg)``.
_greenlet_switch = greenlet.switch


def _group_queue(rt: Runtime, group: Any) -> Any:
    return rt.running_group if group is None else group.queue_on(rt.loop)


def _gated_switch(queue: Any, g: TameGreenlet, job: _Job) -> Callable[..., Any]:
    def switch(*args: Any) -> Any:
        if queue.running:
            return _greenlet_switch(g, *args)
        queue.defer(_resume_in_group, (g, job, args))
        return None

    return switch


def _resume_in_group(entry: tuple[TameGreenlet, _Job, tuple[Any, ...]]) -> None:
    g, job, args = entry
    if g.job is job:  # not a wake-up that lost to a cancellation which ended the job
        _greenlet_switch(g, *args)


def _throw_in_group(entry: tuple[TameGreenlet, _Job, BaseException]) -> None:
    g, job, exc = entry
    if g.job is job and not job.finished:
        g.throw(exc)


def _in_group(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A group job's body: ``func``, then the stack's own switch again (back to the pool)."""
    try:
        return func(*args, **kwargs)
    finally:
        del getcurrent().switch


def _group_stack(rt: Runtime, queue: Any, func: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], g: TameGreenlet) -> _Job:
    rt.stats.calls += 1
    job = g.job = _Job(_in_group, (func, args, kwargs), {})
    g.gr_context = contextvars.copy_context()
    g.switch = _gated_switch(queue, g, job)  # type: ignore[method-assign]
    job.started = False
    queue.defer(rt._start_deferred, (g, job))
    return job


async def _call_in_group(rt: Runtime, loop: asyncio.AbstractEventLoop, group: Any,
                         func: Callable[..., Any], args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
    """tame.call in a scheduling group: the start and every resumption go through it."""
    queue = _group_queue(rt, group)
    g = _pooled_stack(rt)
    if g is None:
        g = await rt._wait_for_stack()
    _from_the_hub(rt, g, _CALL_MISUSE)
    fut = loop.create_future()
    job = _group_stack(rt, queue, func, args, kwargs, g)
    job.fut = fut
    rt.stats.blocked_calls += 1
    while not job.finished:
        try:
            await fut
        except asyncio.CancelledError as exc:
            if job.finished:
                raise
            if not job_started(job):  # never ran: nothing to unwind
                job.abandoned = True
                g.job = None
                del g.switch
                rt._release(g)
                raise
            rt.stats.cancellations += 1
            fut = job.fut = loop.create_future()
            queue.defer(_throw_in_group, (g, job, asyncio.CancelledError(*exc.args)))
    if job.ok:
        return job.value
    exc = job.value
    job.value = None
    try:
        raise exc
    finally:
        del exc


def _start_in_group(rt: Runtime, group: Any, func: Callable[..., Any],
                    args: tuple[Any, ...]) -> bool | None:
    queue = _group_queue(rt, group)
    g = _pooled_stack(rt)
    if g is None:
        return None
    _from_the_hub(rt, g, _START_MISUSE)
    _group_stack(rt, queue, _logged, (func, args), {}, g)
    rt.stats.blocked_calls += 1
    return False


def _logged(func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run a ``start``ed function; what it lets out has no caller to go to, so log it."""
    try:
        func(*args)
    except Exception:
        log.exception("tame.start: %r raised", func)


def turn_spent() -> bool:
    """True when the running loop's current turn has spent its tame quota, or when
    work deferred from an earlier turn still waits: start new work on a later turn."""
    rt = getattr(_tls, "rt", None)
    if rt is None or rt.closed:
        rt = runtime()
    now = _perf_counter()
    return bool(rt.ready) or (now > rt.half_deadline and not rt._may_run(now))


#: ``checkpoint() -> Runtime | None``: yield to the loop if this stack has used up its
#: quota; the caller's runtime. Every tamed call site calls it first, so a stack yields
#: at its next tamed call once the loop turn it runs in has spent the quota, even when
#: the call itself would complete at once. Costs one clock read on a tame stack;
#: returns None (and does nothing) anywhere else, so a call site can use it in place
#: of :func:`current_runtime`. (In C: _parking.c.)
checkpoint: Callable[[], Runtime | None] = _parking.checkpoint


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
    if _perf_counter() > rt.deadline:
        rt.yield_now()
    if asyncio.isfuture(awaitable):
        fut = awaitable
        if fut.get_loop() is not rt.loop:
            raise TameError("tame.wait: the future belongs to another event loop")
    else:
        fut = asyncio.ensure_future(awaitable, loop=rt.loop)
    if fut.done():
        return fut.result()  # type: ignore[no-any-return]
    rt.stats.waits += 1
    p = Parked("future", fut)
    cb = p.wake  # the future's done callback: wakes the stack with the future itself
    fut.add_done_callback(cb)
    try:
        p.park()
    except BaseException:
        fut.remove_done_callback(cb)
        fut.cancel()
        raise
    return fut.result()  # type: ignore[no-any-return]


def on_tame_stack() -> bool:
    """True when called from code running on a tame stack."""
    return type(getcurrent()) is TameGreenlet


#: ``current_runtime() -> Runtime | None``: the runtime of the tame stack running this
#: code, else None. (In C: _parking.c.)
current_runtime: Callable[[], Runtime | None] = _parking.current_runtime
