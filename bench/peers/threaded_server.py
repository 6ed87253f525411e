"""Peer: thread per connection (``socketserver.ThreadingTCPServer``), the store in that thread.

The classic blocking server: every connection gets a thread that reads
request frames, calls the store directly (``PosixEnv``: plain ``os.pread``)
and sends the replies; pipelined requests that arrive together are answered
in order and their replies leave in one ``sendall``
(``common.handle_blocking``). Threads share the GIL.

    python bench/peers/threaded_server.py --data DIR [--port 0]

Prints ``listening on HOST:PORT`` once it serves; SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import socketserver
import sys
import threading
from typing import Any

from common import StoreSet, add_common_args, announce, handle_blocking


class OSDServer(socketserver.ThreadingTCPServer):
    """ThreadingTCPServer holding the stores its handlers use."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], stores: StoreSet) -> None:
        self.stores = stores
        super().__init__(address, OSDHandler)


class OSDHandler(socketserver.BaseRequestHandler):
    """One connection, served until the client closes it."""

    server: OSDServer

    def handle(self) -> None:
        handle_blocking(self.request, self.server.stores)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args(argv)
    stores = StoreSet.open(args.data)
    server = OSDServer((args.host, args.port), stores)
    port = server.server_address[1]
    stores.set_address(args.host, port)

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever to return: call it from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    announce(args.host, port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        stores.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
