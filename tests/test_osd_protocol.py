"""OSD wire protocol: round trips, every kind of corruption, truncation, limits, fuzz."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from shardio.osd import protocol as p
from shardio.osd.protocol import (
    FLAG_MORE,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_NAME,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    Op,
    Status,
)

_HDR = struct.Struct("<IBBHQiIHHQQII")


def raw_frame(
    *,
    magic: int = p.MAGIC,
    version: int = p.VERSION,
    op: int = Op.READ,
    flags: int = 0,
    tid: int = 1,
    status: int = 0,
    pool: int = 0,
    name: bytes = b"obj",
    reserved: int = 0,
    offset: int = 0,
    length: int = 0,
    payload: bytes = b"",
    name_len: int | None = None,
    payload_len: int | None = None,
) -> bytes:
    """A frame with arbitrary header fields but valid checksums (for semantic checks)."""
    body = name + payload
    hdr = _HDR.pack(
        magic,
        version,
        op,
        flags,
        tid,
        status,
        pool,
        len(name) if name_len is None else name_len,
        reserved,
        offset,
        length,
        len(payload) if payload_len is None else payload_len,
        zlib.crc32(body),
    )
    return hdr + struct.pack("<I", zlib.crc32(hdr)) + body


def sample_frames() -> list[tuple[bytes, Frame]]:
    """Encoded frames of every op, requests and replies, with what they must decode to."""
    out = []
    big = bytes(range(256)) * 300
    cases = [
        (Op.READ, dict(name=b"rbd_data.1234", offset=4096, length=4096)),
        (Op.STAT, dict(name="caf\u00e9", pool=3)),
        (Op.WRITE, dict(name=b"o", offset=1 << 40, payload=big)),
        (Op.PUT, dict(name=b"x" * MAX_NAME, payload=b"hello")),
        (Op.DELETE, dict(name=b"gone")),
        (Op.LIST, dict(offset=17, length=100, payload=b"start-after")),
        (Op.GET_MAP, dict(offset=5)),
        (Op.PING, dict(payload=b"")),
    ]
    tid = 1
    for op, kw in cases:
        tid = tid * 7919 % (1 << 64)
        enc = p.encode_request(op, tid, **kw)
        name = kw.get("name", b"")
        name = name.encode() if isinstance(name, str) else name
        expect = Frame(
            op,
            0,
            tid,
            0,
            kw.get("pool", 0),
            kw.get("offset", 0),
            kw.get("length", 0),
            name,
            kw.get("payload", b""),
        )
        out.append((enc, expect))
    for op, status, payload, flags in [
        (Op.READ, 0, big, 0),
        (Op.READ, Status.ENOENT, b"", 0),
        (Op.STAT, 0, p.pack_stat(123, 9), 0),
        (Op.LIST, 0, p.pack_names([b"a", b"bb"]), FLAG_MORE),
        (Op.READ, Status.EIO, b"", 0),
    ]:
        tid += 1
        enc = p.encode_reply(op, tid, status, payload, offset=1, length=2, flags=flags)
        out.append((enc, Frame(op, flags | FLAG_REPLY, tid, status, 0, 1, 2, b"", payload)))
    return out


# -- round trips --------------------------------------------------------------


def test_round_trip_every_op() -> None:
    for enc, expect in sample_frames():
        frame, used = p.decode_frame(enc)
        assert used == len(enc)
        assert frame == expect
        assert frame.is_reply == bool(expect.flags & FLAG_REPLY)
        assert FrameDecoder().feed(enc) == [expect]


def test_header_layout_is_fixed() -> None:
    assert HEADER_SIZE == 56
    enc = p.encode_request(Op.READ, 5, b"abc", offset=1, length=2)
    assert enc[:4] == b"SSIO"
    assert len(enc) == HEADER_SIZE + 3


def test_stream_split_at_every_byte() -> None:
    frames = sample_frames()
    stream = b"".join(enc for enc, _ in frames)
    expect = [f for _, f in frames]
    # one byte at a time
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == expect
    assert dec.buffered == 0
    dec.eof()
    # every two-way split of a small stream
    small = b"".join(enc for enc, _ in frames if len(enc) < 200)
    small_expect = [f for enc, f in frames if len(enc) < 200]
    for cut in range(len(small) + 1):
        dec = FrameDecoder()
        assert dec.feed(small[:cut]) + dec.feed(small[cut:]) == small_expect


def test_feed_accepts_bytearray_and_memoryview() -> None:
    enc, expect = sample_frames()[2]
    dec = FrameDecoder()
    buf = bytearray(enc)
    assert dec.feed(buf[:100]) == []
    assert dec.feed(memoryview(buf)[100:]) == [expect]
    # the decoder must not keep views into a buffer the caller reuses
    buf2 = bytearray(enc + enc[:50])
    assert dec.feed(buf2) == [expect]
    tail = bytes(buf2[len(enc) :])
    buf2[:] = b"\0" * len(buf2)
    assert dec.feed(enc[50:]) == [expect]
    assert tail == enc[:50]


def test_encode_parts_and_limits() -> None:
    head, body = p.encode_frame_parts(Op.PUT, 1, name=b"n", payload=b"data")
    assert head + body == p.encode_request(Op.PUT, 1, b"n", b"data")
    with pytest.raises(p.NameTooLong):
        p.encode_request(Op.READ, 1, b"n" * (MAX_NAME + 1))
    big = memoryview(bytearray(MAX_PAYLOAD + 1))
    with pytest.raises(p.FrameTooLarge):
        p.encode_request(Op.PUT, 1, b"n", big)
    with pytest.raises(ValueError, match="out of range"):
        p.encode_request(Op.READ, -1, b"n")
    with pytest.raises(ValueError, match="out of range"):
        p.encode_request(Op.READ, 1, b"n", offset=1 << 64)


# -- corruption -----------------------------------------------------------------


@pytest.mark.parametrize("idx", range(len(sample_frames())))
def test_every_single_byte_flip_is_detected(idx: int) -> None:
    enc, expect = sample_frames()[idx]
    rng = random.Random(idx)
    positions = (
        range(len(enc))
        if len(enc) <= 4200
        else sorted(
            set(range(HEADER_SIZE + 64)) | set(rng.sample(range(len(enc)), 2000)) | {len(enc) - 1}
        )
    )
    for pos in positions:
        for mask in (0x01, 0x80, 0xFF, rng.randrange(1, 256)):
            bad = bytearray(enc)
            bad[pos] ^= mask
            with pytest.raises(p.FrameError) as info:
                p.decode_frame(bytes(bad))
            err = info.value
            if pos < 4:
                assert isinstance(err, p.BadMagic)
            elif pos < HEADER_SIZE:
                assert isinstance(err, p.BadHeaderChecksum) and err.fatal
            else:
                assert type(err) is p.BadChecksum and not err.fatal
                assert err.tid == expect.tid
            # the incremental decoder detects it from the same bytes, without waiting
            dec = FrameDecoder()
            with pytest.raises(p.FrameError) as info2:
                dec.feed(bytes(bad))
            assert type(info2.value) is type(err)


def test_body_corruption_skips_only_that_frame() -> None:
    a = p.encode_request(Op.READ, 1, b"a")
    b = bytearray(p.encode_request(Op.PUT, 2, b"b", b"payload"))
    b[-1] ^= 0x10
    c = p.encode_request(Op.STAT, 3, b"c")
    dec = FrameDecoder()
    with pytest.raises(p.BadChecksum) as info:
        dec.feed(a + bytes(b) + c)
    assert not info.value.fatal
    assert info.value.tid == 2 and info.value.op == Op.PUT
    assert info.value.status == Status.EBADMSG
    assert [f.tid for f in info.value.frames] == [1]
    assert [f.tid for f in dec.feed(b"")] == [3]


def test_errors_pickle_with_their_fields() -> None:
    import pickle

    from shardio.errors import ShardioError

    err = p.BadChecksum("bad", tid=5, op=Op.READ)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is p.BadChecksum and isinstance(back, ShardioError)
    assert (str(back), back.tid, back.op, back.fatal) == ("bad", 5, Op.READ, False)


def test_fatal_error_poisons_decoder() -> None:
    dec = FrameDecoder()
    a = p.encode_request(Op.READ, 1, b"a")
    with pytest.raises(p.BadMagic) as info:
        dec.feed(a + b"GARBAGE-GARBAGE-GARBAGE" + a)
    assert [f.tid for f in info.value.frames] == [1]
    assert dec.buffered == 0
    with pytest.raises(p.BadMagic) as again:
        dec.feed(a)
    assert again.value.frames == []  # frames are handed out once


def test_garbage_detected_after_four_bytes() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"SSI") == []
    with pytest.raises(p.BadMagic):
        dec.feed(b"X")
    with pytest.raises(p.BadMagic):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")


def test_unknown_op_flags_reserved_are_recoverable() -> None:
    good = p.encode_request(Op.PING, 9)
    for frame, exc_type, status in [
        (raw_frame(op=200, tid=5), p.UnknownOp, Status.EOPNOTSUPP),
        (raw_frame(flags=0x8000, tid=5), p.MalformedFrame, Status.EINVAL),
        (raw_frame(reserved=1, tid=5), p.MalformedFrame, Status.EINVAL),
    ]:
        dec = FrameDecoder()
        with pytest.raises(exc_type) as info:
            dec.feed(frame + good)
        assert not info.value.fatal and info.value.tid == 5 and info.value.status == status
        assert [f.tid for f in dec.feed(b"")] == [9]


def test_unsupported_version_is_fatal() -> None:
    with pytest.raises(p.UnsupportedVersion) as info:
        FrameDecoder().feed(raw_frame(version=2, tid=77))
    assert info.value.fatal and info.value.tid == 77
    assert info.value.status == Status.EPROTONOSUPPORT


def test_oversized_lengths_refused_from_the_header_alone() -> None:
    # Only the 56-byte header is sent: the decoder must refuse at once,
    # neither waiting for 64 MiB nor allocating it.
    hdr = raw_frame(name=b"", payload=b"", payload_len=MAX_PAYLOAD + 1, tid=4)[:HEADER_SIZE]
    dec = FrameDecoder()
    with pytest.raises(p.FrameTooLarge) as info:
        dec.feed(hdr)
    assert info.value.fatal and info.value.tid == 4 and info.value.status == Status.E2BIG
    assert dec.buffered == 0

    hdr = raw_frame(name=b"", name_len=MAX_NAME + 1, tid=6)[:HEADER_SIZE]
    with pytest.raises(p.NameTooLong) as info2:
        FrameDecoder().feed(hdr)
    assert info2.value.tid == 6 and info2.value.status == Status.ENAMETOOLONG

    # the largest legal header is accepted and waited for
    hdr = raw_frame(name=b"", payload=b"", payload_len=MAX_PAYLOAD)[:HEADER_SIZE]
    dec = FrameDecoder()
    assert dec.feed(hdr) == []
    assert dec.buffered == HEADER_SIZE
    # a decoder with smaller limits refuses the same header
    with pytest.raises(p.FrameTooLarge):
        FrameDecoder(max_payload=1 << 20).feed(hdr)


def test_max_payload_round_trip() -> None:
    payload = bytes(MAX_PAYLOAD)
    enc = p.encode_request(Op.PUT, 1, b"big", payload)
    dec = FrameDecoder()
    frames: list[Frame] = []
    for i in range(0, len(enc), 1 << 20):
        frames += dec.feed(enc[i : i + (1 << 20)])
    assert len(frames) == 1 and len(frames[0].payload) == MAX_PAYLOAD
    assert dec.buffered == 0


# -- truncation -----------------------------------------------------------------


def test_truncation() -> None:
    for enc, _ in sample_frames():
        cuts = range(len(enc)) if len(enc) < 300 else [0, 1, 4, 55, 56, 57, len(enc) - 1]
        for cut in cuts:
            with pytest.raises(p.Truncated):
                p.decode_frame(enc[:cut])
            dec = FrameDecoder()
            assert dec.feed(enc[:cut]) == []
            assert dec.buffered == cut
            if cut:
                with pytest.raises(p.Truncated) as info:
                    dec.eof()
                assert info.value.fatal
            else:
                dec.eof()


# -- payload structures --------------------------------------------------------------


def test_stat_and_names_payloads() -> None:
    assert p.unpack_stat(p.pack_stat(1 << 40, 7)) == (1 << 40, 7)
    with pytest.raises(p.MalformedPayload):
        p.unpack_stat(b"short")
    names = [b"", b"a", "\u00e9t\u00e9".encode(), b"x" * MAX_NAME]
    packed = p.pack_names(names)
    assert p.unpack_names(packed) == names
    assert p.unpack_names(bytearray(packed)) == names
    assert p.unpack_names(b"") == []
    for cut in range(1, len(packed)):
        if cut in (2, 5, 5 + 2 + len(names[2])):
            continue  # cuts that fall on an entry boundary are valid lists
        with pytest.raises(p.MalformedPayload):
            p.unpack_names(packed[:cut])
    with pytest.raises(p.MalformedPayload):
        p.unpack_names(struct.pack("<H", MAX_NAME + 1) + b"x" * (MAX_NAME + 1))
    with pytest.raises(p.NameTooLong):
        p.pack_names([b"x" * (MAX_NAME + 1)])


# -- fuzz -------------------------------------------------------------------


def random_frame(rng: random.Random) -> tuple[bytes, Frame]:
    op = rng.choice(list(Op))
    tid = rng.getrandbits(64)
    name = rng.randbytes(rng.choice([0, 1, 10, 200]))
    payload = rng.randbytes(rng.choice([0, 1, 100, 4096, 70000]))
    pool = rng.getrandbits(32)
    offset = rng.getrandbits(64)
    length = rng.getrandbits(64)
    if rng.random() < 0.5:
        status = rng.choice(list(Status))
        flags = FLAG_REPLY | (FLAG_MORE if rng.random() < 0.3 else 0)
    else:
        status, flags = 0, 0
    enc = p.encode_frame(
        op,
        tid,
        name=name,
        payload=payload,
        status=status,
        pool=pool,
        offset=offset,
        length=length,
        flags=flags,
    )
    return enc, Frame(op, flags, tid, status, pool, offset, length, name, payload)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 3, 56, 100, 1000, 65536])
        out.append(data[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_valid_streams_in_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(30):
        frames = [random_frame(rng) for _ in range(rng.randint(1, 12))]
        stream = b"".join(enc for enc, _ in frames)
        dec = FrameDecoder()
        got: list[Frame] = []
        for chunk in chunks(rng, stream):
            got += dec.feed(chunk)
        assert got == [f for _, f in frames]
        dec.eof()


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_mutated_streams_never_misparse(seed: int) -> None:
    """Random flips, cuts, insertions and garbage: every frame the decoder
    returns is one that was sent, intact; everything else raises FrameError."""
    rng = random.Random(1000 + seed)
    for _ in range(300):
        frames = [random_frame(rng) for _ in range(rng.randint(1, 5))]
        sent = {f for _, f in frames}
        stream = bytearray(b"".join(enc for enc, _ in frames))
        kind = rng.randrange(5)
        if kind == 0:  # flip a few bytes
            for _ in range(rng.randint(1, 4)):
                stream[rng.randrange(len(stream))] ^= rng.randrange(1, 256)
        elif kind == 1:  # cut the stream
            del stream[rng.randrange(len(stream)) :]
        elif kind == 2:  # insert random bytes
            at = rng.randrange(len(stream))
            stream[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == 3:  # delete a range
            at = rng.randrange(len(stream))
            del stream[at : at + rng.randint(1, 64)]
        else:  # pure garbage, sometimes starting with the magic
            stream = bytearray(rng.randbytes(rng.randint(1, 300)))
            if rng.random() < 0.5:
                stream[:4] = b"SSIO"
        dec = FrameDecoder()
        got: list[Frame] = []
        for chunk in chunks(rng, bytes(stream)):
            try:
                got += dec.feed(chunk)
            except p.FrameError as exc:
                got += exc.frames
                if exc.fatal:
                    break
                try:
                    got += dec.feed(b"")
                except p.FrameError as exc2:
                    got += exc2.frames
                    if exc2.fatal:
                        break
        else:
            try:
                dec.eof()
            except p.Truncated:
                pass
        for f in got:
            assert f in sent
        assert dec.buffered <= len(stream)


def test_fuzz_random_headers_bounded() -> None:
    """Random 56-byte headers with valid magic and CRC: limits hold, never an allocation."""
    rng = random.Random(7)
    for _ in range(3000):
        name_len = rng.choice([0, 5, MAX_NAME, rng.randrange(1 << 16)])
        payload_len = rng.choice([0, 10, MAX_PAYLOAD, rng.getrandbits(32)])
        hdr = raw_frame(
            version=rng.choice([1, 1, 1, rng.randrange(256)]),
            op=rng.randrange(256),
            flags=rng.choice([0, FLAG_REPLY, rng.randrange(1 << 16)]),
            tid=rng.getrandbits(64),
            name=b"",
            name_len=name_len,
            payload_len=payload_len,
        )[:HEADER_SIZE]
        dec = FrameDecoder()
        try:
            frames = dec.feed(hdr)
            # Only a header that declares no body can be a whole frame on its own.
            assert frames == [] or (name_len == 0 and payload_len == 0)
        except p.FrameError as exc:
            assert isinstance(exc.status, int) and exc.status > 0
        assert dec.buffered <= HEADER_SIZE


def test_an_error_reply_to_an_unknown_op_is_readable():
    """The server echoes an unknown op in its error reply; the client must be able
    to read that reply's status rather than refuse the frame."""
    reply = p.encode_reply(200, 7, status=int(p.Status.EINVAL))
    (frame,) = p.FrameDecoder().feed(reply)
    assert (frame.op, frame.tid, frame.status) == (200, 7, int(p.Status.EINVAL))
    with pytest.raises(p.UnknownOp):
        p.FrameDecoder().feed(p.encode_request(200, 8, b"x"))
