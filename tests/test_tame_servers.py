"""Unmodified socketserver servers hosted on shards' tame stacks (shardio.tame.servers).

tests/socketserver_app.py is a plain ThreadingTCPServer with its own handler,
written for the standard library; two process shards host it on one port
with SO_REUSEPORT; clients are real sockets on loopback.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import hosted_servers
import pytest
from osd_helpers import free_port

import shardio


def _lines(sock: socket.socket) -> tuple[socket.socket, object]:
    return sock, sock.makefile("rb")


def ask(conn: tuple[socket.socket, object], line: str) -> str:
    sock, reader = conn
    sock.sendall(line.encode() + b"\n")
    return reader.readline().decode().rstrip("\n")  # type: ignore[attr-defined]


def connect(port: int) -> tuple[socket.socket, object]:
    return _lines(socket.create_connection(("127.0.0.1", port), timeout=30))


@pytest.fixture(scope="module")
def hosted() -> tuple[shardio.ShardGroup, int]:
    port = free_port()
    with shardio.ShardGroup(2, preload=["hosted_servers"]) as group:
        bound = [f.result(30) for f in group.submit_to_all(hosted_servers.host_kv, port)]
        assert bound == [port, port]
        yield group, port


def test_every_shard_serves_the_same_port_one_tame_stack_per_connection(hosted) -> None:
    group, port = hosted
    pids = set(group.pids)
    conns = [connect(port) for _ in range(24)]
    try:
        seen = {int(ask(c, "PID")) for c in conns}
        assert seen <= pids and len(seen) == 2, f"SO_REUSEPORT spread nothing: {seen}"
        stacks = [group.submit(s, hosted_servers.connection_stacks).result(10) for s in (0, 1)]
        assert sum(stacks) == 24, f"connection handlers parked per shard: {stacks}"
    finally:
        for sock, reader in conns:
            reader.close()  # type: ignore[attr-defined]
            sock.close()


def test_many_clients_get_their_own_answers(hosted) -> None:
    group, port = hosted

    def client(i: int) -> list[str]:
        conn = connect(port)
        try:
            out = []
            for j in range(50):
                assert ask(conn, f"SET k{i}-{j} v{i}-{j}") == "OK"
                out.append(ask(conn, f"GET k{i}-{j}"))
            return out
        finally:
            conn[1].close()  # type: ignore[attr-defined]
            conn[0].close()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(64)))
    # a key lives on the shard that served its connection: each client reads its own writes
    assert results == [[f"v{i}-{j}" for j in range(50)] for i in range(64)]


def test_a_sleeping_handler_does_not_hold_up_the_others(hosted) -> None:
    """time.sleep in the unmodified handler parks its stack: with a client asleep on
    each shard, 100 requests from other clients are answered before either wakes."""
    group, port = hosted
    sleepers = []
    pids: set[int] = set()
    while len(pids) < 2:  # one sleeper per shard
        conn = connect(port)
        pid = int(ask(conn, "PID"))
        if pid in pids:
            conn[1].close()  # type: ignore[attr-defined]
            conn[0].close()
            continue
        pids.add(pid)
        conn[0].sendall(b"SLEEP 30\n")
        sleepers.append(conn)
    try:
        for _ in range(10):
            conn = connect(port)
            for _ in range(10):
                assert ask(conn, "GET nothing") == "-"
            conn[1].close()  # type: ignore[attr-defined]
            conn[0].close()
        for sock, _reader in sleepers:  # still asleep: no reply has arrived
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock, reader in sleepers:
            reader.close()  # type: ignore[attr-defined]
            sock.close()


def test_the_server_stops_with_its_shard_and_frees_the_port() -> None:
    port = free_port()
    group = shardio.ShardGroup(1, preload=["hosted_servers"])
    with group:
        assert group.submit(0, hosted_servers.host_kv, port).result(30) == port
        conn = connect(port)
        assert ask(conn, "SET a b") == "OK"
        done = threading.Event()

        def hold() -> None:
            try:
                conn[1].readline()  # type: ignore[attr-defined]
            finally:
                done.set()

        threading.Thread(target=hold, daemon=True).start()
    # stopped: the handler's connection was closed and the port is free again
    assert done.wait(10)
    conn[0].close()
    with socket.socket() as s:  # (SO_REUSEADDR passes TIME_WAIT, never a listener)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
