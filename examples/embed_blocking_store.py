"""Serve a *blocking* store from an asyncio HTTP server, through a ShardGroup.

    python examples/embed_blocking_store.py --port 8080 --shards 2 --data /var/tmp/kv

    curl -X PUT --data-binary @file http://127.0.0.1:8080/kv/mykey    # 204
    curl http://127.0.0.1:8080/kv/mykey                               # 200 + body, or 404
    curl http://127.0.0.1:8080/stats                                  # per-shard tame/io counters

``BlockingStore`` is ordinary synchronous code (open, write, fsync, rename,
a lock) written against an ``Env``. Each shard runs it on tame stacks, so
its file I/O goes through the shard's io_uring and its lock waits yield to
the shard's reactor; the aiohttp server's own loop only awaits
``group.call`` futures and never blocks. A key lives on shard
``crc32(key) % shards``. The server measures its own loop lag (a 1 ms timer)
and reports the worst one at /stats.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import signal
import sys
import zlib
from typing import Any

from aiohttp import web

import shardio
from shardio import tame

# ---------------------------------------------------------------------------
# The blocking store: plain synchronous code against an Env
# ---------------------------------------------------------------------------


class BlockingStore:
    """One file per key; writes are durable (write, fsync, rename, fsync the directory)."""

    def __init__(self, root: str, env: tame.Env) -> None:
        self.root = root
        self.env = env
        env.makedirs(root, exist_ok=True)
        self._commit_lock = env.Lock()
        self._tmp = itertools.count()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, hashlib.sha1(key.encode()).hexdigest())

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        if not self.env.exists(path):
            return None
        with self.env.open(path, "rb") as f:
            return f.read()

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp{next(self._tmp)}"
        with self.env.open(tmp, "wb") as f:
            f.write(value)
            f.fsync()
        with self._commit_lock:  # one rename + directory fsync at a time
            self.env.rename(tmp, path)
            self.env.fsync_dir(self.root)


# ---------------------------------------------------------------------------
# Shard side: each shard opens its own store on a tame stack
# ---------------------------------------------------------------------------

# Per shard (with the thread backend all shards share this module: key by shard id;
# a store's tame Lock belongs to the reactor that created it).
_stores: dict[int, BlockingStore] = {}


def _open_store(root: str) -> BlockingStore:
    shard = shardio.this_shard()
    if shard not in _stores:
        _stores[shard] = BlockingStore(os.path.join(root, f"shard-{shard}"), tame.env())
    return _stores[shard]


async def _store(root: str) -> BlockingStore:
    store = _stores.get(shardio.this_shard())
    return store if store is not None else await tame.call(_open_store, root)


async def shard_get(root: str, key: str) -> bytes | None:
    return await tame.call((await _store(root)).get, key)


async def shard_put(root: str, key: str, value: bytes) -> None:
    await tame.call((await _store(root)).put, key, value)


async def shard_stats() -> dict[str, Any]:
    from shardio.tame.stacks import runtime

    rt = runtime()
    return {
        "shard": shardio.this_shard(),
        "pid": os.getpid(),
        "tame": tame.stats(),
        "file_io": rt._uring.stats() if rt._uring is not None else None,
    }


# ---------------------------------------------------------------------------
# The HTTP server (its own asyncio loop, outside the shards)
# ---------------------------------------------------------------------------


class Server:
    def __init__(self, group: shardio.ShardGroup, root: str) -> None:
        self.group = group
        self.root = root
        self.max_lag = 0.0

    def shard_of(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.group.shards

    async def get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await self.group.call(self.shard_of(key), shard_get, self.root, key)
        if value is None:
            raise web.HTTPNotFound(text=f"no such key: {key}\n")
        return web.Response(body=value, content_type="application/octet-stream")

    async def put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await request.read()
        await self.group.call(self.shard_of(key), shard_put, self.root, key, value)
        return web.Response(status=204)

    async def stats(self, request: web.Request) -> web.Response:
        shards = await asyncio.gather(
            *(self.group.call(s, shard_stats) for s in range(self.group.shards))
        )
        return web.json_response({"server_max_loop_lag_ms": self.max_lag * 1e3, "shards": shards})

    async def watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            self.max_lag = max(self.max_lag, loop.time() - t0 - 0.001)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.add_routes(
            [
                web.get("/kv/{key}", self.get),
                web.put("/kv/{key}", self.put),
                web.get("/stats", self.stats),
            ]
        )
        return app


async def serve(args: argparse.Namespace) -> None:
    os.makedirs(args.data, exist_ok=True)
    with shardio.ShardGroup(args.shards, backend=args.backend) as group:
        server = Server(group, os.path.abspath(args.data))
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(
            f"listening on http://{args.host}:{port} with {args.shards} shards ({args.backend})",
            flush=True,
        )
        lag = asyncio.ensure_future(server.watch_lag())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            lag.cancel()
            await runner.cleanup()
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--backend", choices=["process", "thread"], default="process")
    ap.add_argument("--data", default="/var/tmp/shardio-kv", help="store directory (a real disk)")
    args = ap.parse_args(argv)
    asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
