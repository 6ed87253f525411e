"""Cross-shard calls, made from code running on a shard (seastar's smp:: calls)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import NotInShardError
from .reactor import _local, home_reactor, require_reactor

T = TypeVar("T")


def this_shard() -> int:
    """The number of the shard this code runs on."""
    return require_reactor().shard_id


def shard_count() -> int:
    """How many shards the group has."""
    return require_reactor().shard_count


def submit_to(shard: int, func: Callable[..., Any], /, *args: Any, **kwargs: Any
              ) -> asyncio.Future:
    """Run ``func(*args, **kwargs)`` on ``shard``; await the returned future for its result.

    ``func`` may be a plain or a coroutine function.  On the current shard it
    runs directly, without pickling; elsewhere the call is pickled, and a
    function or argument that cannot be pickled raises TypeError at once.
    An exception raised remotely is raised here with its remote traceback
    attached.  Calls to one shard from one shard run in the order submitted.
    """
    reactor = getattr(_local, "reactor", None) or require_reactor()
    return reactor.submit_to(shard, func, args, kwargs or None)


async def invoke_on_all(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
    """Run ``func`` on every shard concurrently; the results in shard order."""
    reactor = require_reactor()
    futures = [reactor.submit_to(shard, func, args, kwargs or None)
               for shard in range(reactor.shard_count)]
    return list(await asyncio.gather(*futures))


async def map_reduce(func: Callable[..., Any], reducer: Callable[[T, Any], T], initial: T,
                     /, *args: Any, **kwargs: Any) -> T:
    """Run ``func`` on every shard and fold the results, in shard order, with ``reducer``."""
    return functools.reduce(reducer, await invoke_on_all(func, *args, **kwargs), initial)


def bind_thread(reactor: Any) -> None:
    """Make external_submit() from the calling thread go to ``reactor``.

    Needed only in the thread backend, where several shards share one
    process: get the reactor with :func:`shardio.current_reactor` on the
    shard and call this first thing in the thread you start.
    """
    if reactor is not None and getattr(_local, "reactor", None) is not None:
        raise NotInShardError("bind_thread() is for threads that are not reactors")
    _local.home_reactor = reactor


def external_submit(func: Callable[..., Any], /, *args: Any, **kwargs: Any
                    ) -> concurrent.futures.Future:
    """From a thread of a shard that is not its reactor: run ``func`` on that reactor.

    Thread-safe and never blocks the reactor (it goes through the reactor's
    MPSC inbox and rings its doorbell only if it sleeps).  Returns a
    :class:`concurrent.futures.Future`; a coroutine function is awaited on
    the reactor.  Which reactor: the one the calling thread was started for
    (``tame.alien`` threads), else the process's own shard (process backend).
    """
    reactor = home_reactor()
    if reactor is None:
        raise NotInShardError(
            "external_submit() needs a shard to submit to: call it from a thread inside a "
            "shard process, from an alien thread of a shard, or (thread backend) from a "
            "thread bound with shardio.bind_thread(reactor); from the process that started "
            f"the group use group.submit() (thread {threading.current_thread().name!r})")
    return reactor.external_submit(func, args, kwargs or None)
