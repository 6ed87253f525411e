"""Unmodified ``socketserver`` servers, served by a shard on tame stacks.

A threaded server written for the standard library — a ``ThreadingTCPServer``
subclass with its own handler class — runs on a shard unchanged::

    address = await tame.servers.host(MyServer, ("127.0.0.1", 8000), MyHandler)

``host`` tames ``socketserver`` (and the modules you name, e.g. the one
defining the handler) with :func:`shardio.tame.patch`, constructs the
server on a tame stack, so that its listening socket is a tame socket,
and runs ``serve_forever`` on another: the accept loop's ``selectors``
wait parks on the reactor, and every connection's ``threading.Thread`` is
a tame thread of the same reactor — one tame stack per connection, not an
OS thread. With ``reuse_port`` (the default) the server's class is
subclassed with ``allow_reuse_port = True`` (its module stays untouched),
so every shard of a group can host the same address and the kernel spreads
connections over them, as with ``SO_REUSEPORT`` workers.

The server stops with the shard (``shutdown()``, then ``server_close()``,
which joins the connection threads as ``socketserver`` does), or earlier
with ``await server.stop()``. What the handler does must be tamed to yield: calls into
modules that were not patched block the reactor like any untamed call
(see ``shardio.tame.patch``).
"""

from __future__ import annotations

import asyncio
import socketserver
import types
from collections.abc import Callable, Iterable
from typing import Any

from . import stacks
from .patch import patch, unpatch

__all__ = ["HostedServer", "host", "hosted"]


class HostedServer:
    """A ``socketserver`` server running on this shard's tame stacks."""

    def __init__(
        self,
        server: socketserver.BaseServer,
        modules: tuple[types.ModuleType, ...],
        task: asyncio.Task[Any],
    ) -> None:
        self.server = server
        self.modules = modules
        self.task = task
        self.stopped = False

    @property
    def address(self) -> Any:
        """The address the server is bound to (``server.server_address``)."""
        return self.server.server_address

    async def stop(self) -> None:
        """Stop accepting, wait for ``serve_forever`` to return, close (joining the
        connection threads), and undo the patches."""
        if self.stopped:
            return
        self.stopped = True
        _hosted.pop(id(self.server), None)
        try:
            if not self.task.done():
                await stacks.call(self.server.shutdown)
            await self.task
        finally:
            try:
                await stacks.call(self.server.server_close)
            finally:
                for module in reversed(self.modules):
                    unpatch(module)


_hosted: dict[int, HostedServer] = {}


def _with_reuse_port(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``factory`` if it is no TCPServer class; else a subclass with SO_REUSEPORT on."""
    if isinstance(factory, type) and issubclass(factory, socketserver.TCPServer):
        return type(
            factory.__name__,
            (factory,),
            {"allow_reuse_port": True, "__module__": factory.__module__,
             "__qualname__": factory.__qualname__},
        )  # fmt: skip
    return factory


async def host(
    factory: Callable[..., socketserver.BaseServer],
    /,
    *args: Any,
    modules: Iterable[types.ModuleType] = (),
    reuse_port: bool = True,
    poll_interval: float = 0.5,
    **kwargs: Any,
) -> HostedServer:
    """Construct ``factory(*args, **kwargs)`` on a tame stack and serve it on this shard.

    ``modules``: further modules to tame for the server's lifetime (the one
    defining the handler, libraries it calls). ``poll_interval`` is
    ``serve_forever``'s: how long ``shutdown`` may wait for the accept loop.
    Returns the running server; it stops with the shard, or with ``stop()``.
    """
    if not callable(factory):
        raise TypeError(f"tame.servers.host expects a server class or factory, got {factory!r}")
    patched: list[types.ModuleType] = []
    try:
        for module in (socketserver, *modules):
            patch(module)
            patched.append(module)
        build = _with_reuse_port(factory) if reuse_port else factory
        server = await stacks.call(build, *args, **kwargs)
    except BaseException:
        for module in reversed(patched):
            unpatch(module)
        raise
    if not isinstance(server, socketserver.BaseServer):
        for module in reversed(patched):
            unpatch(module)
        raise TypeError(f"{factory!r} made {server!r}, not a socketserver server")
    task = asyncio.get_running_loop().create_task(
        stacks.call(server.serve_forever, poll_interval), name=f"serve {server!r}"
    )
    hosted_server = HostedServer(server, tuple(patched), task)
    _hosted[id(server)] = hosted_server
    reactor = stacks.runtime().reactor
    if reactor is not None:  # on a shard: stop with it
        reactor.add_shutdown_hook(hosted_server.stop)
    return hosted_server


def hosted() -> list[HostedServer]:
    """The servers this process hosts on tame stacks and has not stopped."""
    return list(_hosted.values())
