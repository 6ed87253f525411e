"""OSD clients: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both fetch the OSD map from the address they are given (any shard answers
GET_MAP; usually the shared port) and then, with ``route="direct"`` (the
default), send each request straight to the shard that owns the object's
placement group, so no request pays a cross-shard hop. ``route="shared"``
sends everything to the given address instead and lets the accepting shard
forward (the path of a client that knows no map).

Requests are pipelined: any number of concurrent calls share one
connection per shard, each tagged with its own ``tid``; replies may come
back in any order. Every request has a timeout (``OSDTimeout``). A broken
connection fails the requests in flight on it (``OSDConnectionError``) and
the next request reconnects, fetching the map again first (the shard may
have moved: an OSD restarted on other ports); idempotent requests (read,
stat, list, ping, get_map) are retried ``retries`` times on a fresh
connection, writes never are (their outcome is unknown).

Errors reported by the OSD raise ``OSDStatusError`` with the errno-style
``status``; ``ObjectNotFound`` (ENOENT) and ``ShardUnavailable``
(ESHUTDOWN: the shard owning the pg is down) are subclasses worth catching.
Every exception class is defined in ``shardio.osd.protocol`` and exported by
``shardio.osd`` (and, as before, by this module).

The two clients are thin transports over one core without I/O
(``shardio.osd.client_core``: routing, request frames, reply parsing,
retries); ``client_blocking`` and ``client_asyncio`` perform its steps.

    async with await AsyncClient.connect("127.0.0.1", 6800) as c:
        await c.put("greeting", b"hello")
        assert await c.get("greeting") == b"hello"

    with Client("127.0.0.1", 6800) as c:
        c.put("greeting", b"hello")
"""

from __future__ import annotations

from .client_asyncio import AsyncClient
from .client_blocking import Client, wait_for_osd
from .client_core import READ_CHUNK, ObjectStat
from .protocol import (
    ObjectNotFound,
    OSDClientError,
    OSDConnectionError,
    OSDProtocolError,
    OSDStatusError,
    OSDTimeout,
    ShardUnavailable,
    status_error,
)

__all__ = [
    "READ_CHUNK",
    "AsyncClient",
    "Client",
    "OSDClientError",
    "OSDConnectionError",
    "OSDProtocolError",
    "OSDStatusError",
    "OSDTimeout",
    "ObjectNotFound",
    "ObjectStat",
    "ShardUnavailable",
    "status_error",
    "wait_for_osd",
]
