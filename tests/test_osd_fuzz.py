"""Fuzz the OSD with bad bytes while a correct client keeps verifying reads.

More than 10,000 malformed frames: wrong body and header CRCs, unknown ops,
flags and versions, oversized and lying lengths, truncated frames followed by
a half-close, random bytes, random single-byte mutations of valid frames.
Every one must get an error reply (with its tid, when the header could be
trusted) or a close -- never a hang; the stream must stay in sync after the
non-fatal ones; a correct client reading and verifying objects through both
routes sees no error the whole time; and the shard processes' memory stays
bounded.
"""

from __future__ import annotations

import asyncio
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from osd_helpers import rss_kib

from shardio.osd.client import Client
from shardio.osd.loadgen import content
from shardio.osd.protocol import (
    MAGIC,
    MAX_NAME,
    MAX_PAYLOAD,
    VERSION,
    FrameDecoder,
    FrameError,
    Op,
    Status,
    UnknownOp,
    encode_request,
)
from shardio.osd.server import OSDServer

_HDR = struct.Struct("<IBBHQiIHHQQII")
_U32 = struct.Struct("<I")
HEADER = _HDR.size + 4
SEED = 20260411
OBJECTS = 200
OBJ_SIZE = 3000


def craft(
    op: int = Op.PING,
    tid: int = 1,
    *,
    name: bytes = b"",
    payload: bytes = b"",
    flags: int = 0,
    pool: int = 0,
    offset: int = 0,
    length: int = 0,
    version: int = VERSION,
    magic: int = MAGIC,
    reserved: int = 0,
    nlen: int | None = None,
    plen: int | None = None,
    body_crc_delta: int = 0,
    header_crc_delta: int = 0,
) -> bytes:
    """A frame with any header field set, CRCs correct unless told otherwise."""
    nlen = len(name) if nlen is None else nlen
    plen = len(payload) if plen is None else plen
    bcrc = (zlib.crc32(payload, zlib.crc32(name)) + body_crc_delta) & 0xFFFFFFFF
    hdr = _HDR.pack(
        magic, version, op, flags, tid, 0, pool, nlen, reserved, offset, length, plen, bcrc
    )
    return hdr + _U32.pack((zlib.crc32(hdr) + header_crc_delta) & 0xFFFFFFFF) + name + payload


@dataclass
class Case:
    """Bytes for one connection and what the server must do with them."""

    data: bytes
    replies: dict[int, int]  # tid -> expected status (exactly these replies)
    close: bool  # the server must close the connection
    half_close: bool = False  # the client shuts down its sending side after the data
    malformed: int = 0  # malformed frames in data (for the >= 10,000 count)
    invalid: int = 0  # well-formed requests the server must refuse (not counted as malformed)


def nonfatal_batch(rnd: random.Random, first_tid: int, n: int) -> Case:
    """n malformed-but-skippable frames interleaved with PINGs: error replies, stream in sync."""
    parts: list[bytes] = []
    replies: dict[int, int] = {}
    tid = first_tid
    bad = invalid = 0
    for _ in range(n):
        kind = rnd.randrange(6)
        name = rnd.randbytes(rnd.randrange(1, 40))
        payload = rnd.randbytes(rnd.randrange(0, 200))
        if kind == 0:  # body checksum wrong
            parts.append(craft(Op.READ, tid, name=name, payload=payload, body_crc_delta=1))
            replies[tid] = Status.EBADMSG
        elif kind == 1:  # unknown op
            parts.append(craft(rnd.randrange(9, 256), tid, name=name))
            replies[tid] = Status.EOPNOTSUPP
        elif kind == 2:  # unknown flags
            parts.append(craft(Op.READ, tid, name=name, flags=rnd.randrange(4, 1 << 16)))
            replies[tid] = Status.EINVAL
        elif kind == 3:  # reserved field set
            parts.append(craft(Op.STAT, tid, name=name, reserved=rnd.randrange(1, 1 << 16)))
            replies[tid] = Status.EINVAL
        elif kind == 4:  # a single flipped bit in the body of a valid frame
            frame = bytearray(craft(Op.WRITE, tid, name=name, payload=payload or b"x"))
            pos = rnd.randrange(HEADER, len(frame))
            frame[pos] ^= 1 << rnd.randrange(8)
            parts.append(bytes(frame))
            replies[tid] = Status.EBADMSG
        else:  # well-formed, semantically bad requests
            invalid += 1
            bad -= 1
            sub = rnd.randrange(4)
            if sub == 0:
                parts.append(craft(Op.READ, tid, name=name, pool=rnd.randrange(1, 1 << 32)))
                replies[tid] = Status.EINVAL  # unknown pool
            elif sub == 1:
                parts.append(craft(Op.LIST, tid, offset=rnd.randrange(10_000, 1 << 63)))
                replies[tid] = Status.EINVAL  # no such pg
            elif sub == 2:
                parts.append(craft(Op.READ, tid, flags=1, name=name))
                replies[tid] = Status.EINVAL  # FLAG_REPLY on a request
            else:
                parts.append(craft(Op.READ, tid, name=b""))
                replies[tid] = Status.EINVAL  # empty name
        bad += 1
        tid += 1
        if rnd.random() < 0.3:  # a valid request between the bad ones: still in sync?
            parts.append(encode_request(Op.PING, tid, payload=b"sync"))
            replies[tid] = Status.OK
            tid += 1
    return Case(b"".join(parts), replies, close=False, malformed=bad, invalid=invalid)


