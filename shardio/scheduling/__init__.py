"""Scheduling groups: shares of each shard's CPU and io_uring time (docs/scheduling.md).

``SchedulingGroup(name, shares)`` is the public object (also ``shardio.SchedulingGroup``);
``set_default_shares`` sets the running shard's default group (work outside any group);
``stats()`` gives every group's counters on the running shard, the metrics' figures.
"""

from __future__ import annotations

from typing import Any

from .groups import DEFAULT_GROUP_NAME, DEFAULT_SHARES, MAX_SHARES, SchedulingGroup

__all__ = [
    "DEFAULT_GROUP_NAME",
    "DEFAULT_SHARES",
    "MAX_SHARES",
    "SchedulingGroup",
    "current_group_name",
    "set_default_shares",
    "stats",
]


def set_default_shares(shares: float) -> None:
    """Shares of the running shard's default group (work outside any group; default 1000)."""
    from .scheduler import set_default_shares as set_shares

    set_shares(shares)


def stats() -> list[dict[str, Any]]:
    """Every group's counters on the running shard, the default group first."""
    from .scheduler import scheduler

    return scheduler().snapshot()


def current_group_name() -> str | None:
    """The scheduling group whose slice runs the calling code, None outside any group."""
    from ..tame import stacks

    rt = stacks.current_runtime()
    if rt is None:
        import asyncio

        try:
            rt = stacks.loop_runtime(asyncio.get_running_loop())
        except RuntimeError:
            return None
    group = None if rt is None else rt.running_group
    return None if group is None else group.name  # type: ignore[no-any-return]
