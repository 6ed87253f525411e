"""One virtual clock for every shard of a group: pause, advance, settle, resume.

libprocess's ``Clock::pause/advance/settle`` for shardio.  A test pauses
time, triggers work, jumps the clock forward past a timeout, and waits until
every shard has run what that made due -- without waiting for real time::

    from shardio.testing import Clock, virtual_group

    with virtual_group(2, backend="process") as group:
        clock = Clock(group)
        clock.pause()
        nap = group.submit(1, asyncio.sleep, 3600, "rested")
        clock.settle()                   # the call has reached its sleep
        clock.advance(3600)              # every shard's loop jumps an hour
        assert nap.result(timeout=1) == "rested"
        clock.resume()

How.  uvloop's clock cannot be virtualized (libuv keeps its own time), so the
shards of such a group run a pure-asyncio loop, :class:`VirtualTimeLoop`,
whose ``time()`` reads one shared virtual time.  The time lives in a small
memfd (:class:`VirtualTime`) that each shard maps: the thread backend shares
the mapping, process shards inherit the memfd when they are spawned (the
fabric's way).  Everything built on ``loop.time()`` follows it: timers,
``asyncio.sleep``, ``wait_for`` and ``asyncio.timeout``, ``loop.call_later``,
tame ``env.sleep``.  Code that reads ``time.monotonic()`` itself does not.

The time runs (at real speed, from where it was) until paused; paused, it
moves only by :meth:`Clock.advance`.  After an advance (and a resume) every
shard is woken at once through the fabric, so a shard asleep in epoll with a
one-hour timeout re-evaluates its timers immediately.

Virtual-time groups run without the stall detector: its heartbeat is a loop
timer, which a paused clock stops, so it would report every pause as a stall
(:func:`virtual_group` sets ``stall_threshold_ms=None``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import mmap
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from ..errors import ShardioError
from ..fabric import Flag
from ..fabric.handles import FdHandle
from ..group import ShardGroup
from ..reactor import current_reactor, require_reactor

__all__ = ["Clock", "ClockError", "VirtualTime", "VirtualTimeLoop", "virtual_group"]

_SEQ, _PAUSED, _VALUE = 0, 1, 2
"""Slots of the shared state (int64 each): a seqlock counter, the paused flag,
and the value: the paused time, or the offset from CLOCK_MONOTONIC, in ns."""

_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution

_FENCE_OFFSET = 3 * 8
"""Byte offset of a scratch word whose Flag gives the writer a full memory fence."""


class ClockError(ShardioError):
    """The virtual clock cannot do this (wrong kind of group, or shards that never settle)."""


class VirtualTime:
    """The shared virtual time, and a picklable loop factory whose loops read it.

    Pass it as ``ShardGroup(loop=VirtualTime(), stall_threshold_ms=None)``, or
    use :func:`virtual_group`.  One process writes it at a time (whoever drives
    the :class:`Clock`); any number of shards read it.  ``close()`` (or garbage
    collection) releases the memfd once the group has stopped.
    """

    def __init__(self) -> None:
        fd = os.memfd_create("shardio-clock", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
        except BaseException:
            os.close(fd)
            raise
        self._map_fd(fd)

    def _map_fd(self, fd: int) -> None:
        try:
            segment = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._state = memoryview(segment).cast("q")  # aligned 8-byte loads and stores
        self._fence = Flag(segment, _FENCE_OFFSET)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _release, fd, self._state, self._fence, segment)

    def __call__(self) -> VirtualTimeLoop:
        return VirtualTimeLoop(self)

    def __reduce__(self) -> tuple:
        if self._fd < 0:
            raise ClockError("this VirtualTime was closed; make a new one for a new group")
        return (_attach, (FdHandle(self._fd),))

    def close(self) -> None:
        """Release the memfd and the mapping (after every loop reading it has closed)."""
        self._fd = -1
        self._finalizer()

    # ------------------------------------------------------------ reading

    def _read(self) -> tuple[int, int]:
        """(paused, value), consistent; see now_ns()."""
        state = self._state
        while True:
            seq = state[_SEQ]
            if seq & 1:  # a write is in progress: let the writer run (it may need the GIL)
                time.sleep(0)
                continue
            paused, value = state[_PAUSED], state[_VALUE]
            if state[_SEQ] == seq:
                return paused, value

    def now_ns(self) -> int:
        """The virtual time in ns: never later than a pause() that any reader sees next.

        A seqlock whose read section includes reading CLOCK_MONOTONIC: a write
        (pause, resume, advance) makes the counter odd, fences, and only then
        reads CLOCK_MONOTONIC itself, so a reader whose section overlaps it
        retries and one that does not read the clock before the writer did.
        Without that, a shard could read a running time a few microseconds past
        the paused one and start an hour-long timer beyond ``pause + 3600``.
        It needs loads kept in order and stores kept in order (x86-64 does so).
        """
        state = self._state
        monotonic_ns = time.monotonic_ns
        while True:
            seq = state[_SEQ]
            if seq & 1:  # a write is in progress: let the writer run (it may need the GIL)
                time.sleep(0)
                continue
            paused, value = state[_PAUSED], state[_VALUE]
            now = value if paused else monotonic_ns() + value
            if state[_SEQ] == seq:
                return now

    def now(self) -> float:
        """The virtual time, in seconds, on the CLOCK_MONOTONIC scale."""
        return self.now_ns() / 1e9

    @property
    def paused(self) -> bool:
        return bool(self._read()[0])

    # ------------------------------------------------------------ writing (no wake-ups)

    def _begin_write(self) -> tuple[int, int, int]:
        """Make the counter odd (readers wait) and fence; the seq and the state it guards."""
        state = self._state
        seq = state[_SEQ]
        state[_SEQ] = seq + 1
        self._fence.set()  # the odd counter is visible before we read CLOCK_MONOTONIC
        return seq, state[_PAUSED], state[_VALUE]

    def _end_write(self, seq: int, paused: int, value: int) -> None:
        state = self._state
        state[_PAUSED] = paused
        state[_VALUE] = value
        state[_SEQ] = seq + 2

    def pause(self) -> None:
        with self._lock:
            seq, paused, value = self._begin_write()
            if not paused:
                value += time.monotonic_ns()
            self._end_write(seq, 1, value)

    def resume(self) -> None:
        with self._lock:
            seq, paused, value = self._begin_write()
            if paused:
                value -= time.monotonic_ns()
            self._end_write(seq, 0, value)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the clock only moves forward; got advance({seconds})")
        with self._lock:
            seq, paused, value = self._begin_write()
            self._end_write(seq, paused, value + round(seconds * 1e9))


def _attach(handle: FdHandle) -> VirtualTime:
    """In a spawned shard process: map the memfd the owner created."""
    virtual_time = VirtualTime.__new__(VirtualTime)
    virtual_time._map_fd(handle.detach())
    return virtual_time


def _release(fd: int, state: memoryview, fence: Flag, segment: mmap.mmap) -> None:
    state.release()
    fence.close()
    segment.close()
    os.close(fd)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A pure-asyncio loop whose ``time()`` is the shared virtual time."""

    def __init__(self, virtual_time: VirtualTime) -> None:
        super().__init__()
        self.virtual_time = virtual_time

    def time(self) -> float:
        # Never ahead of a pause (see VirtualTime.now_ns), so it needs no clamping.
        return self.virtual_time.now()

    def pending_work(self) -> str:
        """What this loop must run at the current time: "ready callbacks", "timers due" or "".

        For :meth:`Clock.settle`'s probe, which runs as one of this loop's
        callbacks.  asyncio has no public view of a loop's ready queue and timer
        heap: this reads the ones the class inherits from ``BaseEventLoop``.
        """
        if any(not handle.cancelled() for handle in self._ready):
            return "ready callbacks"
        due = self.time() + _CLOCK_RESOLUTION  # asyncio's own notion of "due"
        if any(not timer.cancelled() and timer.when() <= due for timer in self._scheduled):
            return "timers due"
        return ""