def fatal_case(rnd: random.Random, tid: int) -> Case:
    """One connection ending in a frame the stream cannot survive."""
    kind = rnd.randrange(9)
    name = rnd.randbytes(rnd.randrange(1, 30))
    prefix = b""
    replies: dict[int, int] = {}
    if rnd.random() < 0.3:  # valid requests first: they are answered before the close
        prefix = encode_request(Op.PING, tid + 1, payload=b"before")
        replies[tid + 1] = Status.OK
    if kind == 0:
        data = craft(Op.READ, tid, name=name, version=rnd.choice([0, 2, 3, 255]))
        replies[tid] = Status.EPROTONOSUPPORT
    elif kind == 1:
        data = craft(Op.PUT, tid, name=name, plen=rnd.randrange(MAX_PAYLOAD + 1, 1 << 32))
        replies[tid] = Status.E2BIG
    elif kind == 2:
        data = craft(Op.READ, tid, nlen=rnd.randrange(MAX_NAME + 1, 1 << 16))
        replies[tid] = Status.ENAMETOOLONG
    elif kind == 3:  # header checksum wrong: lengths untrusted, no tid
        data = craft(Op.READ, tid, name=name, header_crc_delta=rnd.randrange(1, 1 << 32))
    elif kind == 4:  # not our protocol
        data = struct.pack("<I", rnd.randrange(1 << 32) ^ MAGIC | 1) + rnd.randbytes(80)
        if data[:4] == struct.pack("<I", MAGIC):
            data = b"GET / HTTP/1.1\r\n\r\n" + data
    elif kind == 5:  # random bytes, then a half-close
        data = rnd.randbytes(rnd.randrange(1, 3000))
        return Case(prefix + data, replies, close=True, half_close=True, malformed=1)
    elif kind == 6:  # a valid frame cut short, then a half-close
        whole = craft(Op.PUT, tid, name=name, payload=rnd.randbytes(rnd.randrange(1, 5000)))
        data = whole[: rnd.randrange(1, len(whole))]
        return Case(prefix + data, replies, close=True, half_close=True, malformed=1)
    elif kind == 7:  # a header announcing 60 MiB that never comes: no allocation, close at EOF
        data = craft(Op.PUT, tid, name=name, plen=60 << 20) + rnd.randbytes(100)
        return Case(prefix + data, replies, close=True, half_close=True, malformed=1)
    else:  # a random byte of the header of a valid frame flipped
        frame = bytearray(craft(Op.READ, tid, name=name, length=10))
        pos = rnd.randrange(HEADER)
        frame[pos] ^= 1 << rnd.randrange(8)
        data = bytes(frame)
        # bytes 0..3: bad magic; 4..55: the header checksum fails: either way, no tid
    return Case(prefix + data, replies, close=True, malformed=1)


def half_closed_valid(rnd: random.Random, tid: int) -> Case:
    """Valid requests, then shutdown(SHUT_WR): every one is answered, then the server closes."""
    n = rnd.randrange(1, 6)
    names = [f"fz-{rnd.randrange(OBJECTS):05d}" for _ in range(n)]
    data = b"".join(
        encode_request(Op.READ, tid + i, nm, length=OBJ_SIZE) for i, nm in enumerate(names)
    )
    return Case(data, {tid + i: Status.OK for i in range(n)}, close=True, half_close=True)


