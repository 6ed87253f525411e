"""Shard-side glue of the hosted-server tests: host tests/socketserver_app.py on a shard."""

from __future__ import annotations

import socketserver_app

from shardio import tame


async def host_kv(port: int) -> int:
    """Host the unmodified KV server on this shard (SO_REUSEPORT); return its port."""
    server = await tame.servers.host(
        socketserver_app.KVServer,
        ("127.0.0.1", port),
        socketserver_app.KVHandler,
        modules=[socketserver_app],
        poll_interval=0.1,
    )
    return server.address[1]


def connection_stacks() -> int:
    """Tame stacks of this shard parked in a connection handler (one per open connection)."""
    return sum(
        1
        for stack in tame.dump_stacks()
        if any("socketserver_app.py" in line for line in stack.python_stack)
    )


async def stop_kv() -> None:
    for server in tame.servers.hosted():
        await server.stop()
