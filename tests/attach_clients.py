"""Client processes for the attach tests: run as ``python tests/attach_clients.py MODE PATH ...``.

Each mode is a separate, unrelated process (started with subprocess, not by
the group).  Honest modes use ``shardio.connect``; hostile modes speak the
attach protocol by hand and then abuse what they were given.  Every mode
prints one JSON line with what it saw.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import mmap
import os
import socket
import struct
import sys
import time

import external_functions as ef
from shardio.fabric._ring import Ring

import shardio
from shardio import attach_protocol
from shardio.fabric.endpoint import EndpointLayout
from shardio.fabric.messages import HEADER, REPLY_ERROR, decode_error, encode_request

U64 = struct.Struct("<Q")
U32X2 = struct.Struct("<II")


def report(**values) -> None:
    print(json.dumps(values), flush=True)


# ---------------------------------------------------------------- honest


def calls(path: str) -> None:
    with shardio.connect(path) as client:
        sync = [
            client.submit(shard, ef.echo, "sync", shard, i).result(timeout=30)
            for shard in range(client.shards)
            for i in range(20)
        ]

        async def main():
            return await asyncio.gather(
                *[
                    client.call(shard, ef.echo, "async", shard, i)
                    for shard in range(client.shards)
                    for i in range(20)
                ]
            )

        replies = asyncio.run(main())
        report(
            number=client.number,
            shards=client.shards,
            sync_ok=sync == [("sync", s, i) for s in range(client.shards) for i in range(20)],
            async_ok=replies == [("async", s, i) for s in range(client.shards) for i in range(20)],
        )


def mismatch(path: str, what: str) -> None:
    if what == "protocol":
        attach_protocol.PROTOCOL_VERSION += 1
    else:
        attach_protocol.build_identity = lambda: "shardio 0.0.0; another build"
    try:
        shardio.connect(path)
    except shardio.ProtocolMismatch as error:
        report(error=type(error).__name__, message=str(error))
    else:
        report(error=None)


def refused(path: str) -> None:
    try:
        shardio.connect(path)
    except shardio.AttachError as error:
        report(error=type(error).__name__, message=str(error))
    else:
        report(error=None)


def stream(path: str, stop_file: str, tag: str) -> None:
    """Calls without a pause until ``stop_file`` exists; each reply must be its own."""
    sent = received = wrong = 0
    with shardio.connect(path) as client:
        print(json.dumps({"ready": client.number}), flush=True)
        while not os.path.exists(stop_file):
            futures = [client.submit(i % client.shards, ef.echo, tag, sent + i) for i in range(50)]
            for i, future in enumerate(futures):
                reply = future.result(timeout=60)
                received += 1
                if reply != (tag, sent + i):
                    wrong += 1
            sent += len(futures)
    report(sent=sent, received=received, wrong=wrong)


def churn(path: str, cycles: int) -> None:
    wrong = 0
    numbers = set()
    for cycle in range(cycles):
        with shardio.connect(path) as client:
            numbers.add(client.number)
            for shard in range(client.shards):
                if client.submit(shard, ef.echo, "churn", cycle).result(timeout=30) != (
                    "churn",
                    cycle,
                ):
                    wrong += 1
    report(cycles=cycles, wrong=wrong, numbers=len(numbers))


def slow(path: str, count: int) -> None:
    """Sends slow calls, says so, and waits for them (the test kills it meanwhile)."""
    client = shardio.connect(path)
    futures = [
        client.submit(i % client.shards, ef.slow_echo, ("dead client", i), 0.5)
        for i in range(count)
    ]
    print(json.dumps({"sent": count, "number": client.number}), flush=True)
    for future in futures:
        future.result(timeout=60)
    report(done=True)


def pipelined(path: str, calls_total: int, size: int) -> None:
    """Many calls in flight, results of ``size`` bytes (stopped with SIGSTOP by the test)."""
    with shardio.connect(path) as client:
        print(json.dumps({"ready": client.number}), flush=True)
        futures = [client.submit(0, ef.blob, size) for _ in range(calls_total)]
        good = sum(1 for future in futures if future.result(timeout=120) == b"x" * size)
    report(good=good)


# ---------------------------------------------------------------- hostile


def raw_attach(path: str):
    """The attach handshake by hand: socket, reply, descriptors, layout, mapping."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(attach_protocol.hello())
    data, fds, _flags, _address = socket.recv_fds(sock, attach_protocol.MAX_MESSAGE, 64)
    reply = attach_protocol.decode(data)
    assert reply["type"] == "welcome", reply
    layout = EndpointLayout(reply["shards"], reply["ring_bytes"])
    memory = mmap.mmap(fds[0], layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return sock, reply, fds, layout, memory


def wait_for_link_notice(memory, layout, shard: int, seconds: float = 20.0) -> str | None:
    ring = Ring(memory, layout.from_shard_offset(shard), layout.ring_bytes)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for message in ring.get(64) or []:
                kind, request_id = HEADER.unpack_from(message)
                if kind == REPLY_ERROR and request_id == attach_protocol.LINK_FAILED_REQUEST:
                    return str(decode_error(memoryview(message)[HEADER.size :]))
            time.sleep(0.01)
        return None
    finally:
        ring.close()


def truncate(path: str) -> None:
    sock, reply, fds, layout, memory = raw_attach(path)
    outcome = {}
    for name, attempt in (
        ("shrink", lambda: os.ftruncate(fds[0], 4096)),
        ("grow", lambda: os.ftruncate(fds[0], layout.size * 2)),
        ("seal", lambda: fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)),
    ):
        try:
            attempt()
            outcome[name] = "done"
        except OSError as error:
            outcome[name] = errno.errorcode[error.errno]
    outcome["size"] = os.fstat(fds[0]).st_size
    report(number=reply["endpoint"], **outcome)
    memory.close()
    sock.close()


