"""The log-structured object store, on real files, under PosixEnv threads and TameEnv stacks.

Every test body is a plain blocking function of an Env; the ``world`` fixture
runs it either directly with PosixEnv (threads via env.start_thread are OS
threads) or on a tame stack of an asyncio loop with TameEnv (env.start_thread
starts greenlets on the same loop). The store code is the same in both.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from shardio import tame
from shardio.osd.objectstore import (
    BLOCK_SIZE,
    CorruptExtent,
    InvalidArgument,
    NameTooLong,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    StoreClosed,
    StoreCorrupted,
    StoreError,
    StoreFailed,
)
from shardio.osd.osdmap import OSDMap
from shardio.tame import Env, PosixEnv, posix_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the two worlds -------------------------------------------------------------


class World:
    name = "?"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError


class PosixWorld(World):
    name = "posix"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(posix_env, *args)


class TameWorld(World):
    name = "tame"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def main() -> Any:
            def body() -> Any:
                env = tame.env()
                assert env.name == "tame"
                return fn(env, *args)

            return await tame.call(body)

        return asyncio.run(main())


def _have_tame_env() -> bool:
    try:
        from shardio.tame import TameEnv  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["posix", "tame"])
def world(request: pytest.FixtureRequest) -> World:
    if request.param == "posix":
        return PosixWorld()
    if not _have_tame_env():
        pytest.skip("TameEnv is not in shardio.tame.env yet")
    return TameWorld()


def content(name: str, size: int, gen: int = 0) -> bytes:
    """Deterministic bytes for (name, size, generation)."""
    seed = hashlib.sha256(f"{name}/{gen}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def segment_files(path: str) -> list[str]:
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".log"))


# -- basic operations -----------------------------------------------------------------


def test_put_read_many_and_reopen(world: World, tmp_path: Any) -> None:
    rng = random.Random(1)
    sizes = {f"obj-{i}": rng.choice([0, 1, 100, 4096, 4097, 20000]) for i in range(300)}
    sizes["big-1"] = 300_000  # larger than one whole-record read
    sizes["big-2"] = 3 * 1024 * 1024
    d = str(tmp_path / "store")

    def first(env: Env) -> dict[str, int]:
        versions = {}
        with ObjectStore(d, env, sync=False) as s:
            for name, size in sizes.items():
                st = s.put(name, content(name, size))
                assert st.size == size
                versions[name] = st.version
            for name, size in sizes.items():
                assert s.read(name) == content(name, size)
                assert s.stat(name) == (size, versions[name])
            assert len(s) == len(sizes)
            assert s.stats.objects == len(sizes)
            assert s.stats.live_bytes == sum(sizes.values())
        return versions

    def second(env: Env, versions: dict[str, int]) -> None:
        with ObjectStore(d, env) as s:
            assert s.stats.records_replayed == len(sizes)
            for name, size in sizes.items():
                assert s.read(name) == content(name, size), name
                assert s.stat(name) == (size, versions[name])
            # ranges across block boundaries of the big objects
            big = content("big-2", sizes["big-2"])
            for a, b in [(0, 1), (4095, 4097), (8190, 70000), (3 * 1024 * 1024 - 5, 10**9)]:
                assert s.read("big-2", a, b - a) == big[a:b]
            # new writes continue the sequence
            st = s.put("obj-0", b"new")
            assert st.version > max(versions.values())

    versions = world.run(first)
    world.run(second, versions)


def test_short_reads_missing_and_invalid(world: World, tmp_path: Any) -> None:
    def body(env: Env) -> None:
        with ObjectStore(str(tmp_path), env) as s:
            s.put("o", b"0123456789")
            assert s.read("o", 8, 100) == b"89"  # short read at the end
            assert s.read("o", 10) == b""
            assert s.read("o", 1000, 5) == b""
            assert s.read("o", 0, 0) == b""
            assert s.read("o", 3, 2) == b"34"
            assert s.read(b"o") == s.read("o")
            with pytest.raises(ObjectNotFound) as info:
                s.read("missing")
            assert info.value.errno == errno.ENOENT
            assert isinstance(info.value, KeyError)
            assert "missing" in str(info.value)
            with pytest.raises(ObjectNotFound):
                s.stat("missing")
            with pytest.raises(ObjectNotFound):
                s.delete("missing")
            assert not s.exists("missing") and s.exists("o")
            with pytest.raises(InvalidArgument) as inv:
                s.put("", b"x")
            assert inv.value.errno == errno.EINVAL
            with pytest.raises(NameTooLong) as ntl:
                s.put("n" * 4097, b"x")
            assert ntl.value.errno == errno.ENAMETOOLONG
            s.put("n" * 4096, b"x")
            with pytest.raises(InvalidArgument):
                s.read("o", -1)
            with pytest.raises(InvalidArgument):
                s.write("o", b"x", -1)
            with pytest.raises(ObjectTooLarge) as big:
                s.write("o", b"x", 1 << 30)
            assert big.value.errno == errno.EFBIG
            with pytest.raises(InvalidArgument, match="negative"):
                s.list(limit=-1)

    world.run(body)


def test_max_read_and_object_size_limits(world: World, tmp_path: Any) -> None:
    def body(env: Env) -> None:
        with ObjectStore(str(tmp_path), env, max_read=10000, max_object_size=50000) as s:
            s.put("a", bytes(20000))
            with pytest.raises(InvalidArgument, match="pieces"):
                s.read("a")
            assert len(s.read("a", 0, 10000)) == 10000
            with pytest.raises(ObjectTooLarge):
                s.put("b", bytes(50001))
            with pytest.raises(ObjectTooLarge):
                s.write("a", b"x", 50000)

    world.run(body)


def test_partial_writes_holes_and_deletes_match_a_model(world: World, tmp_path: Any) -> None:
    """Random put/write/delete on a few objects against an in-memory model, across restarts."""
    d = str(tmp_path / "s")

    def body(env: Env, seed: int, model: dict[str, bytearray]) -> None:
        rng = random.Random(seed)
        with ObjectStore(d, env, sync=False, segment_size=64 * 1024) as s:
            for name, data in model.items():
                assert s.read(name) == bytes(data)
            for step in range(400):
                name = f"k{rng.randrange(6)}"
                op = rng.random()
                if op < 0.15:
                    data = rng.randbytes(rng.choice([0, 10, 5000]))
                    s.put(name, data)
                    model[name] = bytearray(data)
                elif op < 0.75:
                    off = rng.randrange(0, 30000)
                    data = rng.randbytes(rng.choice([1, 100, 4096, 9000]))
                    st = s.write(name, data, off)
                    buf = model.setdefault(name, bytearray())
                    if len(buf) < off:
                        buf.extend(bytes(off - len(buf)))
                    buf[off : off + len(data)] = data
                    assert st.size == len(buf)
                elif op < 0.85:
                    if name in model:
                        s.delete(name)
                        del model[name]
                    else:
                        with pytest.raises(ObjectNotFound):
                            s.delete(name)
                else:
                    if name not in model:
                        with pytest.raises(ObjectNotFound):
                            s.read(name)
                        continue
                    buf = model[name]
                    a = rng.randrange(0, len(buf) + 10)
                    n = rng.randrange(0, 20000)
                    assert s.read(name, a, n) == bytes(buf[a : a + n]), (step, name, a, n)
                    assert s.stat(name).size == len(buf)
            assert sorted(s.list()) == sorted(k.encode() for k in model)
            for name, data in model.items():
                assert s.read(name) == bytes(data)
            assert s.stats.segments > 1

    model: dict[str, bytearray] = {}
    for seed in range(3):  # each round reopens the store and checks the model first
        world.run(body, seed, model)


def test_versions_increase_and_delete_recreate(world: World, tmp_path: Any) -> None:
    def body(env: Env) -> None:
        with ObjectStore(str(tmp_path), env) as s:
            v1 = s.put("o", b"a").version
            v2 = s.write("o", b"b", 1).version
            assert v2 > v1 and s.stat("o") == (2, v2)
            vd = s.delete("o")
            assert vd > v2 and not s.exists("o")
            st = s.write("o", b"zz", 3)  # recreated with a hole
            assert st.size == 5 and st.version > vd
            assert s.read("o") == b"\0\0\0zz"
            st = s.write("o", b"", 100)  # zero-length write: a new version, no growth
            assert st.size == 5
        with ObjectStore(str(tmp_path), env) as s:
            assert s.read("o") == b"\0\0\0zz" and s.stat("o").version == st.version

    world.run(body)


def test_list_per_pg_with_paging(world: World, tmp_path: Any) -> None:
    m = OSDMap.build(2, pg_num=8)
    names = [f"obj-{i:04d}".encode() for i in range(400)]

    def body(env: Env) -> None:
        with ObjectStore(str(tmp_path), env, pg_of=m.pg_for, sync=False) as s:
            for n in names:
                s.put(n, b"x")
            for n in names[:50]:
                s.delete(n)
        with ObjectStore(str(tmp_path), env, pg_of=m.pg_for) as s:  # pg index rebuilt
            alive = names[50:]
            for pg in range(8):
                expect = sorted(n for n in alive if m.pg_for(n) == pg)
                assert s.list(pg) == expect
                # paging: limit + start_after
                got: list[bytes] = []
                marker: bytes | None = None
                while True:
                    page = s.list(pg, start_after=marker, limit=7)
                    got += page
                    if len(page) < 7:
                        break
                    marker = page[-1]
                assert got == expect
            assert s.list(99) == []
            assert s.list() == sorted(alive)
        with ObjectStore(str(tmp_path), env) as s, pytest.raises(InvalidArgument, match="pg_of"):
            s.list(0)

    world.run(body)


def test_closed_store(world: World, tmp_path: Any) -> None:
    def body(env: Env) -> None:
        s = ObjectStore(str(tmp_path), env)
        s.put("a", b"1")
        s.close()
        s.close()
        assert s.closed
        for call in (lambda: s.read("a"), lambda: s.put("a", b"2"), lambda: s.list()):
            with pytest.raises(StoreClosed) as info:
                call()
            assert info.value.errno == errno.ESHUTDOWN

    world.run(body)


def test_errors_pickle_with_errno() -> None:
    for exc in (
        ObjectNotFound("object b'x' does not exist"),
        CorruptExtent("bad"),
        NameTooLong("long"),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.errno == exc.errno


# -- recovery -------------------------------------------------------------------------


def _fill(env: Env, d: str, n: int, **kw: Any) -> None:
    with ObjectStore(d, env, **kw) as s:
        for i in range(n):
            s.put(f"o{i}", content(f"o{i}", 5000))


def _check(env: Env, d: str, n: int) -> ObjectStore:
    s = ObjectStore(d, env)
    for i in range(n):
        assert s.read(f"o{i}") == content(f"o{i}", 5000)
    return s


@pytest.mark.parametrize(
    "damage",
    ["half-record", "header-only", "zeros", "garbage", "flip-last-data", "flip-last-header"],
)
def test_torn_tail_is_cut_not_fatal(world: World, tmp_path: Any, damage: str) -> None:
    d = str(tmp_path / "s")

    def body(env: Env) -> None:
        _fill(env, d, 20)
        seg = segment_files(d)[-1]
        size = os.path.getsize(seg)
        last_rec = 28 + 3 + 4 * 2 + 4 + 5000  # the record of "o19"
        if damage == "half-record":
            with ObjectStore(d, env) as s:
                s.put("o20", content("o20", 5000))
            os.truncate(seg, size + last_rec // 2)
        elif damage == "header-only":
            with ObjectStore(d, env) as s:
                s.put("o20", content("o20", 5000))
            os.truncate(seg, size + 20)
        elif damage == "zeros":  # a crash can leave the size extended but blocks unwritten
            with open(seg, "ab") as f:
                f.write(bytes(8192))
        elif damage == "garbage":
            with open(seg, "ab") as f:
                f.write(os.urandom(3000))
        elif damage == "flip-last-data":  # the unsynced last record was only partly written
            with ObjectStore(d, env) as s:
                s.put("o20", content("o20", 5000))
            flip_byte(seg, size + last_rec - 10)
        elif damage == "flip-last-header":
            with ObjectStore(d, env) as s:
                s.put("o20", content("o20", 5000))
            flip_byte(seg, size + 5)
        s = _check(env, d, 20)
        try:
            assert s.stats.torn_bytes > 0
            assert not s.exists("o20")
            assert os.path.getsize(seg) == size  # cut back to the last good record
            s.put("after", b"still works")
        finally:
            s.close()
        s = _check(env, d, 20)
        try:
            assert s.read("after") == b"still works"
            assert s.stats.torn_bytes == 0
        finally:
            s.close()

    world.run(body)


def test_damaged_sealed_segment_refuses_to_open(world: World, tmp_path: Any) -> None:
    d = str(tmp_path / "s")

    def body(env: Env) -> None:
        _fill(env, d, 40, segment_size=32 * 1024)
        segs = segment_files(d)
        assert len(segs) > 2
        flip_byte(segs[0], 5)  # a header byte of the first record of a sealed segment
        with pytest.raises(StoreCorrupted, match="sealed segment") as info:
            ObjectStore(d, env)
        assert info.value.errno == errno.EIO

    world.run(body)


def test_corrupt_extent_is_eio_never_data(world: World, tmp_path: Any) -> None:
    d = str(tmp_path / "s")

    def body(env: Env) -> None:
        with ObjectStore(d, env, segment_size=64 * 1024) as s:
            for i in range(40):
                s.put(f"o{i}", content(f"o{i}", 5000))
            big = content("big", 100 * BLOCK_SIZE)
            s.put("big", big)  # a record read in pieces (larger than a whole-record read)
            # data byte of a small object
            path, off, hdr_len, _ = s._extents_of("o3")[0]
            flip_byte(path, off + hdr_len + 4500)
            with pytest.raises(CorruptExtent) as info:
                s.read("o3")
            assert info.value.errno == errno.EIO
            assert "checksum" in str(info.value)
            with pytest.raises(CorruptExtent):
                s.read("o3", 4096, 10)  # the damaged block
            # header byte of another: identity/integrity check on read
            path, off, hdr_len, _ = s._extents_of("o4")[0]
            flip_byte(path, off + 12)
            with pytest.raises(CorruptExtent):
                s.read("o4")
            # one damaged block of the big record: other blocks still readable
            path, off, hdr_len, _ = s._extents_of("big")[0]
            flip_byte(path, off + hdr_len + 50 * BLOCK_SIZE + 7)
            assert s.read("big", 0, 10 * BLOCK_SIZE) == big[: 10 * BLOCK_SIZE]
            assert s.read("big", 51 * BLOCK_SIZE, 100) == big[51 * BLOCK_SIZE :][:100]
            with pytest.raises(CorruptExtent):
                s.read("big", 50 * BLOCK_SIZE + 100, 10)
            with pytest.raises(CorruptExtent):
                s.read("big")
            assert s.stats.corrupt_reads == 5
            for i in range(40):
                if i not in (3, 4):
                    assert s.read(f"o{i}") == content(f"o{i}", 5000)
            sealed = {s._extents_of(n)[0][0] for n in ("o3", "o4")}
            assert segment_files(d)[-1] not in sealed
        # o3 and o4 live in a sealed segment: after a restart they are still EIO
        # (o4's header is damaged: the sealed segment cannot be opened at all)
        with pytest.raises(StoreCorrupted):
            ObjectStore(d, env)

    world.run(body)


def test_corrupt_data_in_sealed_segment_stays_eio_after_restart(
    world: World, tmp_path: Any
) -> None:
    d = str(tmp_path / "s")

    def body(env: Env) -> None:
        with ObjectStore(d, env, segment_size=32 * 1024) as s:
            for i in range(40):
                s.put(f"o{i}", content(f"o{i}", 5000))
            path, off, hdr_len, _ = s._extents_of("o0")[0]
        assert path != segment_files(d)[-1]
        flip_byte(path, off + hdr_len + 1)
        with ObjectStore(d, env) as s:
            with pytest.raises(CorruptExtent):
                s.read("o0")
            for i in range(1, 40):
                assert s.read(f"o{i}") == content(f"o{i}", 5000)
            s.put("o0", b"rewritten")  # a new version heals the object
            assert s.read("o0") == b"rewritten"

    world.run(body)


_CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, sys, threading
    from shardio import tame
    from shardio.osd.objectstore import ObjectStore

    d, world = sys.argv[1], sys.argv[2]

    def content(name, size):
        seed = hashlib.sha256(f"{name}/0".encode()).digest()
        return (seed * (size // len(seed) + 1))[:size]

    def writer(env, store, w):
        i = 0
        while True:
            name = f"w{w}-{i}"
            store.put(name, content(name, 1000 + (i * 37) % 9000))
            sys.stdout.write(name + "\\n")  # acknowledged: durable from here on
            sys.stdout.flush()
            i += 1

    def main(env):
        store = ObjectStore(d, env, segment_size=256 * 1024)
        handles = [env.start_thread(writer, env, store, w) for w in range(4)]
        for h in handles:
            h.join()

    if world == "posix":
        from shardio.tame import posix_env
        main(posix_env)
    else:
        async def amain():
            await tame.call(lambda: main(tame.env()))
        asyncio.run(amain())
    """
)


