"""The C frame codec (shardio/osd/_codec.c) against the Python one it accelerates.

The decoder's C loop must accept exactly the frames the Python rules accept
and leave every other one to them (so that each bad frame still raises its
own FrameError); the C reply encoder must produce the Python encoder's bytes.
"""

from __future__ import annotations

import os
import random

import pytest

from shardio.osd import protocol
from shardio.osd.protocol import (
    MAX_PAYLOAD,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    Op,
    encode_frame,
    encode_request,
)

pytestmark = pytest.mark.skipif(protocol._codec is None, reason="the C codec is not built")


def random_frames(rng: random.Random, n: int) -> list[bytes]:
    frames = []
    for _ in range(n):
        reply = rng.random() < 0.2
        frames.append(
            encode_frame(
                rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 200]) if reply else rng.choice(list(Op)),
                rng.randrange(1 << 64),
                name=os.urandom(rng.choice([0, 1, 17, 300])),
                payload=os.urandom(rng.choice([0, 1, 100, 4096, 70000])),
                status=rng.randrange(-(1 << 31), 1 << 31),
                pool=rng.randrange(1 << 32),
                offset=rng.randrange(1 << 64),
                length=rng.randrange(1 << 64),
                flags=(protocol.FLAG_REPLY | rng.choice([0, protocol.FLAG_MORE])) if reply else 0,
            )
        )
    return frames


def decode_all(stream: bytes, chunk: int, *, max_payload: int = MAX_PAYLOAD) -> list[object]:
    """Feed ``stream`` in chunks; the frames and errors, in order (errors by class and
    message), as a connection would see them."""
    decoder = FrameDecoder(max_name=1024, max_payload=max_payload)
    seen: list[object] = []
    for i in range(0, len(stream), chunk):
        data = stream[i : i + chunk]
        while True:
            try:
                seen += decoder.feed(data)
            except FrameError as exc:
                seen += exc.frames
                seen.append((type(exc).__name__, str(exc), exc.tid, exc.op, exc.fatal))
                if exc.fatal:
                    return seen
                data = b""
                continue
            break
    return seen


def test_valid_streams_decode_the_same_in_any_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    frames = random_frames(rng, 200)
    for chunk in (1, 55, 56, 57, 4096, 65536, None):
        count = 20 if chunk in (1, 55) else 200  # (byte by byte: a shorter stream)
        stream = b"".join(frames[:count])
        fast = decode_all(stream, chunk or len(stream))
        with monkeypatch.context() as m:
            m.setattr(protocol, "_parse_valid", None)
            reference = decode_all(stream, chunk or len(stream))
        assert fast == reference and len(fast) == count
        assert all(type(f) is protocol.Frame for f in fast)


def test_every_corrupted_byte_gets_the_error_the_python_rules_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A good frame, one corrupted byte (every byte of the header, some of the body),
    then a good frame: the C loop must stop at the bad one, never accept it."""
    rng = random.Random(5)
    first, bad, last = random_frames(rng, 1)[0], bytearray(encode_request(1, 9, "obj", b"p" * 40)), encode_request(2, 10, "x")  # fmt: skip
    positions = list(range(protocol.HEADER_SIZE)) + list(range(protocol.HEADER_SIZE, len(bad), 7))
    for pos in positions:
        for flip in (0x01, 0x80):
            corrupted = bytearray(bad)
            corrupted[pos] ^= flip
            stream = first + bytes(corrupted) + last
            fast = decode_all(stream, len(stream))
            with monkeypatch.context() as m:
                m.setattr(protocol, "_parse_valid", None)
                reference = decode_all(stream, len(stream))
            assert fast == reference, f"byte {pos} ^ {flip:#x}"
            assert any(isinstance(x, tuple) for x in fast), f"byte {pos} ^ {flip:#x} accepted"


def test_rule_breaking_frames_with_good_checksums_are_left_to_the_python_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames that are intact on the wire but break a rule: an unknown op, unknown
    flags, a long name, a large payload, another version."""
    ok = encode_request(1, 1, "a")
    cases = [
        encode_frame(99, 2, name="a"),  # unknown op (a request)
        encode_frame(1, 3, name="a", flags=0x40),  # unknown flags
        encode_frame(1, 4, name="n" * 2000),  # over this decoder's max_name (1024)
        encode_frame(1, 5, payload=b"p" * 5000),  # over max_payload (4096, below)
    ]
    versioned = bytearray(encode_frame(1, 6, name="a"))
    versioned[4] = 2
    body = bytes(versioned[: protocol.HEADER_SIZE - 4])
    versioned[protocol.HEADER_SIZE - 4 : protocol.HEADER_SIZE] = protocol._U32.pack(
        protocol._crc32(body)
    )
    cases.append(bytes(versioned))
    for case in cases:
        stream = ok + case + ok
        fast = decode_all(stream, len(stream), max_payload=4096)
        with monkeypatch.context() as m:
            m.setattr(protocol, "_parse_valid", None)
            reference = decode_all(stream, len(stream), max_payload=4096)
        assert fast == reference
        assert isinstance(fast[1], tuple), f"accepted: {fast[1]!r}"


def test_replies_encode_to_the_python_encoders_bytes() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        args = (
            rng.randrange(256),
            rng.randrange(1 << 64),
            rng.randrange(-(1 << 31), 1 << 31),
            os.urandom(rng.choice([0, 1, 4096])),
            rng.randrange(1 << 64),
            rng.choice([0, protocol.FLAG_MORE]),
        )
        assert protocol._codec.reply_parts(*args) == protocol._reply_parts_python(*args)
    edges = (255, (1 << 64) - 1, -(1 << 31), b"", (1 << 64) - 1, 0xFFFE)
    assert protocol._codec.reply_parts(*edges) == protocol._reply_parts_python(*edges)
    edges = (0, 0, (1 << 31) - 1, b"x")
    assert protocol._codec.reply_parts(*edges) == protocol._reply_parts_python(*edges)
    for bad in [(256, 1, 0), (1, -1, 0), (1, 1 << 64, 0), (1, 1, 1 << 31), (1, 1, -(1 << 31) - 1),
                (1, 1, 0, b"", -1), (1, 1, 0, b"", 1 << 64), (1, 1, 0, b"", 0, 1 << 16)]:  # fmt: skip
        with pytest.raises(ValueError, match="out of range"):
            protocol._codec.reply_parts(*bad)
        with pytest.raises(ValueError, match="out of range"):
            protocol._reply_parts_python(*bad)
    with pytest.raises(FrameTooLarge, match="exceeds the") as info:
        protocol.encode_reply_parts(1, 77, 0, bytes(MAX_PAYLOAD + 1))
    assert info.value.tid == 77
