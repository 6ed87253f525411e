"""Peer: a single-process asyncio RESP server with the redis_kv example's own parser and
command code (examples/redis_kv: ``resp``, ``keyspace``, ``server.key_call``), on uvloop.

What a Python developer writes without shardio: one ``asyncio.Protocol``, every
command of a socket read run at once, the replies in one write. Commands:
those redis-benchmark uses (PING, SET, GET, INCR, MGET, MSET, DEL, EXISTS),
CONFIG GET (empty), and the one-key commands of the example.

    python bench/peers/redis_asyncio.py --port 0

Prints ``listening on HOST:PORT`` once it serves; SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))

from redis_kv import resp  # noqa: E402
from redis_kv.keyspace import KeySpace  # noqa: E402
from redis_kv.server import COMMANDS, key_call  # noqa: E402


class RespProtocol(asyncio.Protocol):
    def __init__(self, space: KeySpace) -> None:
        self.space = space
        self.parser = resp.RequestParser()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            commands = self.parser.feed(data)
        except resp.ProtocolError as exc:
            assert self.transport is not None
            self.transport.write(resp.error(f"ERR {exc}"))
            self.transport.close()
            return
        out = [self.run(c) for c in commands]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def run(self, command: list[bytes]) -> bytes:
        name = command[0].upper()
        space = self.space
        spec = COMMANDS.get(name)
        if name == b"CONFIG":
            return resp.array([])
        if spec is None:
            return resp.error(f"ERR unknown command '{command[0].decode(errors='replace')}'")
        if (spec.arity > 0 and len(command) != spec.arity) or len(command) < -spec.arity:
            return resp.error(f"ERR wrong number of arguments for '{name.decode().lower()}' command")
        if spec.kind == "key":
            method, args = key_call(name, command, resp.NULL)
            return getattr(space, method)(*args)  # type: ignore[no-any-return]
        if name == b"MGET":
            return resp.array(space.get_many(command[1:], resp.NULL))
        if name == b"MSET":
            space.set_many(list(zip(command[1::2], command[2::2], strict=True)))
            return resp.OK
        if name == b"DEL":
            return resp.integer(space.delete_many(command[1:]))
        if name == b"EXISTS":
            return resp.integer(space.exists_many(command[1:]))
        if name == b"PING":
            return resp.PONG
        if name == b"ECHO":
            return resp.bulk(command[1])
        return resp.error(f"ERR '{name.decode().lower()}' is not served by this peer")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    space = KeySpace()
    server = await loop.create_server(lambda: RespProtocol(space), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