def test_acknowledged_writes_survive_kill9(world: World, tmp_path: Any) -> None:
    """A child writes with 4 concurrent writers (group commit) and prints each
    acknowledged name; it is killed with SIGKILL mid-stream; every acknowledged
    object must read back intact, and the store must open cleanly."""
    d = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, d, world.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    acked: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(acked) < 600 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    rest, err = proc.communicate(timeout=30)
    acked += [n for n in rest.splitlines() if n]  # printed before the kill landed
    assert len(acked) >= 600, err

    def check(env: Env) -> int:
        with ObjectStore(d, env) as s:
            for name in acked:
                i = int(name.split("-")[1])
                assert s.read(name) == content(name, 1000 + (i * 37) % 9000), name
            assert s.stats.fsyncs == 0
            return s.stats.records_replayed

    replayed = world.run(check)
    print(f"{world.name}: {len(acked)} acknowledged before kill -9, {replayed} replayed")
    assert replayed >= len(acked)


# -- durability policy and failures ------------------------------------------------------


def test_sync_false_visible_at_once_durable_on_close(world: World, tmp_path: Any) -> None:
    def body(env: Env) -> None:
        s = ObjectStore(str(tmp_path), env, sync=False)
        for i in range(100):
            s.put(f"o{i}", content(f"o{i}", 100))
            assert s.read(f"o{i}") == content(f"o{i}", 100)
        assert s.stats.fsyncs == 0
        s.sync()
        assert s.stats.fsyncs == 1
        s.put("late", b"x")
        s.close()
        assert s.stats.fsyncs == 2
        with ObjectStore(str(tmp_path), env) as s2:
            assert len(s2) == 101

    world.run(body)


