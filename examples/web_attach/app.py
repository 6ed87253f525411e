"""The aiohttp application each gunicorn worker runs, attached to the store daemon's group.

    cd examples && gunicorn -k aiohttp.GunicornWebWorker -w 2 -b 127.0.0.1:8080 \\
        --env SHARDIO_SOCKET=/run/app/shards.sock 'web_attach.app:create_app'

    curl -X PUT --data-binary @file http://127.0.0.1:8080/kv/mykey    # 204
    curl http://127.0.0.1:8080/kv/mykey                               # 200 + body, or 404
    curl http://127.0.0.1:8080/clients                                # workers attached per shard

Every worker process attaches on startup (``shardio.connect``) and detaches on
shutdown; its handlers ``await client.call(...)``, and its loop takes the
replies off its own rings.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

import shardio

from . import store

CLIENT = web.AppKey("shardio_client", shardio.Client)


async def attach(app: web.Application) -> None:
    app[CLIENT] = await asyncio.to_thread(shardio.connect, os.environ["SHARDIO_SOCKET"])


async def detach(app: web.Application) -> None:
    await asyncio.to_thread(app[CLIENT].close)


def _worker_header() -> dict[str, str]:
    return {"X-Worker-Pid": str(os.getpid())}


async def get(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    key = request.match_info["key"]
    value = await client.call(store.shard_of(key, client.shards), store.get, key)
    if value is None:
        raise web.HTTPNotFound(text=f"no such key: {key}\n", headers=_worker_header())
    return web.Response(
        body=value, content_type="application/octet-stream", headers=_worker_header()
    )


async def put(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    key = request.match_info["key"]
    await client.call(store.shard_of(key, client.shards), store.put, key, await request.read())
    return web.Response(status=204, headers=_worker_header())


async def clients(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    shards = await asyncio.gather(*(client.call(s, store.clients) for s in range(client.shards)))
    return web.json_response({"worker": os.getpid(), "shards": shards}, headers=_worker_header())


async def create_app() -> web.Application:
    app = web.Application(client_max_size=16 << 20)
    app.on_startup.append(attach)
    app.on_cleanup.append(detach)
    app.add_routes(
        [web.get("/kv/{key}", get), web.put("/kv/{key}", put), web.get("/clients", clients)]
    )
    return app
