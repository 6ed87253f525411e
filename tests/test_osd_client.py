"""The OSD clients' shared core, over both transports: errors, pipelining, map changes.

Most tests talk to a *scripted* OSD: a real TCP server on 127.0.0.1 that
speaks the wire protocol and answers the way a test needs (holding every
request until a number of them have arrived, corrupting one reply, sending
bytes that are not the protocol). The map-change test restarts a real
``OSDServer`` on other shard ports under connected clients.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from osd_helpers import free_port

import shardio.osd
import shardio.osd.client as client_module
from shardio.osd.client import AsyncClient, Client
from shardio.osd.client_core import ClientCore
from shardio.osd.osdmap import OSDMap
from shardio.osd.protocol import (
    Frame,
    FrameDecoder,
    ObjectNotFound,
    Op,
    OSDClientError,
    OSDConnectionError,
    OSDProtocolError,
    OSDStatusError,
    OSDTimeout,
    ShardUnavailable,
    Status,
    encode_reply,
)
from shardio.osd.server import OSDServer

# A responder gets the requests held so far (in arrival order) and returns the bytes to
# send back and the requests to keep holding.
Responder = Callable[[list[Frame]], tuple[bytes, list[Frame]]]


def read_reply(frame: Frame) -> bytes:
    """The scripted OSD's answer to a READ: ENOENT for names starting with "missing"."""
    if frame.name.startswith(b"missing"):
        return encode_reply(frame.op, frame.tid, Status.ENOENT)
    return encode_reply(frame.op, frame.tid, 0, b"data of " + frame.name)


def answer_each(held: list[Frame]) -> tuple[bytes, list[Frame]]:
    return b"".join(read_reply(f) for f in held), []


def hold_until(n: int) -> Responder:
    """Answer nothing until n requests are held, then all of them, the last first."""

    def respond(held: list[Frame]) -> tuple[bytes, list[Frame]]:
        if len(held) < n:
            return b"", held
        return b"".join(read_reply(f) for f in reversed(held)), []

    return respond


