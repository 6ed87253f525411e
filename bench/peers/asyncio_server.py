"""Peer: one asyncio (or uvloop) process, the store in ``asyncio.to_thread``.

What an asyncio developer writes for this protocol: an ``asyncio.Protocol``
that decodes pipelined request frames, one Task per request, the blocking
store call (``PosixEnv``: plain ``os.pread``) in ``asyncio.to_thread`` -- the
default executor, ``min(32, cpus + 4)`` threads -- and each reply written as
soon as it is ready (replies carry the request's tid, so order is free).
A connection stops being read while ``MAX_INFLIGHT`` of its requests are in
flight, as the shardio messenger does.

    python bench/peers/asyncio_server.py --data DIR [--loop asyncio|uvloop] [--port 0]

``--reuse-port`` joins an SO_REUSEPORT group (reuseport_workers.py starts N
of these on one port); ``--read-only`` refuses writes (several processes on
one store). Prints ``listening on HOST:PORT`` once it serves; SIGINT or
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

from common import (
    MAX_INFLIGHT,
    RequestDecoder,
    StoreSet,
    add_common_args,
    announce,
    answer_inline,
    execute,
    reply_parts,
)

from shardio.osd.protocol import Frame


class OSDProtocol(asyncio.Protocol):
    """One client connection: every request frame becomes a Task."""

    def __init__(self, stores: StoreSet, conns: set[OSDProtocol]) -> None:
        self.stores = stores
        self.conns = conns
        self.decoder = RequestDecoder()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        frames, errors, close = self.decoder.feed(data)
        transport = self.transport
        assert transport is not None
        if errors:
            transport.writelines(errors)
        for frame in frames:
            result = answer_inline(self.stores, frame)
            if result is not None:
                transport.writelines(reply_parts(frame, result))
                continue
            task = asyncio.create_task(self.serve(frame))
            self.tasks.add(task)
            task.add_done_callback(self.finished)
        if close:
            transport.close()
        elif len(self.tasks) >= MAX_INFLIGHT and not self.paused:
            self.paused = True
            transport.pause_reading()

    async def serve(self, frame: Frame) -> None:
        result = await asyncio.to_thread(execute, self.stores, frame)
        if self.transport is not None:
            self.transport.writelines(reply_parts(frame, result))

    def finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.paused and len(self.tasks) < MAX_INFLIGHT and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stores = await asyncio.to_thread(StoreSet.open, args.data, read_only=args.read_only)
    conns: set[OSDProtocol] = set()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    server = await loop.create_server(lambda: OSDProtocol(stores, conns), sock=sock, backlog=1024)
    port = sock.getsockname()[1]
    stores.set_address(args.host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(args.host, port)
    await stop.wait()
    server.close()
    for conn in list(conns):
        if conn.transport is not None:
            conn.transport.abort()
    await asyncio.to_thread(stores.close)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--reuse-port", action="store_true", help="join an SO_REUSEPORT group")
    p.add_argument("--read-only", action="store_true", help="refuse PUT/WRITE/DELETE (EROFS)")
    args = p.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
