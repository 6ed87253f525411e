"""python -m redis_kv: run the sharded Redis-compatible server until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

import shardio

from .server import ProtectedModeError, RedisConfig, start_shard


def free_ports(host: str, n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m redis_kv", description=__doc__)
    p.add_argument("--shards", type=int, default=None, help="default: one per CPU")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=6379, help="the shared port (0 picks one)")
    p.add_argument(
        "--shard-base-port",
        type=int,
        default=None,
        help="shard S's cluster port is this + S (default: port + 1; 0 picks free ones)",
    )
    p.add_argument(
        "--requirepass",
        default=os.environ.get("REDIS_KV_PASSWORD"),
        help="clients must AUTH with it (default: $REDIS_KV_PASSWORD)",
    )
    p.add_argument(
        "--idle-poll-us",
        type=float,
        default=None,
        help="how long an idle shard keeps polling before it sleeps (shardio's default: "
        "200); 0 when the shards share their CPUs with the clients",
    )
    args = p.parse_args(argv)
    shards = args.shards or len(os.sched_getaffinity(0))
    port = args.port or free_ports(args.host, 1)[0]
    if args.shard_base_port == 0 or (args.shard_base_port is None and args.port == 0):
        shard_ports = tuple(free_ports(args.host, shards))
    else:
        base = args.shard_base_port if args.shard_base_port is not None else port + 1
        shard_ports = tuple(range(base, base + shards))
    config = RedisConfig(args.host, port, shard_ports, args.requirepass)
    try:
        config.check()
    except ProtectedModeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    node_ids = [os.urandom(20).hex() for _ in range(shards)]
    with shardio.ShardGroup(
        shards, preload=["redis_kv.server"], idle_poll_us=args.idle_poll_us
    ) as group:
        for future in group.submit_to_all(start_shard, config, node_ids):
            future.result(60)
        ports = ", ".join(str(p) for p in shard_ports)
        print(
            f"listening on {args.host}:{port}; cluster nodes (one per shard) on {ports}", flush=True
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
