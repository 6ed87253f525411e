"""``SchedulingGroup``: a named share of every shard's CPU (and io_uring) time.

A group is a value (a name and a number of shares) that means the same on
every shard: the first use on a shard creates that shard's queue for it
with these shares, and a cross-shard call made from the group's work runs
in the same-named group on the receiving shard (the call message carries
the name and the shares). Work outside any group is the shard's *default
group* (``DEFAULT_SHARES``, Seastar's main group: 1000).

This module stays light (no tame import): the scheduler behind it is
loaded when a group is first used on a loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..errors import SchedulingError

__all__ = ["DEFAULT_GROUP_NAME", "DEFAULT_SHARES", "MAX_SHARES", "SchedulingGroup"]

T = TypeVar("T")

#: Shares of the default group (work outside any group) unless set otherwise.
DEFAULT_SHARES = 1000.0
#: The default group's name in metrics.
DEFAULT_GROUP_NAME = "default"
#: Largest share count a group may have (the ratio between groups is what counts).
MAX_SHARES = 1_000_000.0
_MAX_NAME_BYTES = 255


def check_shares(shares: Any, what: str) -> float:
    """``shares`` as a float, or SchedulingError naming ``what`` was wrong."""
    if (
        isinstance(shares, bool)
        or not isinstance(shares, int | float)
        or not (1 <= shares <= MAX_SHARES and math.isfinite(shares))
    ):
        raise SchedulingError(
            f"{what}: shares must be a number from 1 to {MAX_SHARES:g}, got {shares!r}"
        )
    return float(shares)


class SchedulingGroup:
    """A named share of each shard's time: ``SchedulingGroup("background", 100)``.

    Between groups that have runnable work, a shard divides its time in
    proportion to shares, counted in thread CPU time; an idle group's
    shares go to the others. What a group governs: tame stacks started with
    ``tame.call(..., group=g)`` / ``g.call(...)`` / ``g.start(...)``,
    coroutines started with ``g.create_task(...)``, and cross-shard calls
    made from that work (they run in the same-named group on the receiving
    shard). Plain asyncio tasks and loop callbacks stay in the default group.
    docs/scheduling.md has the rules and what is and is not preempted.

    The object is a picklable value: equal names are the same group. It can be
    made anywhere (the owner, a shard, a module); the shard-side state is made
    on first use on each shard's loop.
    """

    __slots__ = ("_name", "_shares", "encoded_name")

    def __init__(self, name: str, shares: float) -> None:
        if not isinstance(name, str) or not name:
            raise SchedulingError(f"a scheduling group needs a non-empty name, got {name!r}")
        if name == DEFAULT_GROUP_NAME:
            raise SchedulingError(
                f"{name!r} is the default group's name (work outside any group); "
                "set its shares with shardio.scheduling.set_default_shares()"
            )
        encoded = name.encode()
        if len(encoded) > _MAX_NAME_BYTES:
            raise SchedulingError(
                f"scheduling group name {name[:40]!r}... is {len(encoded)} bytes in UTF-8; "
                f"the limit is {_MAX_NAME_BYTES}"
            )
        self._name = name
        self._shares = check_shares(shares, f"scheduling group {name!r}")
        self.encoded_name = encoded  # what a cross-shard call carries

    @property
    def name(self) -> str:
        return self._name

    @property
    def shares(self) -> float:
        """The shares it is created with on a shard (``set_shares`` changes one shard's)."""
        return self._shares

    def __repr__(self) -> str:
        return f"SchedulingGroup({self._name!r}, {self._shares:g})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SchedulingGroup) and other._name == self._name

    def __hash__(self) -> int:
        return hash(("SchedulingGroup", self._name))

    def __reduce__(self) -> tuple[Any, ...]:
        return (SchedulingGroup, (self._name, self._shares))

    # -- on the running loop (a shard, or any asyncio loop) ---------------------
    def queue_on(self, loop: asyncio.AbstractEventLoop | None = None) -> Any:
        """This group's queue on ``loop`` (the running one by default), made on first use."""
        from .scheduler import scheduler

        return scheduler(loop).group(self._name, self._shares)

    async def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``tame.call(func, *args, **kwargs)`` on a tame stack of this group."""
        from ..tame import stacks

        return await stacks.call(func, *args, group=self, **kwargs)

    def start(self, func: Callable[..., Any], /, *args: Any) -> bool | None:
        """``tame.start`` in this group, from the loop: queues ``func(*args)`` on a tame
        stack of this group, which runs at the group's next turn; returns False (it runs
        and finishes on its own), or None when every stack is in use."""
        from ..tame import stacks

        return stacks.start(func, *args, group=self)

    def create_task(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None
    ) -> asyncio.Task[T]:
        """An asyncio task whose every step is run by this group's dispatcher.

        The task is a real ``asyncio.Task`` (``current_task()``, cancellation,
        ``asyncio.timeout`` work as usual); between two steps it awaits a turn of
        the group, so each step runs, and is accounted, inside the group's time.
        """
        from .coroutines import governed

        if not asyncio.iscoroutine(coro):
            raise SchedulingError(
                f"{self!r}.create_task needs a coroutine object, got {type(coro).__name__}"
            )
        loop = asyncio.get_running_loop()
        return loop.create_task(governed(coro, self.queue_on(loop)), name=name)

    def set_shares(self, shares: float) -> None:
        """Change this group's shares on the running shard only (as Seastar does)."""
        self.queue_on().set_shares(check_shares(shares, f"scheduling group {self._name!r}"))

    def stats(self) -> dict[str, Any]:
        """This group's counters on the running shard (the metrics' figures)."""
        return self.queue_on().snapshot()