def virtual_group(shards: int | None = None, **options: Any) -> ShardGroup:
    """A :class:`ShardGroup` whose shards run on a fresh :class:`VirtualTime`.

    Takes ShardGroup's arguments; ``loop`` is set, and the stall detector is
    off unless ``stall_threshold_ms`` is given.
    """
    options.setdefault("stall_threshold_ms", None)
    return ShardGroup(shards, loop=VirtualTime(), **options)


class Clock:
    """Drives the virtual time of a group's shards.

    ``Clock(group)`` in the process that started the group (the group must
    run on a :class:`VirtualTime`); ``Clock()`` inside a shard of such a
    group, where pause/advance/resume work the same and settling is
    ``await clock.settle_async()``.  ``timeout`` bounds each wait for the
    shards (a wake-up round, a settle), in real seconds.
    """

    def __init__(self, group: ShardGroup | None = None, *, timeout: float = 10.0) -> None:
        self.group = group
        self.timeout = timeout
        if group is not None:
            virtual_time = group.options.loop
            where = "this group's loop is " + repr(virtual_time)
        else:
            reactor = require_reactor()
            virtual_time = getattr(reactor.loop, "virtual_time", None)
            where = f"shard {reactor.shard_id} runs {type(reactor.loop).__name__}"
        if not isinstance(virtual_time, VirtualTime):
            raise ClockError(
                f"the virtual clock needs shards running on a VirtualTime, but {where}: start "
                "the group with shardio.testing.virtual_group(...) or "
                "ShardGroup(loop=VirtualTime(), stall_threshold_ms=None)")
        self.virtual_time = virtual_time

    def time(self) -> float:
        """The shards' ``loop.time()``."""
        return self.virtual_time.now()

    @property
    def paused(self) -> bool:
        return self.virtual_time.paused

    def pause(self) -> None:
        """Stop the time on every shard; from now on it moves only by :meth:`advance`."""
        self.virtual_time.pause()

    def advance(self, seconds: float) -> None:
        """Move the time forward on every shard and wake them all to run what is now due.

        Returns once every shard has run a loop iteration at the new time (from
        inside a shard: at once, the wake-ups are on their way).  Timers it made
        due have been moved to the ready queue, not necessarily run: use
        :meth:`settle` for that.  Only timers that exist move: a call still on
        its way to a shard starts its timer from the new time, so after
        starting work, :meth:`settle` before advancing (as with libprocess).
        """
        self.virtual_time.advance(seconds)
        self._wake_all()

    def resume(self) -> None:
        """Let the time run again at real speed, from where it stands."""
        self.virtual_time.resume()
        self._wake_all()

    def settle(self) -> None:
        """Wait until no shard has ready work, a timer due, or a message on its way.

        From the group's owner.  Each round asks the shards one after the other
        for their asyncio ready queue, their due timers, their MPSC inbox, the
        sends waiting for ring space and their fabric counters; it returns
        after a round in which every shard was idle and every message a shard
        sent had been received.  A probe travels behind every call the owner
        submitted before it (one FIFO ring per shard), so those are seen too.  Calls that
        are merely waiting (for a timer not yet due, a dropped message, a
        reply) do not count as work.  I/O in flight is not waited for: bytes
        not yet arrived on a socket, io_uring completions, threads working for
        a shard (tame alien threads, ``to_thread``) are invisible until they
        complete and schedule a callback.  Raises :class:`ClockError` after
        ``timeout`` seconds of shards that keep working (a periodic timer on a
        running clock, a busy loop).
        """
        if self.group is None:
            raise ClockError("settle() from inside a shard: use `await clock.settle_async()`")
        group = self.group
        deadline = time.monotonic() + self.timeout
        while True:
            reports = [self._result(group._submit_control(shard, _probe), "settle()")
                       for shard in range(group.shards)]
            if _settled(reports):
                return
            if time.monotonic() > deadline:
                raise ClockError(f"the shards did not settle within {self.timeout} s: "
                                 f"{_describe(reports)}")

    async def settle_async(self) -> None:
        """:meth:`settle` from inside a shard (the calling task does not count as work)."""
        reactor = require_reactor()
        me = reactor.shard_id
        deadline = time.monotonic() + self.timeout
        while True:
            reports = {me: await _probe_here()}  # this shard first, then the others in turn
            for shard in range(reactor.shard_count):
                if shard != me:
                    reports[shard] = await reactor.send_call(shard, _probe, (), None)
            ordered = [reports[shard] for shard in range(reactor.shard_count)]
            # Each probe this round crossed from here after this shard counted its sends.
            if _settled(ordered, prober=me):
                return
            if time.monotonic() > deadline:
                raise ClockError(f"the shards did not settle within {self.timeout} s: "
                                 f"{_describe(ordered)}")

    # ------------------------------------------------------------ internals

    def _result(self, future: concurrent.futures.Future, what: str,
                deadline: float | None = None) -> Any:
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise ClockError(f"{what}: a shard did not answer within {self.timeout} s "
                             "(is its reactor blocked?)") from None

    def _wake_all(self) -> None:
        if self.group is None:
            reactor = current_reactor()
            if reactor is None:
                raise ClockError("Clock() without a group only works on a shard's reactor thread")
            for shard in range(reactor.shard_count):
                if shard != reactor.shard_id:
                    reactor.send_call(shard, _wake, (), None).add_done_callback(_ignore)
            return
        group = self.group
        if not group.running:
            return
        deadline = time.monotonic() + self.timeout
        futures = [group._submit_control(shard, _wake) for shard in range(group.shards)]
        for future in futures:
            self._result(future, "waking the shards", deadline)


