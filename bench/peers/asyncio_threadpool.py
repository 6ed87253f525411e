"""The baseline OSD for bench/osd.py: one asyncio process, the store in a thread pool.

What a Python developer would write without shardio: a uvloop server, the
same object store opened with ``PosixEnv`` (plain blocking ``os.pread``,
``threading`` locks), and every store operation sent to a
``ThreadPoolExecutor`` with ``loop.run_in_executor``. To keep the comparison
about *where the store runs* and nothing else, it speaks the same protocol
through the same messenger code as the shards (``OSDConnection``: the same
decoder, pipelining, backpressure and reply batching), and runs the very same
``apply_op`` function per request. It answers GET_MAP with a one-shard map
pointing at itself, so the OSD clients talk to it unchanged.

    python bench/peers/asyncio_threadpool.py --data DIR [--port 0] [--threads 8]

prints ``listening on HOST:PORT`` once it serves; SIGINT/SIGTERM stop it
(the store is closed, so everything written is durable).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import signal
import sys

import uvloop

from shardio.net import Entry, WaitingRequests, listen
from shardio.osd.messenger import Limits, OSDConnection
from shardio.osd.objectstore import ObjectStore
from shardio.osd.operations import Result, apply_op
from shardio.osd.osdmap import OSDMap, object_hash
from shardio.osd.protocol import OBJECT_OPS, OP_LIST, Frame, Status
from shardio.osd.stats import OSDStats
from shardio.tame import posix_env


class ThreadPoolNode:
    """The messenger's Node for a single-process server: ops run in a thread pool."""

    shard_id = 0

    def __init__(
        self,
        store: ObjectStore,
        pool: concurrent.futures.ThreadPoolExecutor,
        pg_num: int,
        limits: Limits,
    ) -> None:
        self.store = store
        self.pool = pool
        self.limits = limits
        self.stats = OSDStats()
        self.waiting = WaitingRequests()
        self.connections: set[OSDConnection] = set()
        self.osdmap = OSDMap.build(1, pg_num=pg_num)
        self.map_payload = self.osdmap.encode()

    def enter(self) -> None:
        """(The connection core's hooks around a run on a tame stack: nothing to track.)"""

    def leave(self) -> None:
        pass

    def set_address(self, host: str, port: int) -> None:
        self.osdmap = self.osdmap.with_addrs([(host, port)])
        self.map_payload = self.osdmap.encode()

    def run_in_pool(self, op: int, name: bytes, offset: int, length: int, payload: bytes):  # noqa: ANN201
        """The store op on one of the pool's threads: an asyncio future of its Result."""
        return asyncio.get_running_loop().run_in_executor(
            self.pool, apply_op, self.store, op, name, offset, length, payload,
            self.limits.max_list,
        )  # fmt: skip

    def forward(self, shard: int, *args: object) -> asyncio.Future[Result]:
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        fut.set_result((Status.EINVAL, b"", 0, 0))  # one shard: nothing to forward to
        return fut


class ThreadPoolConnection(OSDConnection):
    """The OSD protocol, each store request run in the thread pool instead of on the
    tame stack that takes it: handed over like a hop to another shard (``hold``),
    completed when the pool's future is done."""

    service: ThreadPoolNode

    def run(self, frame: Frame, started: float, entry: Entry | None = None) -> list[bytes] | None:
        if frame.op not in OBJECT_OPS and frame.op != OP_LIST:
            return super().run(frame, started, entry)  # GET_MAP, PING, refusals: inline
        stage = "in the store's thread pool"
        if entry is None:
            entry = self.hold(frame, started, stage)
        else:
            self.wait_for(entry, stage)
        fut = self.service.run_in_pool(
            frame.op, frame.name, frame.offset, frame.length, frame.payload
        )
        fut.add_done_callback(lambda fut: self._hop_done(entry, fut))
        return None


async def serve(data: str, host: str, port: int, threads: int, pg_num: int, sync: bool) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="store")
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(
        pool,
        lambda: ObjectStore(
            os.path.join(data, "shard-0"),
            posix_env,
            pg_of=lambda k: object_hash(k) % pg_num,
            sync=sync,
        ),
    )
    node = ThreadPoolNode(store, pool, pg_num, Limits())
    server, bound = await listen(
        lambda: ThreadPoolConnection(node),  # type: ignore[arg-type]
        host,
        port,
        reuse_port=False,
    )
    node.set_address(host, bound)
    await server.start_serving()  # type: ignore[attr-defined]
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for conn in list(node.connections):
        conn.abort()
    await loop.run_in_executor(pool, store.close)
    pool.shutdown(wait=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--pg-num", type=int, default=64)
    p.add_argument("--no-sync", action="store_true")
    args = p.parse_args(argv)
    uvloop.run(serve(args.data, args.host, args.port, args.threads, args.pg_num, not args.no_sync))
    return 0


if __name__ == "__main__":
    sys.exit(main())
