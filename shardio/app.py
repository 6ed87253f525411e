"""shardio.app: start a group, run main on shard 0, stop (seastar's app_template)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .group import ShardGroup


def run(main: Callable[..., Any], /, *args: Any, shards: int | None = None,
        **group_options: Any) -> Any:
    """Start ``shards`` shards, run ``main(*args)`` on shard 0, stop them; return its result.

    ``main`` is usually an async function; it runs as a task on shard 0's
    reactor, where ``submit_to``, ``invoke_on_all`` and ``Sharded`` work.
    ``group_options`` are passed to :class:`ShardGroup`.
    """
    with ShardGroup(shards, **group_options) as group:
        return group.submit(0, main, *args).result()
