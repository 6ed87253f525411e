"""Peer: the threaded peer's own server and handler, unmodified, served by shardio.

``threaded_server.OSDServer`` (a ``ThreadingTCPServer`` subclass) and its
``OSDHandler`` run on a shardio shard through ``shardio.tame.servers.host``:
``socketserver``, ``threaded_server`` and ``common`` are tamed, the accept
loop parks on the reactor, and every connection's thread is a tame stack of
the shard instead of an OS thread. Nothing in those modules changes. The
stores are the same PosixEnv stores the threaded peer opens (plain
``os.pread``: a page-cache miss blocks the shard, as it blocks a thread of
the threaded peer).

    python bench/peers/shardio_threaded.py --data DIR [--port 0] [--cpu N]

Prints ``listening on HOST:PORT`` once it serves; SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from typing import Any

import common
import threaded_server
from common import StoreSet, add_common_args, announce

import shardio
from shardio import tame


async def host_on_shard(data_dir: str, host: str, port: int) -> int:
    """On the shard: open the stores and host the threaded peer's server; its port."""
    stores = await tame.alien(StoreSet.open, data_dir)  # opening scans the logs: off the reactor
    stores.set_address(host, port)
    server = await tame.servers.host(
        threaded_server.OSDServer,
        (host, port),
        stores,
        modules=[threaded_server, common],
        poll_interval=0.2,
    )
    shardio.current_reactor().add_shutdown_hook(stores.close)  # type: ignore[union-attr]
    return int(server.address[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--cpu", type=int, default=None, help="pin the shard to this CPU")
    args = p.parse_args(argv)
    port = args.port
    if port == 0:  # one number up front (every shard of a group would bind it)
        with socket.socket() as s:
            s.bind((args.host, 0))
            port = s.getsockname()[1]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    pin: Any = None if args.cpu is None else [args.cpu]
    with shardio.ShardGroup(1, pin=pin, idle_poll_us=0) as group:
        group.submit(0, host_on_shard, os.path.abspath(args.data), args.host, port).result(60)
        announce(args.host, port)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
