"""OSD map: stable placement, balance, pg -> shard changes, encode/decode and bad input."""

from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
import sys
import zlib
from collections import Counter

import pytest

from shardio.osd.osdmap import (
    MapDecodeError,
    OSDMap,
    OSDMapError,
    Pool,
    UnknownPool,
    object_hash,
)


def test_object_hash_is_crc32_and_golden() -> None:
    # pinned values: placement must never change between releases or processes
    assert object_hash(b"foo") == 0x8C736521
    assert object_hash("foo") == object_hash(b"foo")
    assert object_hash("caf\u00e9") == zlib.crc32("caf\u00e9".encode())
    m = OSDMap.build(2, pg_num=64)
    assert m.pg_for("foo") == 0x8C736521 % 64
    assert m.locate(b"foo") == (m.pg_for("foo"), m.shard_for("foo"))


def test_placement_is_the_same_in_another_process() -> None:
    names = [f"obj-{i}" for i in range(200)]
    here = [OSDMap.build(3, pg_num=128).locate(n) for n in names]
    code = (
        "from shardio.osd.osdmap import OSDMap\n"
        "m = OSDMap.build(3, pg_num=128)\n"
        "print([m.locate(f'obj-{i}') for i in range(200)])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == str(here)


@pytest.mark.parametrize("pg_num", [8, 64, 100, 128])
def test_balance(pg_num: int) -> None:
    m = OSDMap.build(2, pg_num=pg_num)
    names = [f"rbd_data.{i:016x}" for i in range(20000)]
    pgs = Counter(m.pg_for(n) for n in names)
    expect = len(names) / pg_num
    assert set(pgs) == set(range(pg_num))
    assert max(pgs.values()) < expect * 1.5 and min(pgs.values()) > expect * 0.5
    shards = Counter(m.shard_for(n) for n in names)
    assert abs(shards[0] - shards[1]) < len(names) * 0.1


def test_tables_and_pgs_of_shard() -> None:
    m = OSDMap.build(3, pools=[Pool(0, "data", 10), Pool(7, "meta", 4)], addrs=[("h", 1)] * 3)
    assert m.pg_shards[0] == tuple(pg % 3 for pg in range(10))
    assert m.pg_shards[7] == tuple((pg + 7) % 3 for pg in range(4))
    assert sorted(m.pgs_of_shard(0) + m.pgs_of_shard(1) + m.pgs_of_shard(2)) == list(range(10))
    assert m.shard_of_pg(4) == 1
    assert m.addr_of(2) == ("h", 1)
    for name in ("a", "b", "c"):
        pg, shard = m.locate(name, pool=7)
        assert m.pg_shards[7][pg] == shard


def test_remap_bumps_epoch() -> None:
    m = OSDMap.build(2, pg_num=8)
    name = "some-object"
    pg, shard = m.locate(name)
    m2 = m.with_pg_shard(0, pg, 1 - shard)
    assert m2.epoch == m.epoch + 1
    assert m2.shard_for(name) == 1 - shard
    assert m.shard_for(name) == shard  # maps are immutable values
    m3 = m2.with_addrs([("127.0.0.1", 6800), ("127.0.0.1", 6801)])
    assert m3.epoch == m2.epoch + 1 and m3.addr_of(1) == ("127.0.0.1", 6801)
    with pytest.raises(OSDMapError):
        m.with_pg_shard(0, 8, 0)
    with pytest.raises(OSDMapError):
        m.with_pg_shard(0, 0, 2)


def test_validation() -> None:
    with pytest.raises(OSDMapError, match="shard_count"):
        OSDMap.build(0)
    with pytest.raises(OSDMapError, match="pg_num"):
        OSDMap.build(2, pg_num=0)
    with pytest.raises(OSDMapError, match="duplicate"):
        OSDMap.build(2, pools=[Pool(1, "a", 4), Pool(1, "b", 4)])
    with pytest.raises(OSDMapError, match="entries"):
        OSDMap(1, 2, [Pool(0, "a", 4)], {0: [0, 1]})
    with pytest.raises(OSDMapError, match="out of range"):
        OSDMap(1, 2, [Pool(0, "a", 2)], {0: [0, 5]})
    with pytest.raises(OSDMapError, match="addresses"):
        OSDMap.build(2, addrs=[("h", 1)])
    with pytest.raises(OSDMapError, match="no shard addresses"):
        OSDMap.build(2).addr_of(0)
    m = OSDMap.build(2)
    with pytest.raises(UnknownPool, match="pool 3") as info:
        m.shard_for("x", pool=3)
    assert isinstance(info.value, KeyError)
    for fn in (m.pg_for, m.locate):
        with pytest.raises(UnknownPool):
            fn("x", 3)
    with pytest.raises(UnknownPool):
        m.pgs_of_shard(0, pool=3)


def sample_map() -> OSDMap:
    return OSDMap.build(
        4,
        pools=[Pool(0, "data", 64), Pool(2, "caf\u00e9", 5), Pool(9, "x", 1)],
        addrs=[("127.0.0.1", 6800 + s) for s in range(4)],
        epoch=42,
    ).with_pg_shard(2, 3, 0)


def test_encode_decode_round_trip() -> None:
    m = sample_map()
    data = m.encode()
    back = OSDMap.decode(data)
    assert back == m and back.epoch == 43
    assert back.encode() == data
    assert OSDMap.decode(bytearray(data)) == m
    assert OSDMap.decode(memoryview(data)) == m
    assert pickle.loads(pickle.dumps(m)) == m
    assert hash(back) == hash(m)
    names = [f"n{i}" for i in range(500)]
    assert [back.locate(n, 2) for n in names] == [m.locate(n, 2) for n in names]
    assert OSDMap.decode(OSDMap.build(1).encode()) == OSDMap.build(1)


def test_decode_detects_every_byte_flip_and_cut() -> None:
    data = sample_map().encode()
    rng = random.Random(3)
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= rng.randrange(1, 256)
        with pytest.raises(MapDecodeError):
            OSDMap.decode(bytes(bad))
    for cut in range(len(data)):
        with pytest.raises(MapDecodeError):
            OSDMap.decode(data[:cut])
    with pytest.raises(MapDecodeError):
        OSDMap.decode(data + b"\0")


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_decode_refuses_lying_counts_before_allocating() -> None:
    head = struct.Struct("<IBxxxQIII")
    magic = 0x50414D4F
    # a pool claiming 65536 pgs with no table bytes behind it
    body = head.pack(magic, 1, 1, 2, 1, 0) + struct.pack("<IIH", 0, 65536, 0)
    with pytest.raises(MapDecodeError, match="truncated"):
        OSDMap.decode(_with_crc(body))
    for shards, pools, addrs in [(0, 0, 0), (5000, 0, 0), (2, 10**6, 0), (2, 0, 10**6)]:
        with pytest.raises(MapDecodeError, match="out of range"):
            OSDMap.decode(_with_crc(head.pack(magic, 1, 1, shards, pools, addrs)))
    with pytest.raises(MapDecodeError, match="version"):
        OSDMap.decode(_with_crc(head.pack(magic, 9, 1, 2, 0, 0)))
    with pytest.raises(MapDecodeError, match="magic"):
        OSDMap.decode(_with_crc(head.pack(1, 1, 1, 2, 0, 0)))
    # a table pointing at a shard that does not exist
    body = head.pack(magic, 1, 1, 2, 1, 0) + struct.pack("<IIH", 0, 2, 0) + struct.pack("<2H", 0, 7)
    with pytest.raises(MapDecodeError, match="invalid osdmap"):
        OSDMap.decode(_with_crc(body))
    rng = random.Random(11)
    for _ in range(2000):
        with pytest.raises(MapDecodeError):
            OSDMap.decode(_with_crc(rng.randbytes(rng.randrange(0, 200))))
