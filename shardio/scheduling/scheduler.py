"""One loop's scheduler: group queues, virtual runtime, and the dispatcher.

Every piece of work a group governs becomes a *runnable* in the group's FIFO
queue: ``(resume, arg)``, the same shape as the tame runtime's ready queue (a
stack to resume or start, a coroutine step, a cross-shard call). The
dispatcher is one loop callback, scheduled while any group has runnables; each
time it runs it gives **one** group one *slice* of at most the tame quota and
returns to the loop, so the loop polls its I/O and timers between slices.

Which group: the one with the lowest virtual runtime (CPU seconds used divided
by shares, thread CPU clock, read at the slice's ends). A group that wakes
from idle starts no lower than the scheduler's ``min_vruntime`` less
``WAKE_CREDIT`` seconds of CPU at its shares (no banking of idle credit,
as CFS places a waking task; the small credit keeps a group that waits
briefly between steps, an I/O or a future, from losing its share). The default group (work outside any group: the loop's
own callbacks and tasks) cannot be queued, but its CPU between slices is
measured the same way, less the loop's own cost of an iteration (the
*floor*: the least CPU seen between two dispatches lately, at most
``FLOOR_CAP``). While what remains is at least ``BUSY_CPU`` it is busy and
has a virtual runtime too, and when that is the lowest the dispatcher lets
the loop run another iteration instead of a slice. A slice lasts ``quota × min(1, shares / the most shares)``, the
most among the groups with runnables and the default group if it was busy in
the last ``RECENT`` seconds: a low-share group never holds the loop for long
while latency-sensitive default work comes and goes.

While a group's slice runs, the loop's tame runtime is set to the group's
window: its deadline is the slice's, its ready queue is the group's, so every
quota check (``tame.checkpoint()``, the inlined ones in the Env) and every
deferral made by the group's stacks lands in the group. The runtime's own
window is put back when the slice ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..reactor import current_reactor
from ..tame import stacks
from .groups import DEFAULT_GROUP_NAME, DEFAULT_SHARES, SchedulingGroup, check_shares
from .io_queue import IoQueue

__all__ = ["BUSY_CPU", "GroupQueue", "Scheduler", "scheduler", "set_default_shares"]

log = logging.getLogger("shardio.scheduling")

_perf_counter = time.perf_counter
_thread_time = time.thread_time

#: CPU seconds the default group must use between two dispatches, beyond the loop's
#: own cost of an iteration, to count as busy (below it, the loop only polled: the
#: default group is idle and its shares go to the groups). Half a small request.
BUSY_CPU = 10e-6
#: The loop's cost of an iteration is taken as at most this (CPU seconds); the floor
#: is the least CPU seen between two dispatches over the last FLOOR_PERIOD of them.
#: When the default group works in every iteration the cap is the floor, and that
#: much of its real work per dispatch goes unaccounted: 15 µs took 25 % of a 55 µs
#: default step on a faster host (a 4:1 split measured 5.3:1); an idle uvloop
#: iteration of a shard costs 1-3 µs.
FLOOR_CAP = 5e-6
FLOOR_PERIOD = 256
#: The shortest slice (a fraction of the quota), whatever the shares.
MIN_SLICE_FRACTION = 0.05
#: Wall seconds the default group's shares keep shortening slices after it was busy.
RECENT = 0.01
#: CPU seconds (at the group's own shares) a waking group may be behind min_vruntime.
WAKE_CREDIT = 0.001


class GroupQueue:
    """One group's state on one loop: runnables, shares, virtual runtime, counters."""

    __slots__ = (
        "name",
        "shares",
        "scheduler",
        "queue",
        "running",
        "vruntime",
        "runtime",
        "tasks_processed",
        "slices",
        "waittime",
        "starvetime",
        "since",
        "spec",
    )

    def __init__(self, scheduler: Scheduler, name: str, shares: float) -> None:
        self.name = name
        self.shares = shares
        self.scheduler = scheduler
        self.queue: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self.running = False  # True while the dispatcher runs this group's slice
        self.vruntime = scheduler.min_vruntime
        self.runtime = 0.0  # CPU seconds of its slices
        self.tasks_processed = 0
        self.slices = 0
        self.waittime = 0.0  # wall seconds with nothing queued (idle, or waiting on I/O)
        self.starvetime = 0.0  # wall seconds with runnables queued but not running
        self.since = _perf_counter()  # when it last became idle or runnable
        self.spec = SchedulingGroup(name, shares)  # what a cross-shard call made here carries

    def defer(self, resume: Callable[[Any], None], arg: Any) -> None:
        """Queue ``resume(arg)`` to run in this group's next slice (or in this one)."""
        queue = self.queue
        if not queue and not self.running:
            self.scheduler.activate(self)
        queue.append((resume, arg))

    def io_submit(
        self, driver: Any, prep: Any, args: tuple[Any, ...], filename: Any, filename2: Any
    ) -> Any:
        """An io_uring operation of this group's (the file driver's hook): by I/O shares."""
        return self.scheduler.io_queue.submit(driver, self, prep, args, filename, filename2)

    def set_shares(self, shares: float) -> None:
        self.shares = shares
        self.spec = SchedulingGroup(self.name, shares)

    def snapshot(self) -> dict[str, Any]:
        """Counters in Seastar's vocabulary (milliseconds), brought up to now."""
        now = _perf_counter()
        waiting = 0.0 if self.running else now - self.since
        return {
            "group": self.name,
            "shares": self.shares,
            "runtime_ms": self.runtime * 1e3,
            "waittime_ms": (self.waittime + (0.0 if self.queue else waiting)) * 1e3,
            "starvetime_ms": (self.starvetime + (waiting if self.queue else 0.0)) * 1e3,
            "queue_length": len(self.queue),
            "tasks_processed": self.tasks_processed,
            "slices": self.slices,
            "vruntime": self.vruntime,
            **self.scheduler.io_queue.snapshot().get(self.name, {}),
        }

    def __repr__(self) -> str:
        return f"<GroupQueue {self.name!r} shares={self.shares:g} queued={len(self.queue)}>"


