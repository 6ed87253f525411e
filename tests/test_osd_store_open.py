"""Opening a store: the on-disk format version, and exclusive use of the directory.

The fixture tests/fixtures/store_v0 was written by the code before format
versioning (see tests/fixtures/make_store_v0.py); it must open and read back.
Exclusive open is checked with real processes: a holder, a second opener,
and a holder killed with SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from shardio.osd.objectstore import (
    FORMAT_VERSION,
    DirectoryLocked,
    ObjectStore,
    StoreCorrupted,
    StoreError,
    StoreFormatUnsupported,
    StoreReadOnly,
)
from shardio.tame import posix_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixtures", "store_v0")


def fixture_copy(tmp_path: Any) -> tuple[str, dict[str, Any]]:
    d = str(tmp_path / "v0")
    shutil.copytree(FIXTURE, d)
    with open(os.path.join(HERE, "fixtures", "store_v0.json")) as f:
        manifest = json.load(f)["objects"]
    return d, manifest


def check_manifest(store: ObjectStore, manifest: dict[str, Any]) -> None:
    assert sorted(n.decode() for n in store.list()) == sorted(manifest)
    for name, want in manifest.items():
        data = store.read(name)
        assert len(data) == want["size"], name
        assert hashlib.sha256(data).hexdigest() == want["sha256"], name


def test_a_store_written_before_format_versions_opens_and_reads_back(tmp_path: Any) -> None:
    d, manifest = fixture_copy(tmp_path)
    assert not os.path.exists(os.path.join(d, "FORMAT"))
    with ObjectStore(d, posix_env) as s:
        assert s.stats.format_version == 0
        assert s.stats.torn_bytes == 0
        check_manifest(s, manifest)
    with open(os.path.join(d, "FORMAT")) as f:
        assert f.read() == f"shardio-objectstore {FORMAT_VERSION}\n"  # upgraded in place
    with ObjectStore(d, posix_env, segment_size=16 * 1024) as s:
        assert s.stats.format_version == FORMAT_VERSION
        check_manifest(s, manifest)
        s.put("obj-0", b"new")  # and it takes new-format records: writes, relocations
        manifest["obj-0"] = {"size": 3, "sha256": hashlib.sha256(b"new").hexdigest()}
        assert s.compact(min_garbage=0.0).segments_dropped > 0
        check_manifest(s, manifest)
    with ObjectStore(d, posix_env) as s:
        check_manifest(s, manifest)


def test_a_new_store_records_its_format(tmp_path: Any) -> None:
    with ObjectStore(str(tmp_path), posix_env) as s:
        assert s.stats.format_version == FORMAT_VERSION
    with open(tmp_path / "FORMAT") as f:
        assert f.read() == f"shardio-objectstore {FORMAT_VERSION}\n"


def test_a_newer_format_is_refused_with_a_clear_error(tmp_path: Any) -> None:
    with ObjectStore(str(tmp_path), posix_env) as s:
        s.put("a", b"x")
    with open(tmp_path / "FORMAT", "w") as f:
        f.write(f"shardio-objectstore {FORMAT_VERSION + 1}\n")
    with pytest.raises(StoreFormatUnsupported) as info:
        ObjectStore(str(tmp_path), posix_env)
    msg = str(info.value)
    assert str(tmp_path) in msg and f"version {FORMAT_VERSION + 1}" in msg
    assert info.value.errno == errno.EPROTONOSUPPORT
    with open(tmp_path / "FORMAT", "w") as f:
        f.write("something else\n")
    with pytest.raises(StoreCorrupted, match="does not name an object store format"):
        ObjectStore(str(tmp_path), posix_env)
    with open(tmp_path / "FORMAT", "w") as f:  # the refusals left the directory usable
        f.write(f"shardio-objectstore {FORMAT_VERSION}\n")
    with ObjectStore(str(tmp_path), posix_env) as s:
        assert s.read("a") == b"x"


# -- exclusive open ---------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from shardio.osd.objectstore import ObjectStore
    from shardio.tame import posix_env
    s = ObjectStore(sys.argv[1], posix_env)
    s.put("held", b"by the holder")
    print("ready", flush=True)
    time.sleep(120)
    """
)

