"""Alien threads: code that blocks inside C (sqlite3, lmdb) runs off the reactor.

A tame stack can only yield at Python-level blocking calls it is routed
through; a C extension that blocks in its own code would freeze the
reactor. Such calls go to this shard's *alien* threads (Crimson's
AlienStore): a small, bounded thread pool per reactor. The result comes
back through the reactor's MPSC inbox (``Reactor.call_threadsafe``, which
rings the doorbell only if the reactor sleeps), or through
``loop.call_soon_threadsafe`` on a plain asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .stacks import TameError, runtime

__all__ = ["AlienPool", "alien", "DEFAULT_ALIEN_THREADS"]

T = TypeVar("T")

#: Alien threads per reactor (each a real OS thread; they run in parallel only
#: while they are inside C code that releases the GIL).
DEFAULT_ALIEN_THREADS = int(os.environ.get("SHARDIO_ALIEN_THREADS", "4"))
#: Calls that may be queued for a reactor's alien threads before callers wait.
DEFAULT_ALIEN_BACKLOG = 1024


class AlienPool:
    """The alien threads of one reactor: bounded threads, bounded backlog."""

    def __init__(
        self, rt: Any, threads: int = DEFAULT_ALIEN_THREADS, backlog: int = DEFAULT_ALIEN_BACKLOG
    ) -> None:
        self.rt = rt
        shard = getattr(rt.reactor, "shard_id", None)
        prefix = "shardio-alien" if shard is None else f"shardio-alien-{shard}"
        self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=prefix)
        self._slots = asyncio.Semaphore(backlog)
        reactor = rt.reactor
        self._post = (
            reactor.call_threadsafe if reactor is not None else rt.loop.call_soon_threadsafe
        )
        self.threads = threads
        self.calls = 0
        self.closed = False

    async def run(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run func(*args, **kwargs) on an alien thread; await its result on the reactor.

        Cancelling the awaiting task abandons the result: the C call itself
        cannot be interrupted and finishes on its thread.
        """
        if self.closed:
            raise TameError("the alien thread pool of this reactor is closed")
        async with self._slots:
            loop = self.rt.loop
            fut: asyncio.Future[T] = loop.create_future()
            post = self._post
            ctx = contextvars.copy_context()

            def job() -> None:
                try:
                    value = ctx.run(func, *args, **kwargs)
                except BaseException as exc:  # delivered to the awaiting caller
                    post(_deliver_exc, fut, exc)
                else:
                    post(_deliver, fut, value)

            self.calls += 1
            self._executor.submit(job)
            return await fut

    def close(self) -> None:
        """Refuse new calls, drop queued ones, wait for the running ones."""
        if not self.closed:
            self.closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)


def _deliver(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _deliver_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


async def alien(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run blocking-in-C code on this reactor's alien threads; await the result.

    From a tame stack: ``tame.wait(tame.alien(func, ...))``.
    """
    return await runtime().alien.run(func, *args, **kwargs)
