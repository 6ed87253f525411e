"""Cross-shard calls made in a scheduling group run in the same-named group on arrival.

The sending reactor marks a call made during a group's slice with the group's
name and shares (``fabric.messages.REQUEST_IN_GROUP``); the receiving reactor
hands it here, and it is queued in the group of that name on this shard (made
with those shares if this shard has not used it yet). The call then runs in a
slice of that group; a coroutine it returns becomes a task governed by the group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .coroutines import governed
from .scheduler import GroupQueue, scheduler

__all__ = ["run_in_group"]


class _InGroup:
    """The called function, with a coroutine result made into a governed one."""

    __slots__ = ("func", "queue")

    def __init__(self, func: Callable[..., Any], queue: GroupQueue) -> None:
        self.func = func
        self.queue = queue

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.func(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return governed(result, self.queue)
        return result


def run_in_group(
    reactor: Any,
    name: str,
    shares: float,
    link: Any,
    request_id: int,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
) -> None:
    """Queue an arrived call in group ``name`` of this shard (reactor thread)."""
    queue = scheduler(reactor.loop).group(name, shares)
    queue.defer(_run_call, (reactor, link, request_id, _InGroup(func, queue), args, kwargs))


def _run_call(entry: tuple[Any, ...]) -> None:
    reactor, link, request_id, func, args, kwargs = entry
    reactor._execute(link, request_id, func, args, kwargs)