class _FailingFile:
    """Wraps an Env file; fsync/fdatasync raise EIO once the shared switch is on."""

    def __init__(self, f: Any, switch: dict[str, bool]) -> None:
        self._f = f
        self._switch = switch

    def fsync(self) -> None:
        if self._switch["fail"]:
            raise OSError(errno.EIO, "injected fsync failure")
        self._f.fsync()

    def fdatasync(self) -> None:
        if self._switch["fail"]:
            raise OSError(errno.EIO, "injected fdatasync failure")
        self._f.fdatasync()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FaultyEnv(PosixEnv):
    """PosixEnv with fsync failures injected on demand (a fault injector, not a mock)."""

    def __init__(self) -> None:
        self.switch = {"fail": False}

    def open(self, path: Any, mode: str = "rb", *, direct: bool = False) -> Any:
        return _FailingFile(super().open(path, mode, direct=direct), self.switch)


def test_fsync_failure_turns_store_read_only(tmp_path: Any) -> None:
    env = FaultyEnv()
    s = ObjectStore(str(tmp_path), env)
    s.put("a", b"durable")
    env.switch["fail"] = True
    with pytest.raises(StoreFailed, match="sync failed") as info:
        s.put("b", b"not acknowledged")
    assert info.value.errno == errno.EIO
    assert not s.exists("b")  # never made visible
    with pytest.raises(StoreFailed, match="read-only"):
        s.put("c", b"refused")
    assert s.read("a") == b"durable"  # reads still served
    s.close()
    env.switch["fail"] = False
    with ObjectStore(str(tmp_path), posix_env) as s2:
        assert s2.read("a") == b"durable"