async def run_case(addr: tuple[str, int], case: Case, timeout: float = 15.0) -> str | None:
    """Play one case; return a description of what went wrong, or None."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    except (OSError, TimeoutError) as exc:
        return f"connect failed: {exc!r}"
    decoder = FrameDecoder()
    got: dict[int, int] = {}
    closed = False
    try:
        writer.write(case.data)
        if case.half_close:
            writer.write_eof()
        deadline = time.monotonic() + timeout
        while True:
            if not case.close and len(got) >= len(case.replies):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return f"timed out: {len(got)}/{len(case.replies)} replies, closed={closed}"
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), left)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                return f"timed out: {len(got)}/{len(case.replies)} replies, not closed"
            if not chunk:
                closed = True
                break
            while chunk is not None:
                try:
                    frames = decoder.feed(chunk)
                    chunk = None
                except UnknownOp as exc:
                    # The error reply to an unknown op echoes that op, which this side's
                    # decoder does not know either: it skips the frame and names its tid.
                    frames = exc.frames
                    if exc.tid is not None and case.replies.get(exc.tid) == Status.EOPNOTSUPP:
                        got[exc.tid] = Status.EOPNOTSUPP
                    else:
                        return f"unexpected reply with an unknown op: {exc}"
                    chunk = b""
                except FrameError as exc:
                    return f"the server sent a bad frame: {exc}"
                for f in frames:
                    if not f.is_reply or f.tid in got:
                        return f"unexpected frame {f}"
                    got[f.tid] = f.status
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    if case.close and not closed:
        return "the server did not close the connection"
    if not case.close and closed:
        return "the server closed a connection that should stay open"
    if got != case.replies:
        return f"replies {got} != expected {case.replies}"
    return None


class Verifier(threading.Thread):
    """A correct client reading and verifying objects through both routes, until stopped."""

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(name="osd-fuzz-verifier", daemon=True)
        self.addr = addr
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []

    def run(self) -> None:
        rnd = random.Random(1)
        try:
            with Client(*self.addr) as direct, Client(*self.addr, route="shared") as shared:
                while not self.stop.is_set():
                    c = direct if self.reads % 2 else shared
                    names = [f"fz-{rnd.randrange(OBJECTS):05d}" for _ in range(8)]
                    for name, data in zip(names, c.read_many(names), strict=True):
                        if data != content(name, OBJ_SIZE):
                            self.errors.append(f"{name}: {data!r:.60}")
                    self.reads += len(names)
        except Exception as exc:  # noqa: BLE001 - any failure of the correct client counts
            self.errors.append(repr(exc))


@pytest.fixture(scope="module")
def osd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OSDServer]:
    with OSDServer(tmp_path_factory.mktemp("osd-fuzz"), shards=2) as server:
        with Client(*server.address) as c:
            for i in range(OBJECTS):
                name = f"fz-{i:05d}"
                c.put(name, content(name, OBJ_SIZE))
        yield server


def test_fuzz_bad_frames_while_serving(osd: OSDServer) -> None:
    assert osd.address is not None and osd.osdmap is not None
    rnd = random.Random(SEED)
    targets = [osd.address, *osd.osdmap.addrs]
    pids = osd.shard_pids
    verifier = Verifier(osd.address)
    verifier.start()
    time.sleep(0.3)
    rss_before = [rss_kib(p) for p in pids]

    cases: list[Case] = []
    tid = 1
    for _ in range(20):  # 20 connections x 500 skippable bad frames
        cases.append(nonfatal_batch(rnd, tid, 500))
        tid += 10_000
    for _ in range(2600):
        cases.append(fatal_case(rnd, tid))
        tid += 10
    for _ in range(200):
        cases.append(half_closed_valid(rnd, tid))
        tid += 10
    rnd.shuffle(cases)
    malformed = sum(c.malformed for c in cases)
    assert malformed >= 10_000

    async def play() -> list[str]:
        sem = asyncio.Semaphore(32)
        failures: list[str] = []

        async def one(i: int, case: Case) -> None:
            async with sem:
                err = await run_case(targets[i % len(targets)], case)
            if err is not None:
                failures.append(f"case {i} ({len(case.data)} bytes): {err}")

        await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
        return failures

    t0 = time.monotonic()
    failures = asyncio.run(play())
    elapsed = time.monotonic() - t0
    time.sleep(0.3)
    verifier.stop.set()
    verifier.join(timeout=30)
    rss_after = [rss_kib(p) for p in pids]

    assert not failures, f"{len(failures)} cases misbehaved, e.g. {failures[:5]}"
    assert not verifier.errors, verifier.errors[:5]
    assert verifier.reads > 100, "the correct client made too little progress"
    assert all(osd.is_alive(s) for s in range(2))
    grown = [a - b for a, b in zip(rss_after, rss_before, strict=True)]
    assert all(g < 64 * 1024 for g in grown), f"shard RSS grew by {grown} KiB"
    stats = osd.total_stats()
    assert sum(stats["frame_errors"].values()) >= malformed
    assert stats["connections_open"] <= 4  # only the verifier's
    print(
        f"{malformed} malformed frames in {len(cases)} connections, {elapsed:.1f} s; "
        f"verifier read {verifier.reads}; RSS growth {grown} KiB; "
        f"frame errors {stats['frame_errors']}"
    )
