"""The OSD's connection core: batches of requests on tame stacks.

One shard process serves the module (so every request runs locally, on the
shard that accepted it); tests speak raw frames over real sockets and read
the shard's own counters.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from osd_helpers import RawConn, by_tid, rss_kib, shard_tame_config

from shardio import tame
from shardio.osd.client import Client
from shardio.osd.demo import evict_page_cache, fs_type
from shardio.osd.messenger import Limits
from shardio.osd.protocol import Op, Status, encode_request
from shardio.osd.server import OSDServer

BIG = 8 << 20  # written first: its head sits far from the small objects' readahead


@pytest.fixture(scope="module")
def osd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OSDServer]:
    data = tmp_path_factory.mktemp("osd-connection")
    limits = Limits(max_inflight=256, write_high_water=256 << 10)
    with OSDServer(data, shards=1, pg_num=8, limits=limits) as server:
        yield server


def shard_stats(osd: OSDServer) -> dict:
    stats = osd.stats()[0]
    assert stats is not None
    return stats


def test_a_cold_read_half_way_through_a_batch_does_not_hold_up_the_rest(
    osd: OSDServer,
) -> None:
    """Cached reads queued behind a read that misses the page cache are answered first.

    The batch arrives in one socket read. The cold read parks its tame stack
    on io_uring; the requests behind it carry on on another stack in the
    same loop pass, so their replies leave before the cold one's.
    """
    if fs_type(osd.data_dir) == "tmpfs":
        pytest.skip("on tmpfs the page cache is the storage: nothing can be cold")
    big = os.urandom(BIG)
    small = {f"warm-{i}": os.urandom(4096) for i in range(64)}
    with Client(*osd.address) as c:
        c.put("cold-big", big)
        for name, data in small.items():
            c.put(name, data)
    for attempt in range(5):
        evict_page_cache(osd.data_dir)
        with Client(*osd.address) as c:  # warm the small ones again (not the big one's head)
            for name, data in small.items():
                assert c.read(name) == data
        before = shard_stats(osd)["io"]
        names = list(small)
        # (explicit lengths: a read to the end is charged max_read, which would
        # hold most of the batch back in the backlog)
        frames = [encode_request(Op.READ, 1 + i, n, length=4096) for i, n in enumerate(names[:32])]
        frames.append(encode_request(Op.READ, 100, "cold-big", length=4096))
        frames += [
            encode_request(Op.READ, 200 + i, n, length=4096) for i, n in enumerate(names[32:])
        ]
        with RawConn(osd.address) as raw:
            raw.send(b"".join(frames))
            replies = raw.recv_frames(len(frames))
        after = shard_stats(osd)["io"]
        got = by_tid(replies)
        assert got[100].status == Status.OK and got[100].payload == big[:4096]
        for i, name in enumerate(names):
            tid = 1 + i if i < 32 else 200 + i - 32
            assert got[tid].status == Status.OK and got[tid].payload == small[name]
        uring_reads = sum(after.get(k, 0) - before.get(k, 0) for k in ("read_uring", "read_thread"))
        if uring_reads == 0 and attempt < 4:
            continue  # readahead warmed the big object after all: evict and try again
        assert uring_reads >= 1, f"the big object's head was never cold: {after}"
        order = [r.tid for r in replies]
        # The read right behind the cold one ran while it was parked. (Not every one
        # behind it need have: the tame quota may have moved the batch's tail to a
        # later loop turn, by when the cold read could be back.)
        assert order.index(200) < order.index(100), (
            f"the reads behind the cold one waited for it: reply order {order}"
        )
        return


@pytest.mark.parametrize("quota", [tame.DEFAULT_QUOTA, None], ids=["quota", "unbounded"])
def test_a_client_that_pipelines_and_never_reads_is_held_by_backpressure(
    osd: OSDServer, quota: float | None
) -> None:
    """1,000 pipelined 64 KiB reads whose replies are never read: the shard stops reading
    from that client (its memory stays bounded) and keeps serving everyone else.
    Without a quota one stack runs the whole socket read's lane, so only the limit
    check after each flush stops it at the write pause (the bound then is not the
    quota's)."""
    with shard_tame_config(osd, quota=quota):
        hold_a_client_that_never_reads(osd)


def hold_a_client_that_never_reads(osd: OSDServer) -> None:
    obj = os.urandom(64 << 10)
    with Client(*osd.address) as c:
        c.put("never-read", obj)
    pid = osd.shard_pids[0]
    pauses = shard_stats(osd)["write_pauses"]
    rss0 = rss_kib(pid)
    request = b"".join(encode_request(Op.READ, t, "never-read") for t in range(1, 1001))
    hog = socket.create_connection(osd.address)
    try:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        hog.sendall(request)  # 1,000 requests are small: they all fit in the socket buffers
        deadline = time.monotonic() + 10
        while shard_stats(osd)["write_pauses"] == pauses and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shard_stats(osd)["write_pauses"] > pauses, "the shard never paused the hog"
        with Client(*osd.address) as c:  # everyone else is still served
            for _ in range(50):
                assert c.read("never-read") == obj
        grown = rss_kib(pid) - rss0
        assert grown < 32 * 1024, f"shard RSS grew {grown} KiB for 62 MiB of unread replies"
    finally:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        hog.close()  # a reset: the replies still queued are dropped
    deadline = time.monotonic() + 10
    while shard_stats(osd)["connections_open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shard_stats(osd)["connections_open"] == 0


def test_a_connection_closed_mid_batch_drops_its_replies_and_nothing_else(
    osd: OSDServer,
) -> None:
    """A client resets its connection while its batch runs (a cold read parked on
    io_uring, many behind it): the shard drops those replies, releases the
    connection, and serves the next client as before."""
    with Client(*osd.address) as c:
        c.put("mid-batch-big", os.urandom(BIG))
        c.put("mid-batch-small", b"s" * 4096)
    dropped = shard_stats(osd)["replies_dropped"]
    for _ in range(20):
        evict_page_cache(osd.data_dir)
        frames = [encode_request(Op.READ, 1, "mid-batch-big", offset=BIG - 4096, length=4096)]
        frames += [encode_request(Op.READ, t, "mid-batch-small") for t in range(2, 200)]
        sock = socket.create_connection(osd.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"".join(frames))
        sock.close()
    deadline = time.monotonic() + 10
    while shard_stats(osd)["connections_open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = shard_stats(osd)
    assert stats["connections_open"] == 0
    assert stats["replies_dropped"] > dropped, "no reply was ever dropped: nothing ran mid-batch"
    with Client(*osd.address) as c:
        assert c.read("mid-batch-small") == b"s" * 4096
    assert glob.glob(os.path.join(osd.data_dir, "shard-0", "seg-*.log"))


def test_waiting_requests_are_dumped_with_their_stage(tmp_path) -> None:  # noqa: ANN001
    """Ceph's dump_ops_in_flight: a request whose owning shard is stopped (SIGSTOP)
    waits "sent to shard 1"; requests of a client that reads no replies wait
    "throttled"; both are listed with their age, and leave the list when done."""
    limits = Limits(max_inflight=4, write_high_water=64 << 10)
    with OSDServer(tmp_path, shards=2, pg_num=16, limits=limits, complaint_seconds=0.2) as osd:
        assert osd.osdmap is not None
        name = next(f"far-{i}" for i in range(1000) if osd.osdmap.shard_for(f"far-{i}") == 1)
        with Client(*osd.address) as c:
            c.put(name, b"far away")
            c.put("near-big", os.urandom(1 << 20))
        near = osd.osdmap.shard_for("near-big")
        os.kill(osd.shard_pids[1], signal.SIGSTOP)
        try:
            with RawConn(osd.osdmap.addr_of(0)) as raw:
                raw.send(encode_request(Op.READ, 7, name))
                time.sleep(0.3)
                # (shard 1 is stopped: each look waits its timeout for that shard's answer)
                dump = osd.dump_ops_in_flight(threshold=0.2, timeout=0.5)[0]
                assert dump is not None
                assert [(d["op"], d["object"], d["tid"]) for d in dump] == [("READ", name, 7)]
                assert dump[0]["stage"] == "sent to shard 1, waiting for its reply"
                assert dump[0]["age_seconds"] >= 0.2
                assert osd.stats(timeout=0.5)[0]["slow_ops"] == 1
            os.kill(osd.shard_pids[1], signal.SIGCONT)
            with RawConn(osd.osdmap.addr_of(0)) as raw:
                raw.send(encode_request(Op.READ, 8, name))
                assert raw.recv_frames(1)[0].payload == b"far away"
        finally:
            os.kill(osd.shard_pids[1], signal.SIGCONT)
        hog = socket.create_connection(osd.osdmap.addr_of(near))
        try:
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
            hog.sendall(b"".join(encode_request(Op.READ, t, "near-big") for t in range(1, 41)))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                dump = osd.dump_ops_in_flight(timeout=2)[near] or []
                if any(d["stage"].startswith("throttled") for d in dump):
                    break
                time.sleep(0.05)
            throttled = [d for d in dump if d["stage"].startswith("throttled")]
            assert throttled and all(d["object"] == "near-big" for d in throttled)
        finally:
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            hog.close()
        deadline = time.monotonic() + 10
        while any(osd.dump_ops_in_flight(timeout=2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert osd.dump_ops_in_flight(timeout=2) == [[], []]


# The request that notices the spent quota finishes first.
QUOTA_BOUND_NS = (tame.DEFAULT_QUOTA + 0.0025) * 1e9


def measure_batch(
    osd: OSDServer, request: bytes, count: int, quota: float | None
) -> tuple[list, dict]:
    """Send ``request`` (``count`` pipelined frames) in one write with shard 0's tame
    quota set to ``quota``; its replies and the tame scheduler's accounting.

    Time the guest kernel charges to whichever thread is running (interrupts; seen: an
    8.4 ms turn in one CI run, never locally under two CPU hogs) can push one run past
    the bound, so a bounded run gets up to three tries. Without the quota every
    try's turn is the whole batch, several times the bound."""
    group = osd.group
    assert group is not None
    with shard_tame_config(osd, quota=quota, account_cpu=True):
        for _try in range(3 if quota is not None else 1):
            group.submit(0, tame.reset_accounting).result(10)
            with RawConn(osd.address) as raw:
                raw.send(request)
                replies = raw.recv_frames(count)
            stats = group.submit(0, tame.stats).result(10)
            if stats["longest_turn_ns"] <= QUOTA_BOUND_NS:
                break
    return replies, stats


@pytest.mark.parametrize("quota", [tame.DEFAULT_QUOTA, None], ids=["quota", "unbounded"])
def test_a_long_batch_yields_to_the_loop_by_the_quota(osd: OSDServer, quota: float | None) -> None:
    """256 pipelined 128 KiB cached reads in one socket read (~25 ms of store work):
    with the quota, no loop turn runs more than the quota of tame work (the
    scheduler's own accounting, in thread CPU time); without it, one turn runs
    the whole batch — the contrast that shows the test can fail."""
    objects = {f"quota-{i}": os.urandom(128 << 10) for i in range(16)}
    with Client(*osd.address) as c:
        for name, data in objects.items():
            c.put(name, data)
            assert c.read(name) == data
    names = list(objects)
    request = b"".join(
        encode_request(Op.READ, t, names[t % 16], length=128 << 10) for t in range(256)
    )
    replies, stats = measure_batch(osd, request, 256, quota)
    assert all(by_tid(replies)[t].payload == objects[names[t % 16]] for t in range(256))
    assert stats["slice_clock"] == "thread_cpu"
    if quota is None:
        assert stats["longest_turn_ns"] > 3 * QUOTA_BOUND_NS, stats
    else:
        assert stats["quota_yields"] > 0, stats
        assert stats["longest_turn_ns"] <= QUOTA_BOUND_NS, stats


@pytest.mark.parametrize("quota", [tame.DEFAULT_QUOTA, None], ids=["quota", "unbounded"])
def test_a_long_batch_without_file_io_yields_by_the_quota(
    osd: OSDServer, quota: float | None
) -> None:
    """4,000 pipelined STATs: no request makes a tamed call (the index is in memory),
    so only the connection core's own quota check between requests can yield;
    with the quota no loop turn runs more than it, without one turn runs them all."""
    with Client(*osd.address) as c:
        c.put("stat-me", b"s")
    request = b"".join(encode_request(Op.STAT, t, "stat-me") for t in range(4000))
    replies, stats = measure_batch(osd, request, 4000, quota)
    assert all(r.status == Status.OK for r in replies)
    if quota is None:
        assert stats["longest_turn_ns"] > 3 * QUOTA_BOUND_NS, stats
    else:
        assert stats["quota_yields"] > 0, stats
        assert stats["longest_turn_ns"] <= QUOTA_BOUND_NS, stats


def test_every_request_of_a_pass_is_counted_once_with_its_latency(osd: OSDServer) -> None:
    """The op counters and latency histograms are written once per pass (per
    op, status and arrival): a pipelined batch with hits, misses and a PING,
    in one socket write, then a second batch, must each add exactly their
    requests, and every latency observation must be a real elapsed time."""
    with Client(*osd.address) as c:
        for i in range(8):
            c.put(f"counted-{i}", b"c" * 512)
    for round_ in range(2):
        before = shard_stats(osd)
        frames = [encode_request(Op.READ, t, f"counted-{t % 8}", length=512) for t in range(40)]
        frames += [encode_request(Op.READ, 100 + t, f"missing-{t}") for t in range(5)]
        frames.append(encode_request(Op.PING, 200, payload=b"p"))
        with RawConn(osd.address) as raw:
            sent = time.perf_counter()
            raw.send(b"".join(frames))
            replies = by_tid(raw.recv_frames(len(frames)))
            round_trip = time.perf_counter() - sent
        assert all(replies[t].status == Status.OK for t in range(40))
        assert all(replies[100 + t].status == Status.ENOENT for t in range(5))
        after = shard_stats(osd)

        added = {
            key: after["ops"].get(key, 0) - before["ops"].get(key, 0)
            for key in ("read/OK", "read/ENOENT", "ping/OK")
        }
        assert added == {"read/OK": 40, "read/ENOENT": 5, "ping/OK": 1}, round_
        hist_before = before["latency"].get("read", {"counts": [0], "sum": 0.0})
        hist_after = after["latency"]["read"]
        assert sum(hist_after["counts"]) - sum(hist_before["counts"]) == 45
        # Elapsed times, not zeros, and each within the client's round trip (a
        # latency measured from the wrong arrival time would exceed it).
        assert 0 < hist_after["sum"] - hist_before["sum"] <= 45 * round_trip