# -- concurrency -------------------------------------------------------------------------


def test_concurrent_writers_and_readers(world: World, tmp_path: Any) -> None:
    """Writers on their own and on shared objects, readers checking that every read
    returns one whole version (never a mix, never corrupt); writes group-committed."""
    d = str(tmp_path / "s")
    n_writers, n_per, n_shared = 8, 25, 4

    def shared_value(k: int, gen: int) -> bytes:
        return (f"shared-{k}-gen-{gen:06d}|".encode() * 400)[:9000]

    def body(env: Env) -> None:
        s = ObjectStore(d, env, segment_size=128 * 1024)
        for k in range(n_shared):
            s.put(f"shared-{k}", shared_value(k, 0))
        stop = env.Event()
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            try:
                for i in range(n_per):
                    name = f"w{w}-{i}"
                    s.put(name, content(name, 3000 + i))
                    k = (w + i) % n_shared
                    s.put(f"shared-{k}", shared_value(k, w * 1000 + i + 1))
            except BaseException as exc:
                errors.append(exc)

        def reader(r: int) -> int:
            reads = 0
            rng = random.Random(r)
            valid = {
                (k, w * 1000 + i + 1)
                for k in range(n_shared)
                for w in range(n_writers)
                for i in range(n_per)
            }
            while not stop.is_set() or reads < 50:
                k = rng.randrange(n_shared)
                data = s.read(f"shared-{k}")
                gen = int(data[data.index(b"gen-") + 4 : data.index(b"|")])
                assert gen == 0 or (k, gen) in valid
                assert data == shared_value(k, gen)
                reads += 1
                if reads % 10 == 0:
                    env.sleep(0)
            return reads

        writers = [env.start_thread(writer, w) for w in range(n_writers)]
        readers = [env.start_thread(reader, r) for r in range(3)]
        for h in writers:
            h.join()
        stop.set()
        total_reads = sum(h.result() for h in readers)
        assert not errors, errors
        assert total_reads >= 150
        for w in range(n_writers):
            for i in range(n_per):
                assert s.read(f"w{w}-{i}") == content(f"w{w}-{i}", 3000 + i)
        st = s.stats
        assert st.writes == n_shared + 2 * n_writers * n_per
        print(f"{world.name}: {st.writes} writes, {st.fsyncs} fsyncs, {total_reads} reads")
        assert st.fsyncs < st.writes, "concurrent writers should share fsyncs"
        assert st.segments > 1
        s.close()
        with ObjectStore(d, env) as s2:
            assert len(s2) == n_shared + n_writers * n_per
            for w in range(n_writers):
                for i in range(n_per):
                    assert s2.read(f"w{w}-{i}") == content(f"w{w}-{i}", 3000 + i)

    world.run(body)


