"""The OSD server: op semantics, routing, pipelining, backpressure, limits.

One OSD (2 shard processes) serves the whole module; tests use their own
object names. Real sockets on 127.0.0.1, ports picked by the kernel.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from osd_helpers import RawConn, by_tid, free_port, rss_kib, shard_tame_config

from shardio.osd.client import (
    AsyncClient,
    Client,
    ObjectNotFound,
    OSDConnectionError,
    OSDStatusError,
    OSDTimeout,
)
from shardio.osd.messenger import Limits
from shardio.osd.osdmap import OSDMap
from shardio.osd.protocol import (
    FLAG_MORE,
    FLAG_REPLY,
    Op,
    Status,
    encode_frame,
    encode_request,
    unpack_names,
    unpack_stat,
)
from shardio.osd.server import OSDConfigError, OSDServer


@pytest.fixture(scope="module")
def osd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OSDServer]:
    data = tmp_path_factory.mktemp("osd-server")
    limits = Limits(max_inflight=16, max_inflight_bytes=8 << 20, write_high_water=256 << 10)
    metrics_port = free_port()
    server = OSDServer(data, shards=2, pg_num=32, limits=limits, metrics_port=metrics_port)
    server.metrics_port = metrics_port
    with server:
        yield server


def run(coro):  # noqa: ANN001, ANN201 - test helper
    return asyncio.run(coro)


def names_on(osd: OSDServer, shard: int, n: int, prefix: str) -> list[str]:
    """n object names whose pg lives on ``shard``."""
    assert osd.osdmap is not None
    out = []
    i = 0
    while len(out) < n:
        name = f"{prefix}-{i}"
        if osd.osdmap.shard_for(name) == shard:
            out.append(name)
        i += 1
    return out


# -- op semantics ------------------------------------------------------------------------


def test_put_get_stat_delete_roundtrip(osd: OSDServer) -> None:
    with Client(*osd.address) as c:
        assert c.put("rt-a", b"hello world") == 11
        assert c.get("rt-a") == b"hello world"
        st = c.stat("rt-a")
        assert st.size == 11 and st.version > 0
        assert c.write("rt-a", b"W", 6) == 11
        assert c.get("rt-a") == b"hello World"
        assert c.stat("rt-a").version > st.version
        c.delete("rt-a")
        with pytest.raises(ObjectNotFound):
            c.get("rt-a")


def test_read_and_written_bytes_count_object_bytes_on_every_route(osd: OSDServer) -> None:
    """The byte counters (the store's own) count object bytes, not frames, including
    requests that hopped from another shard, and not reads that failed."""
    before = osd.total_stats()
    # one name on each shard: whichever shard accepts the connection, one of them hops
    names = names_on(osd, 0, 1, "bytes") + names_on(osd, 1, 1, "bytes")
    with Client(*osd.address) as c:
        for name in names:
            assert c.put(name, b"x" * 1000) == 1000
            assert c.write(name, b"y" * 10, 5) == 1000
            assert c.get(name) == b"x" * 5 + b"y" * 10 + b"x" * 985
            assert c.read(name, 100, 50) == b"x" * 50
        with pytest.raises(ObjectNotFound):
            c.get("bytes-never-written")
    after = osd.total_stats()
    assert after["written_bytes"] - before["written_bytes"] == 2 * (1000 + 10)
    assert after["read_bytes"] - before["read_bytes"] == 2 * (1000 + 50)


def test_missing_object_is_enoent(osd: OSDServer) -> None:
    with Client(*osd.address) as c:
        for call in (
            lambda: c.read("no-such"),
            lambda: c.stat("no-such"),
            lambda: c.delete("no-such"),
        ):
            with pytest.raises(ObjectNotFound) as info:
                call()
            assert info.value.status == Status.ENOENT == 2
    with RawConn(osd.address) as raw:  # and on the wire: status 2, empty payload
        raw.send(encode_request(Op.READ, 7, "no-such", length=10))
        (reply,) = raw.recv_frames(1)
        assert (reply.tid, reply.status, reply.payload, reply.is_reply) == (7, 2, b"", True)


def test_read_past_the_end_is_a_short_read(osd: OSDServer) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: spans 4 KiB blocks
    with Client(*osd.address) as c:
        c.put("short-read", data)
        assert c.read("short-read", 10000, 4096) == data[10000:]  # 240 bytes
        assert c.read("short-read", 10240, 100) == b""  # at the end
        assert c.read("short-read", 1 << 40, 100) == b""  # far past it
        assert c.read("short-read", 4000, 200) == data[4000:4200]  # across a block boundary
        assert c.read("short-read", 0, 0) == data  # length 0: to the end


def test_write_past_the_end_leaves_a_hole_of_zeros(osd: OSDServer) -> None:
    with Client(*osd.address) as c:
        c.put("holey", b"abc")
        assert c.write("holey", b"xyz", 10) == 13
        assert c.get("holey") == b"abc" + bytes(7) + b"xyz"


def test_list_per_pg_with_paging(osd: OSDServer) -> None:
    assert osd.osdmap is not None
    names = [f"list-{i:03d}" for i in range(60)]
    with Client(*osd.address) as c:
        for n in names:
            c.put(n, n.encode())
        listed = [x for x in c.list() if x.startswith(b"list-")]
        assert listed == sorted(n.encode() for n in names)
        pg = osd.osdmap.pg_for(names[0])
        in_pg = sorted(n.encode() for n in names if osd.osdmap.pg_for(n) == pg)
        assert [x for x in c.list_pg(pg, page=1) if x.startswith(b"list-")] == in_pg
        # one page by hand: FLAG_MORE when cut
        reply = c.request(Op.LIST, b"", b"", offset=pg, length=1, pg=pg)
        assert len(unpack_names(reply.payload)) == 1
        assert bool(reply.flags & FLAG_MORE) == (len(c.list_pg(pg)) > 1)
        with pytest.raises(OSDStatusError) as info:
            c.request(Op.LIST, offset=10_000, target=0)  # no such pg
        assert info.value.status == Status.EINVAL


def test_get_map_ping_and_refusals(osd: OSDServer) -> None:
    with RawConn(osd.address) as raw:
        raw.send(encode_request(Op.GET_MAP, 1))
        raw.send(encode_request(Op.PING, 2, payload=b"echo me"))
        raw.send(encode_request(Op.READ, 3, "x", pool=99))  # unknown pool
        raw.send(encode_frame(Op.READ, 4, name=b"x", flags=FLAG_REPLY))  # a "reply" as request
        raw.send(encode_request(Op.READ, 5, "", length=1))  # empty name
        got = by_tid(raw.recv_frames(5))
    assert OSDMap.decode(got[1].payload) == osd.osdmap
    assert got[2].payload == b"echo me" and got[2].status == 0
    assert got[3].status == Status.EINVAL
    assert got[4].status == Status.EINVAL
    assert got[5].status == Status.EINVAL


# -- routing ----------------------------------------------------------------------------


def test_requests_sent_to_the_wrong_shard_hop_to_the_owner(osd: OSDServer) -> None:
    assert osd.osdmap is not None
    names = names_on(osd, 1, 20, "hop")
    with Client(*osd.address) as c:
        for n in names:
            c.put(n, n.encode() * 3)
    before = osd.stats()
    with Client(*osd.address, route="shared") as shared:
        # force shard 0's own port: every request must cross to shard 1
        shared.address = osd.osdmap.addr_of(0)
        shared.close()
        assert shared.read_many(names) == [n.encode() * 3 for n in names]
    after = osd.stats()
    assert after[0]["hops_out"] - before[0]["hops_out"] == len(names)
    assert after[1]["hops_in"] - before[1]["hops_in"] == len(names)


def test_direct_client_never_hops(osd: OSDServer) -> None:
    names = [f"direct-{i}" for i in range(50)]

    async def body() -> None:
        async with await AsyncClient.connect(*osd.address) as c:
            await asyncio.gather(*(c.put(n, n.encode()) for n in names))
            before = osd.total_stats()["hops_out"]
            got = await asyncio.gather(*(c.read(n) for n in names))
            assert got == [n.encode() for n in names]
            assert osd.total_stats()["hops_out"] == before

    run(body())


# -- pipelining, ordering, backpressure ----------------------------------------------------


def test_pipelined_replies_come_back_out_of_order(osd: OSDServer) -> None:
    """A slow write (fsynced) queued before fast requests is answered after them."""
    big = os.urandom(4 << 20)
    with RawConn(osd.address) as raw:
        frames = [encode_request(Op.PUT, 1, "ooo-big", big)]
        frames += [encode_request(Op.PING, tid, payload=b"p") for tid in range(2, 40)]
        raw.send(b"".join(frames))
        replies = raw.recv_frames(39)
    order = [r.tid for r in replies]
    assert sorted(order) == list(range(1, 40))
    assert order[0] != 1, "a fast reply should overtake the fsynced 4 MiB PUT"
    assert by_tid(replies)[1].status == 0 and by_tid(replies)[1].length == len(big)


def test_many_requests_in_flight_on_one_connection(osd: OSDServer) -> None:
    """More requests than max_inflight: the server pauses reading, then answers all.

    Reads that hop to the other shard stay in flight until the reply crosses
    back (a cached read on the owning shard would complete at once).
    """
    assert osd.osdmap is not None
    (name,) = names_on(osd, 1, 1, "pipe")
    data = b"0123456789" * 100
    with Client(*osd.address) as c:
        c.put(name, data)
    pauses = osd.stats()[0]["inflight_pauses"]
    n = 2000
    with RawConn(osd.osdmap.addr_of(0)) as raw:
        raw.send(
            b"".join(
                encode_request(Op.READ, tid, name, offset=tid % 900, length=100)
                for tid in range(1, n + 1)
            )
        )
        got = by_tid(raw.recv_frames(n))
    assert all(got[t].payload == data[t % 900 : t % 900 + 100] for t in range(1, n + 1))
    assert osd.stats()[0]["inflight_pauses"] > pauses


def test_requests_that_hop_count_against_the_limit(osd: OSDServer) -> None:
    """40 pipelined reads, in one socket read, for a shard that is stopped (SIGSTOP):
    at most ``max_inflight`` (16) are sent to it; the rest wait "throttled" on the
    accepting shard, and all are answered once it runs again. (No quota on the
    accepting shard: one stack takes the whole lane, so only the limit check after
    each hop holds the rest back.)"""
    assert osd.osdmap is not None and osd.group is not None
    (name,) = names_on(osd, 1, 1, "hop-limit")
    with Client(*osd.address) as c:
        c.put(name, b"far")
    with shard_tame_config(osd, quota=None), RawConn(osd.osdmap.addr_of(0)) as raw:
        os.kill(osd.shard_pids[1], signal.SIGSTOP)
        try:
            raw.send(b"".join(encode_request(Op.READ, t, name, length=3) for t in range(1, 41)))
            deadline = time.monotonic() + 10
            stages: list[str] = []
            while len(stages) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
                stages = [d["stage"] for d in osd.dump_ops_in_flight(timeout=0.5)[0] or []]
            sent = [s for s in stages if s.startswith("sent to shard 1")]
            assert len(stages) == 40 and len(sent) == 16, stages
        finally:
            os.kill(osd.shard_pids[1], signal.SIGCONT)
        got = by_tid(raw.recv_frames(40))
    assert all(got[t].payload == b"far" for t in range(1, 41))


def test_slow_reader_does_not_grow_server_memory(osd: OSDServer) -> None:
    """A client that sends 400 reads of 1 MiB and reads nothing: the server stops reading."""
    obj = os.urandom(1 << 20)
    with Client(*osd.address) as c:
        c.put("slow-reader", obj)
        assert osd.osdmap is not None
        shard = osd.osdmap.shard_for("slow-reader")
        addr = osd.osdmap.addr_of(shard)
    pid = osd.shard_pids[shard]
    before_pauses = osd.stats()[shard]["write_pauses"]
    rss0 = rss_kib(pid)
    n = 400  # 400 MiB of replies if the server buffered them all
    with RawConn(addr, timeout=30) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        req = b"".join(
            encode_request(Op.READ, t, "slow-reader", length=1 << 20) for t in range(1, n + 1)
        )
        raw.sock.settimeout(5)
        sent = 0
        try:
            while sent < len(req):  # the server stops reading: this stalls, as it should
                sent += raw.sock.send(req[sent:])
        except TimeoutError:
            pass
        time.sleep(1.0)
        grown = rss_kib(pid) - rss0
        assert osd.stats()[shard]["write_pauses"] > before_pauses
        assert grown < 96 * 1024, f"shard RSS grew {grown} KiB for an unread 400 MiB"
        # now read: everything that was sent is answered, correctly
        raw.sock.settimeout(30)
        sender = None
        if sent < len(req):
            sender = threading.Thread(target=raw.sock.sendall, args=(req[sent:],))
            sender.start()
        replies = raw.recv_frames(n)
        if sender is not None:
            sender.join()
        assert all(r.payload == obj for r in replies)


# -- limits and configuration --------------------------------------------------------------


def test_connection_limit_closes_extra_connections(tmp_path) -> None:  # noqa: ANN001
    with OSDServer(tmp_path, shards=1, backend="thread", limits=Limits(max_connections=3)) as small:
        conns = [RawConn(small.address) for _ in range(3)]
        try:
            for i, conn in enumerate(conns):
                conn.send(encode_request(Op.PING, i))
                conn.recv_frames(1)
            with RawConn(small.address, timeout=5) as extra:
                frames, closed = extra.read_until_close()
                assert closed and not frames
            assert small.total_stats()["connections_refused"] == 1
        finally:
            for conn in conns:
                conn.close()


def test_restart_with_another_shard_count_is_refused(tmp_path) -> None:  # noqa: ANN001
    with OSDServer(tmp_path, shards=1, backend="thread") as first, Client(*first.address) as c:
        c.put("kept", b"data")
    with pytest.raises(OSDConfigError, match="--shards 1"):
        OSDServer(tmp_path, shards=2, backend="thread").start()
    with OSDServer(tmp_path, shards=1, backend="thread") as again, Client(*again.address) as c:
        assert c.get("kept") == b"data"


def test_client_errors_are_specific(osd: OSDServer) -> None:
    with pytest.raises(OSDConnectionError):
        Client("127.0.0.1", free_port(), connect_timeout=2)

    # A listener that never accepts: the kernel completes the handshake and queues the
    # connection, so a client connects, sends, and never hears back. (An asyncio server
    # whose callback drops its StreamWriter is not that: from Python 3.13 the protocol
    # no longer keeps the writer alive, and its __del__ closes the connection.)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]

        async def body() -> None:
            c = AsyncClient("127.0.0.1", port, timeout=0.3)
            with pytest.raises(OSDTimeout):
                await c.refresh_map()
            await c.close()

        run(body())
        with pytest.raises(OSDTimeout):
            Client("127.0.0.1", port, timeout=0.3)


def test_metrics_endpoint_has_the_osd_series(osd: OSDServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with Client(*osd.address) as c:
        c.put("metrics-obj", b"m")
        c.read("metrics-obj")
    url = f"http://127.0.0.1:{osd.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "shardio_osd_ops" in families
    reads = [
        s
        for s in families["shardio_osd_ops"].samples
        if s.labels["op"] == "read" and s.labels["status"] == "OK"
    ]
    assert reads and sum(s.value for s in reads) >= 1
    assert {s.labels["shard"] for s in families["shardio_osd_connections_accepted"].samples} == {
        "0",
        "1",
    }
    assert "shardio_osd_op_latency_seconds" in families
    assert "shardio_osd_hops" in families


def test_thread_backend_serves_both_routes(tmp_path) -> None:  # noqa: ANN001
    with OSDServer(tmp_path, shards=2, backend="thread") as t:

        async def body() -> None:
            async with (
                await AsyncClient.connect(*t.address) as d,
                await AsyncClient.connect(*t.address, route="shared") as s,
            ):
                await asyncio.gather(*(d.put(f"t{i}", bytes([i]) * 100) for i in range(100)))
                assert await asyncio.gather(*(s.get(f"t{i}") for i in range(100))) == [
                    bytes([i]) * 100 for i in range(100)
                ]
                st = await s.stat("t5")
                assert st.size == 100
                reply = await s.request(Op.STAT, "t5")
                assert unpack_stat(reply.payload) == (100, st.version)

        run(body())