class ScriptedOSD:
    """A one-shard OSD on loopback: GET_MAP gets a map naming it, the rest a responder."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.osdmap = OSDMap.build(1, pg_num=8, addrs=[("127.0.0.1", self.port)])
        self.connections = 0
        self.requests = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        decoder = FrameDecoder()
        held: list[Frame] = []
        try:
            while data := sock.recv(1 << 16):
                out = []
                for frame in decoder.feed(data):
                    if frame.op == Op.GET_MAP:
                        out.append(encode_reply(frame.op, frame.tid, 0, self.osdmap.encode()))
                    else:
                        with self._lock:
                            self.requests += 1
                        held.append(frame)
                reply, held = self.respond(held)
                sock.sendall(b"".join(out) + reply)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._socks:
                with_suppressed_close(sock)


def with_suppressed_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Responder], ScriptedOSD]]:
    made: list[ScriptedOSD] = []

    def make(respond: Responder) -> ScriptedOSD:
        osd = ScriptedOSD(respond)
        made.append(osd)
        return osd

    yield make
    for osd in made:
        osd.close()


# -- the exceptions: one definition, one place -----------------------------------------------


def test_every_client_exception_is_one_class_exported_by_shardio_osd() -> None:
    for name in (
        "OSDClientError",
        "OSDConnectionError",
        "OSDProtocolError",
        "OSDTimeout",
        "OSDStatusError",
        "ObjectNotFound",
        "ShardUnavailable",
    ):
        cls = getattr(shardio.osd, name)
        assert getattr(client_module, name) is cls
        assert cls.__module__ == "shardio.osd.protocol"
        assert issubclass(cls, shardio.errors.ShardioError)
    err = pickle.loads(pickle.dumps(ObjectNotFound(Op.READ, b"x", Status.ENOENT)))
    assert type(err) is ObjectNotFound and err.errno == 2
    assert str(err) == "READ b'x': ENOENT (No such file or directory)"


# -- pipelining ----------------------------------------------------------------------------


def test_blocking_read_many_pipelines_everything_before_reading(scripted) -> None:  # noqa: ANN001
    """The server answers only once all 1,000 requests have arrived, the last first."""
    n = 1000
    osd = scripted(hold_until(n))
    names = [f"missing-{i}" if i % 97 == 0 else f"obj-{i}" for i in range(n)]
    with Client("127.0.0.1", osd.port, timeout=10) as c:
        got = c.read_many(names)
    for name, value in zip(names, got, strict=True):
        if name.startswith("missing"):
            assert isinstance(value, ObjectNotFound) and value.name == name.encode()
        else:
            assert value == b"data of " + name.encode()
    assert osd.requests == n and osd.connections == 2  # the map's, and the shard's


def test_async_calls_share_one_pipelined_connection(scripted) -> None:  # noqa: ANN001
    """1,000 concurrent reads and one read_many of 500: one connection, every reply matched."""
    osd = scripted(hold_until(1000))

    async def body() -> None:
        async with await AsyncClient.connect("127.0.0.1", osd.port, timeout=10) as c:
            names = [f"obj-{i}" for i in range(1000)]
            got = await asyncio.gather(*(c.read(n) for n in names))
            assert got == [b"data of " + n.encode() for n in names]
            osd.respond = hold_until(500)
            many = await c.read_many([f"missing-{i}" if i == 7 else f"m-{i}" for i in range(500)])
            assert isinstance(many[7], ObjectNotFound)
            assert many[:7] + many[8:] == [
                f"m-{i}".encode().join((b"data of ", b"")) for i in range(500) if i != 7
            ]

    asyncio.run(body())
    assert osd.connections == 2  # the map's, and one for every read


# -- errors --------------------------------------------------------------------------------


def corrupt_reply_to(bad: bytes) -> Responder:
    """Answer each request; the reply to ``bad`` gets a flipped byte (its body CRC fails)."""

    def respond(held: list[Frame]) -> tuple[bytes, list[Frame]]:
        out = []
        for f in held:
            reply = read_reply(f)
            if f.name == bad:
                reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
            out.append(reply)
        return b"".join(out), []

    return respond


def test_a_corrupt_reply_fails_its_request_only(scripted) -> None:  # noqa: ANN001
    osd = scripted(corrupt_reply_to(b"bad"))
    with Client("127.0.0.1", osd.port, retries=0) as c:
        with pytest.raises(OSDProtocolError, match="checksum"):
            c.read("bad")
        assert c.read("good") == b"data of good"  # same connection, still in sync
        with pytest.raises(OSDProtocolError, match="checksum"):
            c.read_many(["good", "bad"])
        assert c.read_many(["a", "b"]) == [b"data of a", b"data of b"]
    assert osd.connections == 2  # the map's, and the shard's: never dropped

    async def body() -> None:
        async with await AsyncClient.connect("127.0.0.1", osd.port, retries=0) as c:
            good, bad = await asyncio.gather(c.read("good"), c.read("bad"), return_exceptions=True)
            assert good == b"data of good"
            assert isinstance(bad, OSDProtocolError) and "checksum" in str(bad)
            assert await c.read("again") == b"data of again"

    asyncio.run(body())
    assert osd.connections == 4


def test_bytes_that_are_not_the_protocol_drop_the_connection(scripted) -> None:  # noqa: ANN001
    osd = scripted(lambda held: (b"HTTP/1.1 400 Bad Request\r\n\r\n" if held else b"", []))
    with (
        Client("127.0.0.1", osd.port, retries=1) as c,
        pytest.raises(OSDProtocolError, match="magic"),
    ):
        c.stat("x")
    # one fetched the map; each attempt of the STAT had a fresh one
    assert osd.connections == 3

    async def body() -> None:
        async with await AsyncClient.connect("127.0.0.1", osd.port, retries=0) as c:
            with pytest.raises(OSDProtocolError, match="magic"):
                await c.read("x")

    asyncio.run(body())


def test_error_statuses_raise_their_classes(scripted) -> None:  # noqa: ANN001
    statuses = {b"gone": Status.ENOENT, b"down": Status.ESHUTDOWN, b"big": Status.E2BIG}

    def respond(held: list[Frame]) -> tuple[bytes, list[Frame]]:
        return b"".join(encode_reply(f.op, f.tid, statuses[f.name]) for f in held), []

    osd = scripted(respond)
    with Client("127.0.0.1", osd.port) as c:
        with pytest.raises(ObjectNotFound):
            c.read("gone")
        with pytest.raises(ShardUnavailable):
            c.put("down", b"x")
        with pytest.raises(OSDStatusError) as info:
            c.write("big", b"x")
        assert type(info.value) is OSDStatusError and info.value.status == Status.E2BIG
        assert "WRITE b'big': E2BIG" in str(info.value)
        assert c.request(Op.READ, "gone", check=False).status == Status.ENOENT


def test_misuse_is_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="route must be 'direct' or 'shared'"):
        ClientCore("127.0.0.1", 1, route="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout and connect_timeout must be positive"):
        AsyncClient("127.0.0.1", 1, timeout=0)
    with pytest.raises(OSDClientError, match="no OSD map yet"):
        AsyncClient("127.0.0.1", 1).pg_count()


def test_a_wildcard_listen_address_in_the_map_means_the_bootstrap_host() -> None:
    core = ClientCore("127.0.0.2", 6800)
    core.osdmap = OSDMap.build(2, addrs=[("0.0.0.0", 6801), ("::", 6802)])
    assert core.endpoint(0)[:2] == ("127.0.0.2", 6801)
    assert core.endpoint(1)[:2] == ("127.0.0.2", 6802)
    core.osdmap = OSDMap.build(1, addrs=[("10.0.0.9", 6801)])
    assert core.endpoint(0)[:2] == ("10.0.0.9", 6801)
    assert core.endpoint(-1)[:2] == ("127.0.0.2", 6800)


# -- the map changes under the clients -------------------------------------------------------


def two_free_ports() -> int:
    """A port p such that p and p + 1 were both free a moment ago."""
    while True:
        p = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p


def test_clients_follow_the_map_when_the_osd_comes_back_on_other_ports(tmp_path) -> None:  # noqa: ANN001
    """Same shared port, new shard ports: reads retry through a fresh map; writes resume."""
    shared = free_port()
    names = [f"moved-{i}" for i in range(40)]
    common = {"shards": 2, "backend": "thread", "port": shared, "pg_num": 16}
    with OSDServer(tmp_path, shard_base_port=two_free_ports(), **common) as first:
        assert first.osdmap is not None
        old_addrs = first.osdmap.addrs
        c = Client("127.0.0.1", shared, timeout=10)
        for n in names:
            c.put(n, n.encode())
        c.read_many(names)  # a connection to each shard

        async def connect() -> AsyncClient:
            a = await AsyncClient.connect("127.0.0.1", shared, timeout=10)
            await asyncio.gather(*(a.read(n) for n in names))
            return a

        loop = asyncio.new_event_loop()
        a = loop.run_until_complete(connect())

    try:
        with OSDServer(tmp_path, shard_base_port=two_free_ports(), **common) as second:
            assert second.osdmap is not None and second.osdmap.addrs != old_addrs
            hops = second.total_stats()["hops_out"]
            # read_many is not retried: it fails on the old ports and marks the map stale
            with pytest.raises(OSDConnectionError):
                c.read_many(names)
            assert c.read_many(names) == [n.encode() for n in names]
            assert c.osdmap == second.osdmap
            # single reads are idempotent: each is retried once, after the map is fetched
            assert [c.read(n) for n in names] == [n.encode() for n in names]

            async def use_async() -> None:
                # a write is never retried (its outcome is unknown); the failed one marks
                # the map stale, so the next write goes to the new port
                with pytest.raises(OSDConnectionError):
                    await a.put(names[0], b"v2")
                await asyncio.gather(*(a.put(n, b"v2") for n in names))
                assert a.osdmap == second.osdmap
                assert await asyncio.gather(*(a.read(n) for n in names)) == [b"v2"] * len(names)

            loop.run_until_complete(use_async())
            assert second.total_stats()["hops_out"] == hops  # straight to the new ports
    finally:
        c.close()
        loop.run_until_complete(a.close())
        loop.close()


def test_a_silent_server_times_out_both_clients() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts, never answers
        port = silent.getsockname()[1]
        with pytest.raises(OSDTimeout, match="no progress in 0.2 s"):
            Client("127.0.0.1", port, timeout=0.2)

        async def body() -> None:
            c = AsyncClient("127.0.0.1", port, timeout=0.2)
            with pytest.raises(OSDTimeout, match="no reply to GET_MAP"):
                await c.refresh_map()
            await c.close()

        asyncio.run(body())
