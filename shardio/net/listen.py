"""Listening sockets of a shard: its own port, or a port every shard shares."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

__all__ = ["listen"]


async def listen(
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    *,
    reuse_port: bool,
    backlog: int = 1024,
) -> tuple[asyncio.AbstractServer, int]:
    """Bind a listening socket whose connections get ``factory()`` protocols (not
    serving yet: ``start_serving()`` starts it); return (server, bound port).

    ``port`` 0 binds a free port. With ``reuse_port`` the socket joins an
    ``SO_REUSEPORT`` group: every shard binds the same port and the kernel
    spreads incoming connections over them.
    """
    loop = asyncio.get_running_loop()
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve listen address {host!r}")
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        server = await loop.create_server(factory, sock=sock, backlog=backlog, start_serving=False)
    except BaseException:
        sock.close()
        raise
    return server, bound