OPENER = textwrap.dedent(
    """
    import sys
    from shardio.osd.objectstore import DirectoryLocked, ObjectStore
    from shardio.tame import posix_env
    try:
        ObjectStore(sys.argv[1], posix_env)
    except DirectoryLocked as exc:
        print("locked", exc.holder_pid, exc)
        sys.exit(3)
    print("opened")
    """
)


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env
    )


def test_second_opener_fails_at_once_naming_the_directory_and_holder(tmp_path: Any) -> None:
    d = str(tmp_path / "s")
    holder = spawn(HOLDER, d)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DirectoryLocked) as info:
            ObjectStore(d, posix_env)
        assert info.value.directory == d
        assert info.value.holder_pid == holder.pid
        assert d in str(info.value) and str(holder.pid) in str(info.value)
        assert info.value.errno == errno.EBUSY
        again = pickle.loads(pickle.dumps(info.value))
        assert again.holder_pid == holder.pid and again.directory == d
        # a SIGKILLed holder never blocks a restart: the kernel drops its flock
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with ObjectStore(d, posix_env) as s:
            assert s.read("held") == b"by the holder"
            # and now this process is the holder another process is refused by
            opener = spawn(OPENER, d)
            out, _ = opener.communicate(timeout=60)
            assert opener.returncode == 3, out
            assert out.split()[:2] == ["locked", str(os.getpid())] and d in out
        opener = spawn(OPENER, d)  # closed: free again
        out, _ = opener.communicate(timeout=60)
        assert opener.returncode == 0 and out.strip() == "opened"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_second_open_in_the_same_process_is_refused_too(tmp_path: Any) -> None:
    d = str(tmp_path)
    with ObjectStore(d, posix_env), pytest.raises(DirectoryLocked, match="in use by process"):
        ObjectStore(d, posix_env)
    with ObjectStore(d, posix_env):  # released by close
        pass


def test_osd_data_directory_is_locked(tmp_path: Any) -> None:
    from shardio.osd.server import OSDServer

    d = str(tmp_path / "osd")
    with OSDServer(d, shards=1, backend="thread"):
        with pytest.raises(DirectoryLocked) as info:
            OSDServer(d, shards=1, backend="thread").start()
        assert info.value.directory == d and info.value.holder_pid == os.getpid()
    with OSDServer(d, shards=1, backend="thread"):  # released by stop
        pass


READER = textwrap.dedent(
    """
    import sys
    from shardio.osd.objectstore import DirectoryLocked, ObjectStore
    from shardio.tame import posix_env
    try:
        store = ObjectStore(sys.argv[1], posix_env, read_only=True)
    except DirectoryLocked as exc:
        print("locked", exc.holder_pid)
        sys.exit(3)
    print("reading", store.read("shared").decode(), flush=True)
    sys.stdin.readline()
    """
)


def test_readers_share_a_directory_and_never_beside_a_writer(tmp_path: Any) -> None:
    """Read-only opens take a shared lock: two reader processes hold it together, a
    writer is refused while they do, and a reader is refused while a writer holds it."""
    d = str(tmp_path / "s")
    with ObjectStore(d, posix_env) as s:
        s.put("shared", b"for all readers")
        before = sorted(os.listdir(d))
        busy = subprocess.run(
            [sys.executable, "-c", READER, d],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT),
        )  # fmt: skip
        assert busy.returncode == 3 and busy.stdout.split() == ["locked", str(os.getpid())]
    env = dict(os.environ, PYTHONPATH=ROOT)
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, d], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        for _ in range(2)
    ]
    try:
        for r in readers:
            assert r.stdout is not None
            assert r.stdout.readline().strip() == "reading for all readers"
        with pytest.raises(DirectoryLocked):
            ObjectStore(d, posix_env)
        with ObjectStore(d, posix_env, read_only=True) as mine:
            assert mine.read("shared") == b"for all readers"
            with pytest.raises(StoreReadOnly):
                mine.put("other", b"x")
            with pytest.raises(StoreReadOnly):
                mine.delete("shared")
    finally:
        for r in readers:
            r.communicate("\n", timeout=30)
    assert sorted(os.listdir(d)) == before  # the readers wrote nothing
    with ObjectStore(d, posix_env) as s:  # all readers gone: a writer opens again
        s.put("after", b"ok")


def test_a_read_only_open_of_a_missing_store_is_refused(tmp_path: Any) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ObjectStore(str(tmp_path / "nothing"), posix_env, read_only=True)
    assert not os.path.exists(tmp_path / "nothing")