def corrupt(path: str, how: str) -> None:
    """Write garbage into this client's ring to shard 0, ring shard 0's doorbell."""
    sock, reply, fds, layout, memory = raw_attach(path)
    base = layout.to_shard_offset(0)
    data = base + 192
    if how == "length":  # a record longer than the ring
        U32X2.pack_into(memory, data, 0x7FFFFFF0, 0)
        U64.pack_into(memory, base, 64)
    elif how == "indexes":  # tail far beyond head: more than a ring's worth
        U64.pack_into(memory, base, layout.ring_bytes * 4)
    elif how == "unaligned":
        U32X2.pack_into(memory, data, 4, 0)
        U64.pack_into(memory, base, 13)
    elif how == "oversize":  # fragments of one message larger than max_message_bytes
        ring = Ring(memory, base, layout.ring_bytes)
        payload = b"\0" * (reply["max_message_bytes"] * 3)
        reached = 0
        deadline = time.monotonic() + 20
        while reached < len(payload) and time.monotonic() < deadline:
            reached = ring.put(payload, reached)
            os.eventfd_write(fds[2], 1)
            time.sleep(0.001)
        ring.close()
    os.eventfd_write(fds[2], 1)
    notice = wait_for_link_notice(memory, layout, 0)
    report(number=reply["endpoint"], notice=notice)
    memory.close()
    sock.close()


def flood(path: str, size: int, seconds: float) -> None:
    """Requests into the ring to shard 0 as fast as they fit, replies never read."""
    sock, reply, fds, layout, memory = raw_attach(path)
    ring = Ring(memory, layout.to_shard_offset(0), layout.ring_bytes)
    interned: dict = {}
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        payload = encode_request(sent + 1, ef.blob, (size,), None, "shard 0", interned, 1 << 20)
        reached = 0
        while reached < len(payload) and time.monotonic() < deadline:
            reached = ring.put(payload, reached)
            os.eventfd_write(fds[2], 1)
            if reached < len(payload):
                time.sleep(0.002)
        if reached == len(payload):
            sent += 1
    print(json.dumps({"sent": sent, "number": reply["endpoint"]}), flush=True)
    sys.stdin.readline()  # stays attached, reading nothing, until the test is done
    ring.close()
    memory.close()
    sock.close()


MODES = {
    "calls": calls,
    "mismatch": mismatch,
    "refused": refused,
    "stream": stream,
    "churn": churn,
    "slow": slow,
    "pipelined": pipelined,
    "truncate": truncate,
    "corrupt": corrupt,
    "flood": flood,
}

if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    converted = [
        int(a) if a.isdigit() else float(a) if a.replace(".", "", 1).isdigit() else a
        for a in arguments
    ]
    MODES[mode](*converted)