class Scheduler:
    """The groups of one event loop and the dispatcher that shares the loop between them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reactor = current_reactor()
        self.groups: dict[str, GroupQueue] = {}
        self.default_shares = DEFAULT_SHARES
        self.default_vruntime = 0.0
        self.default_busy = False
        self.default_busy_at = -math.inf  # perf_counter() when it was last seen busy
        self.default_turns = 0  # dispatches that let the default group run instead
        self.min_vruntime = 0.0
        self.scheduled = False
        self.running: GroupQueue | None = None
        self.cpu_mark = _thread_time()  # thread CPU time when the last slice (or check) ended
        self.floor = FLOOR_CAP  # CPU of a loop iteration with nothing else to do
        self.period_least = FLOOR_CAP
        self.period_left = FLOOR_PERIOD
        self.runtime = stacks.runtime(loop)
        self.io_queue = IoQueue()

    # -- groups --------------------------------------------------------------------
    def group(self, name: str, shares: float) -> GroupQueue:
        queue = self.groups.get(name)
        if queue is None:
            queue = self.groups[name] = GroupQueue(self, name, shares)
        return queue

    def activate(self, group: GroupQueue) -> None:
        """``group`` had nothing queued and now has: clamp its vruntime, wake the dispatcher."""
        now = _perf_counter()
        group.waittime += now - group.since
        group.since = now
        floor = self.min_vruntime - WAKE_CREDIT / group.shares
        if group.vruntime < floor:  # no credit for the time it was idle
            group.vruntime = floor
        if not self.scheduled:
            self.scheduled = True
            if self.running is None and not self._any_queued():  # the first since idle
                self.cpu_mark = _thread_time()
            self.loop.call_soon(self.dispatch)

    def _any_queued(self) -> bool:
        return any(g.queue for g in self.groups.values() if g.queue)

    # -- the dispatcher ----------------------------------------------------------------
    def dispatch(self) -> None:
        """One loop iteration's decision: one group's slice, or a turn for the default group."""
        self.scheduled = False
        cpu = _thread_time()
        outside = cpu - self.cpu_mark  # the default group's CPU since the last slice
        self.cpu_mark = cpu
        chosen: GroupQueue | None = None
        for g in self.groups.values():
            if g.queue and (chosen is None or g.vruntime < chosen.vruntime):
                chosen = g
        if chosen is None:
            return
        if outside < self.period_least:
            self.period_least = outside
        self.period_left -= 1
        if not self.period_left:
            self.floor = self.period_least
            self.period_least = FLOOR_CAP
            self.period_left = FLOOR_PERIOD
        outside -= self.floor
        if outside >= BUSY_CPU:
            if not self.default_busy:  # waking: no credit for the time it was idle
                self.default_busy = True
                self.default_vruntime = max(
                    self.default_vruntime, self.min_vruntime - WAKE_CREDIT / self.default_shares
                )
            self.default_vruntime += outside / self.default_shares
            self.default_busy_at = _perf_counter()
        else:
            self.default_busy = False
        lowest = chosen.vruntime
        if self.default_busy and self.default_vruntime < lowest:
            lowest = self.default_vruntime
        if lowest > self.min_vruntime:
            self.min_vruntime = lowest
        if self.default_busy and self.default_vruntime < chosen.vruntime:
            self.default_turns += 1  # the default group is owed CPU: one more loop iteration
            self._reschedule()
            return
        self._run_slice(chosen, cpu)
        self._reschedule()

    def _reschedule(self) -> None:
        if not self.scheduled and self._any_queued():
            self.scheduled = True
            self.loop.call_soon(self.dispatch)

    def slice_length(self, group: GroupQueue) -> float:
        quota = self.runtime.quota
        if quota == math.inf:
            quota = stacks.DEFAULT_QUOTA
        most = max(g.shares for g in self.groups.values() if g.queue or g is group)
        if _perf_counter() - self.default_busy_at < RECENT and self.default_shares > most:
            most = self.default_shares
        return quota * max(MIN_SLICE_FRACTION, min(1.0, group.shares / most))

    def _run_slice(self, group: GroupQueue, cpu_start: float) -> None:
        rt = self.runtime
        if rt.closed:  # the loop's tame runtime was replaced (closed and made anew)
            rt = self.runtime = stacks.runtime(self.loop)
        length = self.slice_length(group)
        saved = (
            rt.quota,
            rt.half_quota,
            rt.turn_start,
            rt.half_deadline,
            rt.deadline,
            rt.turn_used,
            rt.marker_pending,
            rt.ready,
            rt.ready_scheduled,
            rt.last_end,
        )
        start = _perf_counter()
        group.starvetime += start - group.since
        # The group's window: quota checks compare with the slice's deadline, and
        # deferrals (quota yields, deferred wakes) go to the group's queue.
        rt.quota = length
        rt.half_quota = length / 2
        rt.turn_start = start
        rt.half_deadline = start + length / 2
        deadline = rt.deadline = start + length
        rt.turn_used = 0.0
        rt.marker_pending = True  # the window is the slice: no turn marker
        rt.ready = queue = group.queue
        rt.ready_scheduled = True  # the dispatcher runs the group's queue, not _run_ready
        rt.running_group = group
        reactor = self.reactor
        if reactor is not None:
            reactor.running_group = group.spec
        group.running = True
        self.running = group
        processed = 0
        try:
            while queue:
                resume, arg = queue.popleft()
                processed += 1
                try:
                    resume(arg)
                except Exception:
                    log.exception("scheduling group %r: %r failed", group.name, resume)
                if _perf_counter() > deadline:
                    break
        finally:
            (
                rt.quota,
                rt.half_quota,
                rt.turn_start,
                rt.half_deadline,
                rt.deadline,
                rt.turn_used,
                rt.marker_pending,
                rt.ready,
                rt.ready_scheduled,
                rt.last_end,
            ) = saved
            rt.running_group = None
            if reactor is not None:
                reactor.running_group = None
            group.running = False
            self.running = None
            cpu = _thread_time()
            used = cpu - cpu_start
            self.cpu_mark = cpu
            group.runtime += used
            group.vruntime += used / group.shares
            group.tasks_processed += processed
            group.slices += 1
            group.since = _perf_counter()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every group's counters, the default group first (its runtime is the rest of
        the thread's CPU time; it has no queue the scheduler can see)."""
        groups = [g.snapshot() for g in self.groups.values()]
        used = sum(g["runtime_ms"] for g in groups)
        reactor = self.reactor
        cpu = reactor.stats.cpu_seconds if reactor is not None else _thread_time()
        default = {
            "group": DEFAULT_GROUP_NAME,
            "shares": self.default_shares,
            "runtime_ms": max(0.0, cpu * 1e3 - used),
            "default_turns": self.default_turns,
        }
        return [default, *groups]


_schedulers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Scheduler] = (
    weakref.WeakKeyDictionary()
)


def scheduler(loop: asyncio.AbstractEventLoop | None = None) -> Scheduler:
    """The scheduler of ``loop`` (the running loop by default), made on first use."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            from ..errors import SchedulingError

            raise SchedulingError(
                "scheduling groups work on a running loop: use them from a shard's code "
                "(or a coroutine under asyncio.run)"
            ) from None
    found = _schedulers.get(loop)
    if found is None:
        found = _schedulers[loop] = Scheduler(loop)
    return found


def loop_scheduler(loop: asyncio.AbstractEventLoop) -> Scheduler | None:
    """The scheduler of ``loop`` if one was made (never makes one; for metrics)."""
    return _schedulers.get(loop)


def set_default_shares(shares: float) -> None:
    """Shares of the running shard's default group (work outside any group; 1000)."""
    scheduler().default_shares = check_shares(shares, "the default group")
