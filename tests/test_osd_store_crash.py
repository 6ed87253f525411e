"""Power-loss crash tests of the object store on the CrashSimulatingEnv.

A mixed workload (puts, overwrites, partial writes, deletes, compactions)
runs against a model; the Env crashes at a random mutating operation
(keeping only what fsync covered, sometimes tearing the last unsynced write,
and losing unsynced directory changes); the store is reopened with no help
and must hold exactly the acknowledged state: every acknowledged change
reads back byte for byte, the one change in flight at the crash is wholly
there or wholly absent, nothing else exists. Some crashes hit the reopen
(recovery) itself, some a compaction.

SHARDIO_CRASH_POINTS sets the number of crash points of the main test
(default 1000: a few seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from typing import Any

import pytest

from shardio import tame
from shardio.osd.objectstore import ObjectStore, StoreError
from shardio.tame import Env, posix_env
from shardio.testing import CrashSimulatingEnv, SimulatedCrash

CRASH_POINTS = int(os.environ.get("SHARDIO_CRASH_POINTS", "1000"))
LIVES_PER_STORE = 25  # crashes before a campaign starts over in a fresh directory
KEYS = [f"k{i}".encode() for i in range(10)]


def blob(rng: random.Random, n: int) -> bytes:
    seed = rng.randbytes(16)
    return hashlib.shake_128(seed).digest(n) if n else b""


def verify(store: ObjectStore, model: dict[bytes, bytes], where: str) -> None:
    names = set(store.list())
    assert names == set(model), f"{where}: objects {sorted(names)} != model {sorted(model)}"
    for key, value in model.items():
        got = store.read(key)
        assert got == value, f"{where}: {key!r} reads {len(got)} bytes, model has {len(value)}"


def resolve_in_flight(
    store: ObjectStore, model: dict[bytes, bytes], flight: tuple[bytes, Any, Any], where: str
) -> None:
    """The change in flight at the crash must be wholly there or wholly absent."""
    key, old, new = flight
    now = store.read(key) if store.exists(key) else None
    assert now in (old, new), (
        f"{where}: in-flight change of {key!r} is half-visible: "
        f"{None if now is None else len(now)} bytes, old "
        f"{None if old is None else len(old)}, new {None if new is None else len(new)}"
    )
    if now is None:
        model.pop(key, None)
    else:
        model[key] = now


def one_op(
    model: dict[bytes, bytes], rng: random.Random, compaction: bool
) -> tuple[bytes, Any, Any, tuple[Any, ...]] | None:
    """Pick an op: (key, old, new, call), None for a compaction; new None: deleted."""
    r = rng.random()
    key = rng.choice(KEYS)
    old = model.get(key)
    if compaction and r < 0.08:
        return None
    if r < 0.45 or (old is None and r >= 0.85):
        size = rng.choice((0, 1, 100, 700, 3000, 4096, 4097, 9000, 20000))
        data = blob(rng, size)
        return key, old, data, ("put", data)
    if r < 0.85:  # a partial write: inside, across the end, past it (a hole), or creating
        cur = old or b""
        off = rng.randint(0, len(cur) + 3000)
        data = blob(rng, rng.randint(1, 6000))
        base = cur + bytes(max(0, off - len(cur)))
        return key, old, base[:off] + data + base[off + len(data) :], ("write", data, off)
    return key, old, None, ("delete",)


def apply_op(store: ObjectStore, key: bytes, call: tuple[Any, ...]) -> None:
    if call[0] == "put":
        store.put(key, call[1])
    elif call[0] == "write":
        store.write(key, call[1], call[2])
    else:
        store.delete(key)


def campaign(
    env_inner: Env, root: str, seed: int, points: int, torn: bool, compaction: bool
) -> dict[str, int]:
    """Crash a store ``points`` times at random operations; check every reopen."""
    rng = random.Random(seed)
    counts = {"crashes": 0, "recovery_crashes": 0, "acked": 0, "compactions": 0}
    store_no = 0
    while counts["crashes"] < points:
        store_no += 1
        d = os.path.join(root, f"store-{seed}-{store_no}")
        env = CrashSimulatingEnv(
            env_inner, torn=torn, seed=rng.randrange(1 << 30), sync_to_disk=False
        )
        model: dict[bytes, bytes] = {}
        flight: tuple[bytes, Any, Any] | None = None
        for life in range(LIVES_PER_STORE):
            if counts["crashes"] >= points:
                break
            where = f"seed {seed} store {store_no} life {life}"
            if life and rng.random() < 0.15:  # crash the recovery itself
                env.crash_after(rng.randint(0, 4))
                try:
                    ObjectStore(d, env, segment_size=16 * 1024)
                except (SimulatedCrash, StoreError):
                    counts["crashes"] += 1
                    counts["recovery_crashes"] += 1
                else:
                    env.crash()  # the open completed before the armed point: crash now
                    counts["crashes"] += 1
            env.crash_after(None)
            store = ObjectStore(d, env, segment_size=16 * 1024)
            if flight is not None:
                resolve_in_flight(store, model, flight, where)
                flight = None
            verify(store, model, where)
            env.crash_after(rng.randint(0, 40))
            try:
                while True:
                    op = one_op(model, rng, compaction)
                    if op is None:
                        store.compact(min_garbage=rng.choice((0.0, 0.3, 0.5)))
                        counts["compactions"] += 1
                        continue
                    key, old, new, call = op
                    flight = (key, old, new)
                    apply_op(store, key, call)
                    flight = None
                    if new is None:
                        del model[key]
                    else:
                        model[key] = new
                    counts["acked"] += 1
            except (SimulatedCrash, StoreError):
                counts["crashes"] += 1
        env.crash_after(None)
        store = ObjectStore(d, env, segment_size=16 * 1024)
        if flight is not None:
            resolve_in_flight(store, model, flight, "final")
        verify(store, model, "final")
        store.close()
    return counts


def test_acknowledged_writes_survive_power_loss_at_random_points(tmp_path: Any) -> None:
    """>= 1,000 crash points in total: plain, torn, with compactions; every reopen exact."""
    quarter = max(1, CRASH_POINTS // 4)
    totals: dict[str, int] = {}
    for i, (torn, compaction) in enumerate(
        [(False, False), (True, False), (False, True), (True, True)]
    ):
        c = campaign(posix_env, str(tmp_path), 1000 + i, quarter, torn, compaction)
        for k, v in c.items():
            totals[k] = totals.get(k, 0) + v
    print("crash campaign:", totals)
    assert totals["crashes"] >= 4 * quarter
    assert totals["recovery_crashes"] > 0 and totals["compactions"] > 0
    assert totals["acked"] > totals["crashes"]


def test_crashes_on_tame_stacks_with_compaction(tmp_path: Any) -> None:
    """The same campaign with the store on a tame stack (CrashSimulatingEnv over TameEnv)."""

    async def main() -> dict[str, int]:
        def body() -> dict[str, int]:
            inner = tame.env()
            assert inner.name == "tame"
            return campaign(inner, str(tmp_path), 77, 100, True, True)

        return await tame.call(body)

    counts = asyncio.run(main())
    assert counts["crashes"] >= 100 and counts["compactions"] > 0


# -- the crash env itself -----------------------------------------------------------


def test_crash_env_keeps_only_synced_bytes_and_directory_entries(tmp_path: Any) -> None:
    env = CrashSimulatingEnv(posix_env)
    d = str(tmp_path)
    f = env.open(os.path.join(d, "a"), "w+b")
    f.pwrite(b"hello", 0)
    f.fsync()
    env.fsync_dir(d)
    f.pwrite(b"HELLO world", 0)  # unsynced overwrite and extension
    g = env.open(os.path.join(d, "b"), "w+b")  # created, directory not fsynced
    g.pwrite(b"x", 0)
    g.fsync()
    env.rename(os.path.join(d, "a"), os.path.join(d, "c"))  # unsynced rename
    env.crash()
    assert sorted(os.listdir(d)) == ["a"]
    with open(os.path.join(d, "a"), "rb") as h:
        assert h.read() == b"hello"
    with pytest.raises(SimulatedCrash):
        f.pread(5, 0)  # a file from before the crash is fenced off


def test_crash_env_torn_write_keeps_a_prefix(tmp_path: Any) -> None:
    seen = set()
    for seed in range(40):
        p = os.path.join(str(tmp_path), f"f{seed}")
        env = CrashSimulatingEnv(posix_env, torn=True, seed=seed)
        f = env.open(p, "w+b")
        env.fsync_dir(str(tmp_path))
        f.pwrite(b"base", 0)
        f.fdatasync()
        f.pwrite(b"0123456789", 4)
        env.crash()
        with open(p, "rb") as h:
            data = h.read()
        assert data.startswith(b"base") and b"base0123456789".startswith(data)
        seen.add(len(data))
    assert len(seen) > 3  # torn at different bytes
