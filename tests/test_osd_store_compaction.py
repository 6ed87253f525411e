"""Compaction: space of overwritten and deleted objects comes back, nothing else changes.

Disk use is measured as the bytes of the segment files in the directory
(what ``du`` would count, holes aside). Compaction on a tame stack must let
the reactor run: a coroutine on the same loop counts its turns while a
compaction runs (a count, not a time). The crash-safety of compaction is in
test_osd_store_crash.py (its campaigns crash compactions at random points).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from shardio import tame
from shardio.osd.objectstore import InvalidArgument, ObjectStat, ObjectStore
from shardio.tame import Env, posix_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def disk_bytes(d: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, n))
        for n in os.listdir(d)
        if n.startswith("seg-") and n.endswith(".log")
    )


def body_overwrites(env: Env, d: str) -> list[tuple[int, int]]:
    """Overwrite-heavy workload, compacting after each round; (disk, live) per round."""
    rng = random.Random(3)
    n, size = 96, 8192
    model: dict[str, bytes] = {}
    out = []
    with ObjectStore(d, env, segment_size=64 * 1024, sync=False) as s:
        for rnd in range(8):
            for _ in range(2 * n):
                k = f"o{rng.randrange(n)}"
                model[k] = rng.randbytes(rng.randint(size // 2, size))
                s.put(k, model[k])
            for _ in range(n // 8):
                k = f"o{rng.randrange(n)}"
                if k in model:
                    s.delete(k)
                    del model[k]
            before = disk_bytes(d)
            s.compact()
            disk, live = disk_bytes(d), s.stats.live_bytes
            assert live == sum(len(v) for v in model.values())
            assert s.stats.log_bytes == disk
            out.append((disk, live))
            if rnd:
                assert disk < before, "compaction reclaimed nothing"
            for k, v in model.items():
                assert s.read(k) == v
        st = s.stats
        assert st.compaction_bytes_reclaimed > 0 and st.compaction_segments_dropped > 0
        assert st.compaction_runs == 8 and st.compaction_running == 0
    with ObjectStore(d, env) as s:
        assert sorted(n.decode() for n in s.list()) == sorted(model)
        for k, v in model.items():
            assert s.read(k) == v
    return out


@pytest.mark.parametrize("where", ["posix", "tame"])
def test_disk_use_stays_under_twice_the_live_data(tmp_path: Any, where: str) -> None:
    d = str(tmp_path / "s")
    if where == "posix":
        rounds = body_overwrites(posix_env, d)
    else:

        async def main() -> list[tuple[int, int]]:
            return await tame.call(lambda: body_overwrites(tame.env(), d))

        rounds = asyncio.run(main())
    worst = max(disk / live for disk, live in rounds)
    print(f"{where}: disk/live per round: " + " ".join(f"{a / b:.2f}" for a, b in rounds))
    assert worst <= 2.0, rounds


def test_without_compaction_the_log_only_grows(tmp_path: Any) -> None:
    """The baseline the 2x bound is measured against (and proof the workload makes garbage)."""
    rng = random.Random(3)
    with ObjectStore(str(tmp_path), posix_env, segment_size=64 * 1024, sync=False) as s:
        for _ in range(8 * 192):
            s.put(f"o{rng.randrange(96)}", rng.randbytes(rng.randint(4096, 8192)))
        assert disk_bytes(str(tmp_path)) > 5 * s.stats.live_bytes


def test_versions_tombstones_and_holes_survive_compaction(tmp_path: Any) -> None:
    d = str(tmp_path)
    with ObjectStore(d, posix_env, segment_size=8 * 1024) as s:
        s.put("old", b"o" * 5000)
        s.put("gone", b"g" * 5000)
        s.write("sparse", b"end", 6000)  # a hole [0, 6000)
        s.write("patched", b"a" * 3000)
        s.write("patched", b"b" * 10, 100)
        for i in range(12):
            s.put(f"filler{i}", bytes(3000))
        s.delete("gone")
        for i in range(12):
            s.put(f"filler{i}", b"x")  # the old fillers become garbage
        stats = {k: s.stat(k) for k in ("old", "sparse", "patched")}
        result = s.compact(min_garbage=0.0)
        assert result.segments_dropped > 0 and result.objects_moved > 0
        assert {k: s.stat(k) for k in stats} == stats  # same size, same version
        assert not s.exists("gone")
    with ObjectStore(d, posix_env) as s:
        assert {k: s.stat(k) for k in stats} == stats
        assert not s.exists("gone")  # the tombstone outlived the segment it was in
        assert s.read("sparse") == bytes(6000) + b"end"
        assert s.read("patched") == b"a" * 100 + b"b" * 10 + b"a" * 2890
        assert s.read("old") == b"o" * 5000
        assert s.stat("old") == ObjectStat(5000, stats["old"].version)


def test_compact_arguments_are_checked(tmp_path: Any) -> None:
    with ObjectStore(str(tmp_path), posix_env) as s:
        with pytest.raises(InvalidArgument, match="min_garbage"):
            s.compact(min_garbage=1.5)
        with pytest.raises(InvalidArgument, match="max_segments"):
            s.compact(max_segments=-1)


def test_compaction_concurrent_with_writers_and_readers(tmp_path: Any) -> None:
    """Threads overwrite and read while another compacts in a loop: every read is one
    whole version, nothing acknowledged is lost, across a reopen too."""
    d = str(tmp_path)
    s = ObjectStore(d, posix_env, segment_size=32 * 1024)
    keys = [f"k{i}" for i in range(16)]

    def version(k: str, gen: int) -> bytes:
        return (f"{k}:{gen:08d}|".encode() * 700)[: 3000 + 7 * (gen % 50)]

    latest = {k: 0 for k in keys}
    for k in keys:
        s.put(k, version(k, 0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for gen in range(1, 25):
                for k in keys[w::2]:
                    s.put(k, version(k, gen))
                    latest[k] = gen
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                for k in keys:
                    data = s.read(k)
                    gen = int(data.split(b"|", 1)[0].split(b":")[1])
                    assert data == version(k, gen), k
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def compactor() -> None:
        try:
            while not stop.is_set():
                s.compact(min_garbage=0.3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    others = [threading.Thread(target=reader), threading.Thread(target=compactor)]
    for t in writers + others:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in others:
        t.join()
    assert not errors, errors
    assert s.stats.compaction_segments_dropped > 0
    s.close()
    with ObjectStore(d, posix_env) as s2:
        for k in keys:
            assert s2.read(k) == version(k, latest[k])


def test_compaction_on_a_tame_stack_lets_the_reactor_run(tmp_path: Any) -> None:
    """A coroutine on the same loop keeps getting turns while compaction runs."""
    d = str(tmp_path)

    async def main() -> tuple[int, int]:
        def fill() -> ObjectStore:
            s = ObjectStore(d, tame.env(), segment_size=256 * 1024, sync=False)
            rng = random.Random(1)
            for _ in range(3):
                for i in range(400):
                    s.put(f"o{i}", rng.randbytes(6000))
            s.sync()
            return s

        store = await tame.call(fill)
        turns = 0
        done = False

        async def ticker() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = turns
        await tame.call(store.compact, 0.0)
        during = turns - start
        done = True
        await t
        moved = store.stats.compaction_objects_moved
        await tame.call(store.close)
        return during, moved

    during, moved = asyncio.run(main())
    assert moved >= 300
    # the loop ran between every few relocations: at least one turn per 10 objects moved
    assert during >= moved // 10, (during, moved)


# -- the OSD: background compaction, metrics, the compact command --------------------------


def test_osd_compacts_in_the_background_and_by_command(tmp_path: Any) -> None:
    from shardio.osd.client import Client
    from shardio.osd.server import OSDServer

    d = str(tmp_path / "osd")
    osd = OSDServer(
        d, shards=2, backend="process", compaction_interval=0.2, segment_size=256 * 1024
    )
    with osd:
        assert osd.address is not None
        with Client(*osd.address) as c:
            for gen in range(20):
                for i in range(64):
                    c.put(f"o{i}", bytes([gen]) * 4000)
            deadline = time.monotonic() + 60
            while True:  # a generous bound on the promise "in the background, soon"
                totals = osd.total_stats()["store"]
                if totals["compaction_bytes_reclaimed"] > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert totals["compaction_bytes_reclaimed"] > 0, totals
            for i in range(64):
                assert c.get(f"o{i}") == bytes([19]) * 4000
        # while the OSD runs, the offline command refuses to touch its directory
        busy = subprocess.run(
            [sys.executable, "-m", "shardio.osd", "compact", "--data", d],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            timeout=120,
        )
        assert busy.returncode == 1 and "in use by process" in busy.stderr, busy.stderr
    out = subprocess.run(
        [sys.executable, "-m", "shardio.osd", "compact", "--data", d],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "shard-0" in out.stdout and "shard-1" in out.stdout