# ---------------------------------------------------------------- shard side


def _wake() -> None:
    """Runs on a shard only to make its loop go round once (at the new time)."""


def _ignore(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _probe() -> tuple[str, list[int], list[int]]:
    """This shard's state for settle(): (what keeps it busy or "", sent, received).

    ``sent[j]``/``received[j]``: messages this shard sent to / took from shard j.
    Runs as a call from the fabric (inside the reactor's poll), so neither the
    poll nor the caller's task is in the ready queue.
    """
    reactor = require_reactor()
    loop = reactor.loop
    if not isinstance(loop, VirtualTimeLoop):
        raise ClockError(f"settle() needs shards running on a VirtualTimeLoop; shard "
                         f"{reactor.shard_id} runs {type(loop).__name__}")
    busy = loop.pending_work()
    if not busy and not reactor.is_idle():
        busy = "messages waiting in its inbox or rings, or sends waiting for ring space"
    links = reactor.links[:reactor.shard_count]
    return (busy,
            [link.sent_messages if link is not None else 0 for link in links],
            [link.received_messages if link is not None else 0 for link in links])


async def _probe_here() -> tuple[str, list[int], list[int]]:
    """:func:`_probe` of the calling shard, run from its inbox like a call from outside."""
    reactor = require_reactor()
    report: asyncio.Future = reactor.loop.create_future()

    def probe() -> None:
        if not report.done():
            report.set_result(_probe())

    reactor.call_threadsafe(probe)
    return await report


def _settled(reports: Sequence[tuple[str, list[int], list[int]]],
             prober: int | None = None) -> bool:
    """Idle everywhere, and every message sent between shards was taken off its ring.

    The probes run one shard after the other, so a message in flight shows as
    fewer received than sent (see settle()).  ``prober``: the shard whose own
    probe requests (one to each other shard, this round) are in the counts.
    """
    if any(busy for busy, _, _ in reports):
        return False
    for src, (_, sent, _) in enumerate(reports):
        for dst, (_, _, received) in enumerate(reports):
            if src != dst:
                extra = 1 if src == prober else 0
                if received[src] < sent[dst] + extra:
                    return False
    return True


def _describe(reports: Sequence[tuple[str, list[int], list[int]]]) -> str:
    busy = [f"shard {shard} has {what}" for shard, (what, _, _) in enumerate(reports) if what]
    return "; ".join(busy) or "messages keep crossing between shards"
