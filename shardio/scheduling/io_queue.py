"""I/O shares: io_uring submissions of scheduling groups admitted by a virtual-time queue.

The file driver (``shardio.io.uring``) hands every operation submitted during a
group's slice to the loop's :class:`IoQueue` (one check in its submit path).
While fewer than ``capacity`` group operations are in flight, an operation is
submitted at once: the device is not saturated and nobody waits. Beyond that,
operations wait, and each completion admits the next one from the group with
the lowest *I/O virtual time*: the cost of the operations it was admitted
(``OP_COST`` plus the bytes moved) divided by its shares, after Seastar's
I/O scheduler. A group that had nothing waiting or in flight starts no lower
than the others' virtual time (no banking of idle credit). Operations from
outside any group are not queued here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from ..errors import SchedulingError
from ..tame.stacks import Parked

__all__ = ["DEFAULT_CAPACITY", "OP_COST", "IoQueue", "configure_io"]

#: Group operations in flight at once before the queue holds them back (the device's
#: useful queue depth; fio's QD32 saturates the project's disk).
DEFAULT_CAPACITY = 32
#: What an operation costs besides its bytes, in bytes (a 4 KiB read costs 2x 4 KiB).
OP_COST = 4096


def operation_cost(args: tuple[Any, ...]) -> int:
    """``OP_COST`` plus the bytes an operation moves: a write's buffer, a read's size."""
    if len(args) < 2:
        return OP_COST
    second = args[1]
    if isinstance(second, bytes | bytearray | memoryview):
        return OP_COST + len(second)
    if type(second) is int and len(args) >= 3:  # (fd, n, offset...): a read of n bytes
        return OP_COST + second
    return OP_COST


class _GroupIo:
    """One group's side of the queue."""

    __slots__ = ("group", "vtime", "waiting", "inflight", "admitted", "admitted_bytes", "waits")

    def __init__(self, group: Any) -> None:
        self.group = group  # its GroupQueue (shares, name)
        self.vtime = 0.0
        self.waiting: collections.deque[tuple[Parked, int]] = collections.deque()
        self.inflight = 0
        self.admitted = 0
        self.admitted_bytes = 0
        self.waits = 0


class IoQueue:
    """The virtual-time queue in front of one loop's io_uring driver."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.inflight = 0
        self.waiting = 0
        self.min_vtime = 0.0
        self.groups: dict[str, _GroupIo] = {}

    def _side(self, group: Any) -> _GroupIo:
        side = self.groups.get(group.name)
        if side is None:
            side = self.groups[group.name] = _GroupIo(group)
            side.vtime = self.min_vtime
        return side

    def submit(
        self,
        driver: Any,
        group: Any,
        prep: Callable[..., Any],
        args: tuple[Any, ...],
        filename: Any,
        filename2: Any,
    ) -> Any:
        """On a group's tame stack: wait for admission if saturated, then submit and wait."""
        side = self._side(group)
        cost = operation_cost(args)
        if self.inflight < self.capacity and not self.waiting:
            self._charge(side, cost)
        else:
            self._wait(side, cost)
        try:
            return driver._submit(prep, args, filename, filename2, True)
        finally:
            self.inflight -= 1
            side.inflight -= 1
            self._admit()

    def _charge(self, side: _GroupIo, cost: int) -> None:
        if not side.waiting and not side.inflight and side.vtime < self.min_vtime:
            side.vtime = self.min_vtime  # back from idle: no credit for it
        side.vtime += cost / side.group.shares
        side.admitted += 1
        side.admitted_bytes += cost - OP_COST
        side.inflight += 1
        self.inflight += 1

    def _wait(self, side: _GroupIo, cost: int) -> None:
        if not side.waiting and not side.inflight and side.vtime < self.min_vtime:
            side.vtime = self.min_vtime
        p = Parked("io_queue", side.group.name)
        entry = (p, cost)
        side.waiting.append(entry)
        side.waits += 1
        self.waiting += 1
        try:
            p.park()  # woken by _admit, which has charged this operation already
        except BaseException:
            try:
                side.waiting.remove(entry)
                self.waiting -= 1
            except ValueError:  # admitted meanwhile: give the place back
                self.inflight -= 1
                side.inflight -= 1
                self._admit()
            raise

    def _admit(self) -> None:
        """Admit waiting operations, lowest I/O virtual time first, while there is room."""
        while self.waiting and self.inflight < self.capacity:
            best: _GroupIo | None = None
            for side in self.groups.values():
                if side.waiting and (best is None or side.vtime < best.vtime):
                    best = side
            assert best is not None
            if best.vtime > self.min_vtime:
                self.min_vtime = best.vtime
            p, cost = best.waiting.popleft()
            self.waiting -= 1
            best.vtime += cost / best.group.shares
            best.admitted += 1
            best.admitted_bytes += cost - OP_COST
            best.inflight += 1
            self.inflight += 1
            p.wake_soon()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "io_admitted": side.admitted,
                "io_admitted_bytes": side.admitted_bytes,
                "io_waits": side.waits,
                "io_queue_length": len(side.waiting),
                "io_inflight": side.inflight,
            }
            for name, side in self.groups.items()
        }


def configure_io(capacity: int) -> None:
    """Set the running loop's I/O queue capacity: group operations in flight at once
    before the queue admits them by shares (default ``DEFAULT_CAPACITY``)."""
    from .scheduler import scheduler

    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise SchedulingError(f"the I/O queue capacity must be an integer >= 1, got {capacity!r}")
    scheduler().io_queue.capacity = capacity
