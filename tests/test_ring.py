"""The SPSC ring and flags of the C extension, exercised directly."""

from __future__ import annotations

import mmap
import os
import random
import sys
import threading

import pytest

from shardio.fabric import Flag, Ring
from shardio.fabric.mesh import MeshLayout


def make_pair(capacity: int = 4096):
    buffer = mmap.mmap(-1, capacity + 4096)
    return buffer, Ring(buffer, 0, capacity, True), Ring(buffer, 0, capacity)


def drain(reader: Ring) -> list[bytes]:
    out: list[bytes] = []
    while True:
        got = reader.get(1000)
        if got is None:
            return out
        out.extend(bytes(m) for m in got)


def test_messages_come_out_in_order_across_many_wraps():
    _, writer, reader = make_pair(4096)
    rng = random.Random(1)
    sent, received = [], []
    for i in range(20_000):
        message = os.urandom(rng.randint(1, 900)) + i.to_bytes(4, "little")
        position = 0
        while position < len(message):
            position = writer.put(message, position)
            if position < len(message):
                received.extend(drain(reader))
        sent.append(message)
    received.extend(drain(reader))
    assert received == sent


def test_a_message_larger_than_the_ring_crosses_in_fragments():
    _, writer, reader = make_pair(4096)
    message = os.urandom(1 << 20)
    position, received = 0, []
    while position < len(message):
        new = writer.put(message, position)
        assert new > position or reader.ready()
        position = new
        got = reader.get(10)
        assert got is not None
        received.extend(got)
    received.extend(drain(reader))
    assert len(received) == 1 and received[0] == message


def test_get_returns_none_when_empty_and_a_list_otherwise():
    _, writer, reader = make_pair()
    assert reader.get(10) is None and not reader.ready()
    writer.put(b"x")
    assert reader.ready()
    assert reader.get(10) == [b"x"]
    assert reader.get(10) is None


def test_full_ring_and_the_space_handshake():
    _, writer, reader = make_pair(4096)
    chunk = b"y" * 1000
    while writer.put(chunk) == len(chunk):
        pass
    assert reader.take_space_waiter() is False  # nobody waits yet
    assert writer.request_space() is False  # still full: wait to be woken
    assert reader.get(1)
    assert reader.take_space_waiter() is True  # the consumer must wake the producer
    assert reader.take_space_waiter() is False  # ... once
    assert writer.request_space() is True  # space appeared since the last look


def test_space_appearing_while_registering_is_reported():
    """The race that once lost a wake-up: the consumer empties the ring after the
    producer's failed put but before it registers as waiting."""
    _, writer, reader = make_pair(4096)
    chunk = b"z" * 1000
    while writer.put(chunk) != 0:
        pass  # fill until a put makes no progress at all
    drain(reader)
    assert reader.take_space_waiter() is False  # nobody was waiting yet
    assert writer.request_space() is True  # so the producer must retry now


def test_used_and_reset_consumer():
    _, writer, reader = make_pair()
    writer.put(b"a" * 100)
    assert reader.used() >= 100
    reader.reset_consumer()
    assert reader.used() == 0 and reader.get(10) is None


def test_bad_arguments_are_refused():
    buffer = mmap.mmap(-1, 1 << 16)
    with pytest.raises(ValueError, match="power of two"):
        Ring(buffer, 0, 5000)
    with pytest.raises(ValueError, match="multiple of 64"):
        Ring(buffer, 8, 4096)
    with pytest.raises(ValueError, match="does not fit"):
        Ring(buffer, 0, 1 << 16)
    ring = Ring(buffer, 0, 4096, True)
    with pytest.raises(ValueError, match="non-empty"):
        ring.put(b"")
    with pytest.raises(ValueError, match="start"):
        ring.put(b"abc", 3)
    with pytest.raises(TypeError):
        ring.put("text")
    with pytest.raises(BufferError):
        buffer.close()  # the ring still holds the buffer
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.put(b"x")
    with pytest.raises(ValueError, match="closed"):
        ring.get(1)
    buffer.close()  # released by ring.close()


def test_a_corrupt_record_is_reported_not_returned():
    buffer, writer, reader = make_pair(4096)
    writer.put(b"hello")
    buffer[192:196] = (100_000).to_bytes(4, "little")  # the record's length
    with pytest.raises(RuntimeError, match="corrupt ring record"):
        reader.get(1)


def test_flags():
    buffer = mmap.mmap(-1, 4096)
    flag = Flag(buffer, 0)
    other_view = Flag(buffer, 0)
    assert not flag.is_set() and not other_view.test_and_clear()
    flag.set()
    assert other_view.is_set()
    assert other_view.test_and_clear() is True
    assert other_view.test_and_clear() is False and not flag.is_set()
    flag.set()
    flag.clear()
    assert not flag.is_set()
    with pytest.raises(ValueError):
        Flag(buffer, 4094)
    flag.close()
    other_view.close()
    with pytest.raises(ValueError, match="closed"):
        flag.set()


def test_two_threads_hammering_one_ring():
    """Producer and consumer in two threads (the GIL is released nowhere, but they
    interleave at every bytecode boundary): contents and order survive."""
    _, writer, reader = make_pair(8192)
    count = 50_000
    received: list[int] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # two spinning threads: switch often, or this crawls

    def consume():
        while len(received) < count:
            got = reader.get(64)
            if got:
                received.extend(int.from_bytes(m[:4], "little") for m in got)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(count):
        message = i.to_bytes(4, "little") * (1 + i % 50)
        position = 0
        while position < len(message):
            position = writer.put(message, position)
    consumer.join(timeout=60)
    sys.setswitchinterval(interval)
    assert received == list(range(count))


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="power of two"):
        MeshLayout(3, 1000)
    with pytest.raises(ValueError, match="two endpoints"):
        MeshLayout(1, 4096)
    layout = MeshLayout(3, 4096)
    offsets = {layout.ring_offset(i, j) for i in range(3) for j in range(3) if i != j}
    assert len(offsets) == 6 and all(o % 4096 == 0 for o in offsets)
    # No diagonal: the six rings fill the segment exactly.
    assert max(offsets) + layout.ring_stride == layout.size
    with pytest.raises(ValueError, match="no ring from endpoint 1 to endpoint 1"):
        layout.ring_offset(1, 1)


def test_default_ring_size_follows_the_shard_count():
    from shardio.fabric.mesh import default_ring_bytes

    assert default_ring_bytes(3) == 1 << 20
    sizes = [default_ring_bytes(shards + 1) for shards in (1, 2, 8, 16, 32, 64)]
    assert sizes == sorted(sizes, reverse=True)
    for shards in (16, 32):
        layout = MeshLayout(shards + 1, default_ring_bytes(shards + 1))
        assert layout.size <= 256 << 20, (shards, layout.size)