def test_store_does_not_touch_os_directly() -> None:
    """All I/O and locking go through the Env (so the same code runs tamed)."""
    import ast

    import shardio.osd.objectstore as mod

    assert mod.__file__ is not None
    with open(mod.__file__) as f:
        tree = ast.parse(f.read())
    banned_modules = {"threading", "io", "time", "socket", "select", "queue"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for n in names:
                assert n not in banned_modules, n
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", "builtin open() in the store"
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            assert node.attr in {"path", "fspath", "PathLike"}, f"os.{node.attr} in the store"


def test_store_error_hierarchy() -> None:
    from shardio.errors import ShardioError

    for cls in (ObjectNotFound, CorruptExtent, StoreCorrupted, StoreFailed, StoreClosed):
        assert issubclass(cls, StoreError) and issubclass(cls, ShardioError)


# -- inside real shards ------------------------------------------------------------------


async def _store_job_on_shard(root: str, n: int) -> tuple[int, str, int, int]:
    """Runs on a shard's reactor: the store on tame stacks, 16 concurrent clients."""
    import shardio

    shard = shardio.this_shard()
    d = os.path.join(root, f"shard-{shard}")
    store = await tame.call(lambda: ObjectStore(d, tame.env()))

    async def client(k: int) -> None:
        for i in range(k, n, 16):
            name = f"s{shard}-{i}"
            await tame.call(store.put, name, content(name, 4096))
        for i in range(k, n, 16):
            name = f"s{shard}-{i}"
            assert await tame.call(store.read, name) == content(name, 4096)

    await asyncio.gather(*(client(k) for k in range(16)))
    env_name = store.env.name
    st = store.stats
    await tame.call(store.close)
    return shard, env_name, st.writes, st.fsyncs


def test_store_on_tame_stacks_in_shard_processes(tmp_path: Any) -> None:
    if not _have_tame_env():
        pytest.skip("TameEnv is not in shardio.tame.env yet")
    import shardio

    n = 200
    with shardio.ShardGroup(2, backend="process") as group:
        results = [group.submit(s, _store_job_on_shard, str(tmp_path), n) for s in range(2)]
        out = sorted(f.result(timeout=60) for f in results)
    assert [(s, e, w) for s, e, w, _ in out] == [(0, "tame", n), (1, "tame", n)]
    assert all(fsyncs < n for *_, fsyncs in out)  # group commit across tame stacks
    for s in range(2):  # and the data is there for a plain PosixEnv reader
        with ObjectStore(str(tmp_path / f"shard-{s}"), posix_env) as store:
            for i in range(n):
                assert store.read(f"s{s}-{i}") == content(f"s{s}-{i}", 4096)
