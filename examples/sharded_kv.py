"""A sharded in-memory key-value server over TCP.

Every shard listens on the same port (SO_REUSEPORT), so the kernel spreads
connections across shards.  Each key is owned by one shard
(crc32(key) % shards); the shard that accepted a connection forwards each
command to the owner with submit_to, which runs it there without locks: the
owner's dict is touched by its own reactor only.

Protocol, one command per line:  SET key value | GET key | DEL key | STATS
Replies:  OK | VALUE value | NOTFOUND | DELETED | STATS n0 n1 ... | ERROR why

Run:        python examples/sharded_kv.py --port 7070 [--shards N]
Self-test:  python examples/sharded_kv.py --selftest   (starts, checks, stops)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import threading
import zlib

import shardio


class Store:
    """This shard's part of the key space."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def size(self) -> int:
        return len(self.data)


def owner_of(key: str) -> int:
    return zlib.crc32(key.encode()) % shardio.shard_count()


class Listener:
    """One listening socket per shard, all bound to the same port."""

    def __init__(self, store: shardio.Sharded, host: str, port: int) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, self.host, self.port,
                                                 reuse_port=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write((await self.execute(line.decode(errors="replace").split()) + "\n"
                              ).encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def execute(self, words: list[str]) -> str:
        if not words:
            return "ERROR empty command"
        command, args = words[0].upper(), words[1:]
        if command == "SET" and len(args) == 2:
            await self.store.invoke_on(owner_of(args[0]), "set", args[0], args[1])
            return "OK"
        if command == "GET" and len(args) == 1:
            value = await self.store.invoke_on(owner_of(args[0]), "get", args[0])
            return "NOTFOUND" if value is None else f"VALUE {value}"
        if command == "DEL" and len(args) == 1:
            deleted = await self.store.invoke_on(owner_of(args[0]), "delete", args[0])
            return "DELETED" if deleted else "NOTFOUND"
        if command == "STATS" and not args:
            return "STATS " + " ".join(map(str, await self.store.invoke_on_all("size")))
        return f"ERROR bad command {' '.join(words)[:80]!r}"


async def start_services(host: str, port: int) -> int:
    store = shardio.Sharded(Store)
    await store.start()
    listener = shardio.Sharded(Listener, store, host, port)
    await listener.start()
    return port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def self_test(host: str, port: int, keys: int = 2000, clients: int = 8) -> None:
    """Many clients, each on its own connection (so on whichever shard accepted it)."""

    def client(number: int) -> None:
        rng = random.Random(number)
        with socket.create_connection((host, port)) as sock, sock.makefile("rw") as stream:
            def ask(line: str) -> str:
                stream.write(line + "\n")
                stream.flush()
                return stream.readline().strip()

            mine = [f"k{number}-{i}" for i in range(keys // clients)]
            for key in mine:
                assert ask(f"SET {key} v{key}") == "OK"
            for key in rng.sample(mine, len(mine)):
                assert ask(f"GET {key}") == f"VALUE v{key}", key
            for key in mine[::2]:
                assert ask(f"DEL {key}") == "DELETED"
            assert ask(f"GET {mine[0]}") == "NOTFOUND"
            assert ask("FROB").startswith("ERROR")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with socket.create_connection((host, port)) as sock, sock.makefile("rw") as stream:
        stream.write("STATS\n")
        stream.flush()
        sizes = [int(n) for n in stream.readline().split()[1:]]
    assert sum(sizes) == keys // 2, sizes
    print(f"self-test passed: {clients} clients, {keys} keys; keys per shard now {sizes}")


def main() -> None:
    parser = argparse.ArgumentParser(description="A sharded key-value server over TCP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--backend", choices=["process", "thread"], default="process")
    parser.add_argument("--selftest", action="store_true", help="start, check, stop")
    options = parser.parse_args()
    port = free_port() if options.selftest else options.port
    with shardio.ShardGroup(options.shards, backend=options.backend) as group:
        group.submit(0, start_services, options.host, port).result()
        print(f"serving on {options.host}:{port} with {options.shards} shards")
        if options.selftest:
            self_test(options.host, port)
        else:
            try:
                signal.pause()
            except KeyboardInterrupt:
                print("stopping")


if __name__ == "__main__":
    main()
