"""The store daemon: a shard group holding the store, listening for workers to attach.

    cd examples && python -m web_attach.daemon --socket /run/app/shards.sock --data /var/tmp/kv

The socket's directory must exist with mode 0700 (only this user may attach:
calls cross by pickle).  Stops on SIGINT or SIGTERM; attached workers' calls
in flight then fail with ShardDied.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

import shardio

from . import store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="path to listen on (in a 0700 directory)")
    parser.add_argument("--data", required=True, help="store directory")
    parser.add_argument("--shards", type=int, default=2)
    options = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    root = os.path.abspath(options.data)
    os.makedirs(root, exist_ok=True)
    with shardio.ShardGroup(options.shards, listen=options.socket, warm_up_tame=True) as group:
        for future in group.submit_to_all(store.open_store, root):
            future.result(timeout=60)
        print(json.dumps({"listening": options.socket, "shard_pids": group.pids}), flush=True)
        stop.wait()
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    main()
