"""Peer: gevent, monkey-patched, a greenlet per connection, the store called in it.

What a gevent user writes: ``monkey.patch_all()`` first, a
``gevent.server.StreamServer`` whose handler is plain blocking code
(``common.handle_blocking``: read frames, call the store, ``sendall`` the
replies). The store runs with ``PosixEnv``; its ``threading`` locks are
gevent's after patching, but ``os.pread`` is not patched by gevent: a read
that misses the page cache blocks the whole process (the hub) until the
disk answers, as file I/O under gevent does unless moved to its threadpool.

    python bench/peers/gevent_server.py --data DIR [--port 0]

Prints ``listening on HOST:PORT`` once it serves; SIGINT or SIGTERM stops it.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from common import StoreSet, add_common_args, announce, handle_blocking  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args(argv)
    stores = StoreSet.open(args.data)

    def handle(sock: socket.socket, address: Any) -> None:
        try:
            handle_blocking(sock, stores)
        finally:
            sock.close()

    server = StreamServer((args.host, args.port), handle, backlog=1024)
    server.start()
    port = server.server_port
    stores.set_address(args.host, port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, server.close)
    announce(args.host, port)
    try:
        server.serve_forever()
    finally:
        stores.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
