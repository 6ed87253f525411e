"""Sharded services: one instance of a class on every shard (seastar's sharded<T>)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import Callable
from inspect import isawaitable
from typing import Any, Generic, TypeVar

from .errors import ServiceNotRunning
from .reactor import require_reactor

T = TypeVar("T")
_service_numbers = itertools.count(1)


class Sharded(Generic[T]):
    """One instance of ``cls(*args, **kwargs)`` per shard, addressed by shard number.

    Start it from code running on a shard.  The handle itself is small and
    picklable, so it can be passed to other shards with ``submit_to``.  When
    the group stops, instances still running are stopped (their ``stop()``
    method, sync or async, if they have one), last started first.
    """

    def __init__(self, cls: Callable[..., T], *args: Any, **kwargs: Any) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.key = (os.getpid(), id(self), next(_service_numbers))

    def __reduce__(self):
        return (_rebuild_handle, (self.cls, self.key))

    async def start(self) -> Sharded[T]:
        """Construct the instance on every shard (and await its ``start()`` if it has one)."""
        reactor = require_reactor()
        futures = [reactor.submit_to(shard, _construct, (self.key, self.cls, self.args,
                                                         self.kwargs), None)
                   for shard in range(reactor.shard_count)]
        await asyncio.gather(*futures)
        return self

    def local(self) -> T:
        """This shard's instance."""
        try:
            return require_reactor().services[self.key]
        except KeyError:
            raise ServiceNotRunning(
                f"{getattr(self.cls, '__qualname__', self.cls)} is not running on this shard; "
                "await svc.start() first") from None

    async def invoke_on(self, shard: int, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` of the instance on ``shard``; awaits it if it is async."""
        return await require_reactor().submit_to(shard, _invoke, (self.key, method, args,
                                                                  kwargs), None)

    async def invoke_on_all(self, method: str, /, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every shard's instance; results in shard order."""
        reactor = require_reactor()
        futures = [reactor.submit_to(shard, _invoke, (self.key, method, args, kwargs), None)
                   for shard in range(reactor.shard_count)]
        return list(await asyncio.gather(*futures))

    async def map_reduce(self, method: str, reducer: Callable[[Any, Any], Any], initial: Any,
                         /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` everywhere and fold the results in shard order."""
        return functools.reduce(reducer, await self.invoke_on_all(method, *args, **kwargs),
                                initial)

    async def stop(self) -> None:
        """Stop and drop the instance on every shard."""
        reactor = require_reactor()
        futures = [reactor.submit_to(shard, _destroy, (self.key,), None)
                   for shard in range(reactor.shard_count)]
        await asyncio.gather(*futures)


def _rebuild_handle(cls: Any, key: tuple) -> Sharded:
    handle = Sharded.__new__(Sharded)
    handle.cls, handle.args, handle.kwargs, handle.key = cls, (), {}, key
    return handle


async def _construct(key: tuple, cls: Callable, args: tuple, kwargs: dict) -> None:
    services = require_reactor().services
    if key in services:
        return
    instance = cls(*args, **kwargs)
    start = getattr(instance, "start", None)
    if start is not None:
        result = start()
        if isawaitable(result):
            await result
    services[key] = instance


async def _invoke(key: tuple, method: str, args: tuple, kwargs: dict) -> Any:
    reactor = require_reactor()
    try:
        instance = reactor.services[key]
    except KeyError:
        raise ServiceNotRunning(f"the service is not running on shard {reactor.shard_id}") \
            from None
    result = getattr(instance, method)(*args, **kwargs)
    if isawaitable(result):
        result = await result
    return result


async def _destroy(key: tuple) -> None:
    instance = require_reactor().services.pop(key, None)
    stop = getattr(instance, "stop", None)
    if stop is not None:
        result = stop()
        if isawaitable(result):
            await result
