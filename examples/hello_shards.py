"""Hello, shards: submit_to, invoke_on_all, map_reduce and a Sharded counter.

Run:  python examples/hello_shards.py [--shards N] [--backend process|thread]
"""

from __future__ import annotations

import argparse
import operator
import os

import shardio


def where_am_i() -> str:
    return f"shard {shardio.this_shard()} of {shardio.shard_count()} (pid {os.getpid()})"


class Counter:
    """One instance per shard; each shard counts its own hits, nothing is shared."""

    def __init__(self) -> None:
        self.hits = 0

    def hit(self, n: int = 1) -> int:
        self.hits += n
        return self.hits


async def main() -> dict:
    last = shardio.shard_count() - 1
    print("main runs on", where_am_i())
    print("submit_to:", await shardio.submit_to(last, where_am_i))
    print("invoke_on_all:")
    for line in await shardio.invoke_on_all(where_am_i):
        print("   ", line)

    counter = shardio.Sharded(Counter)
    await counter.start()
    for i in range(100):
        await counter.invoke_on(i % shardio.shard_count(), "hit")
    per_shard = await counter.invoke_on_all("hit", 0)
    total = await counter.map_reduce("hit", operator.add, 0, 0)
    print("hits per shard:", per_shard, "total:", total)
    await counter.stop()
    return {"per_shard": per_shard, "total": total}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--backend", choices=["process", "thread"], default="process")
    options = parser.parse_args()
    result = shardio.run(main, shards=options.shards, backend=options.backend)
    assert result["total"] == 100, result
    print("done")
