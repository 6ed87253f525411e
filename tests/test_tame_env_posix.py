"""PosixEnv: the plain blocking Env that TameEnv is measured against."""

from __future__ import annotations

import os
import queue
import socket
import threading

import pytest

from shardio.tame import DIRECT_ALIGN, PosixEnv, posix_env


@pytest.fixture
def env() -> PosixEnv:
    return posix_env


def test_file_roundtrip(env: PosixEnv, tmp_path) -> None:
    p = tmp_path / "f"
    with env.open(p, "w+b") as f:
        assert f.write(b"hello world") == 11
        assert f.pwrite(b"XY", 1) == 2
        assert f.pread(4, 0) == b"hXYl"
        assert f.pread(100, 6) == b"world"
        assert f.pread(10, 100) == b""
        f.seek(0)
        assert f.read(5) == b"hXYlo"
        assert f.read() == b" world"
        assert f.tell() == 11
        f.fsync()
        f.fdatasync()
        f.truncate(5)
        assert f.size() == 5
        f.fadvise(0, 0, env.FADV_DONTNEED)
        assert isinstance(f.fileno(), int)
    assert f.closed
    f.close()  # idempotent
    with pytest.raises(ValueError, match="closed file"):
        f.pread(1, 0)
    with env.open(p, "ab") as f:
        f.write(b"!!")
    with env.open(p) as f:
        assert f.read() == b"hXYlo!!"
        with pytest.raises(OSError, match="not open for writing"):
            f.write(b"x")


def test_modes(env: PosixEnv, tmp_path) -> None:
    p = tmp_path / "x"
    with env.open(p, "xb") as f:
        f.write(b"1")
    with pytest.raises(FileExistsError):
        env.open(p, "x")
    with pytest.raises(ValueError, match="binary"):
        env.open(p, "rt")
    with pytest.raises(ValueError, match="invalid mode"):
        env.open(p, "q")
    with env.open(p, "w") as f:
        pass
    assert env.getsize(p) == 0


def test_direct_io(env: PosixEnv) -> None:
    d = "/var/tmp" if os.path.isdir("/var/tmp") else None
    import tempfile

    with tempfile.TemporaryDirectory(dir=d) as td:
        p = os.path.join(td, "direct")
        try:
            f = env.open(p, "w+b", direct=True)
        except OSError as exc:
            pytest.skip(f"O_DIRECT not supported on {td}: {exc}")
        with f:
            block = bytes(range(256)) * (DIRECT_ALIGN // 256)
            assert f.pwrite(block * 2, 0) == 2 * DIRECT_ALIGN
            assert f.pread(DIRECT_ALIGN, DIRECT_ALIGN) == block
            with pytest.raises(ValueError, match="multiples of 4096"):
                f.pread(100, 0)
            f.seek(0)
            assert f.read() == block * 2


def test_filesystem_helpers(env: PosixEnv, tmp_path) -> None:
    d = tmp_path / "a" / "b"
    env.makedirs(d)
    env.makedirs(d)  # exist_ok
    with env.open(d / "f", "wb") as f:
        f.write(b"abc")
    assert env.exists(d / "f") and env.isdir(d)
    assert env.listdir(d) == ["f"]
    assert env.getsize(d / "f") == 3 and env.stat(d / "f").st_size == 3
    env.rename(d / "f", d / "g")
    env.fsync_dir(d)
    env.fadvise(d / "g")
    env.remove(d / "g")
    env.rmdir(d)
    assert not env.exists(d)


def test_time_and_sync(env: PosixEnv) -> None:
    t0 = env.monotonic()
    env.sleep(0.01)
    assert env.monotonic() - t0 >= 0.009
    assert abs(env.time() - __import__("time").time()) < 1
    lock, cond, ev = env.Lock(), env.Condition(), env.Event()
    with lock:
        assert lock.locked()
    rl = env.RLock()
    with rl, rl:
        pass
    sem = env.BoundedSemaphore(1)
    sem.acquire()
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    q = env.Queue(1)
    q.put_nowait(1)
    with pytest.raises(queue.Full):
        q.put_nowait(2)
    assert q.get() == 1
    with pytest.raises(queue.Empty):
        q.get(timeout=0.001)

    def waiter() -> str:
        with cond:
            cond.wait_for(ev.is_set, timeout=5)
        return "woken"

    h = env.start_thread(waiter, name="w")
    with cond:
        ev.set()
        cond.notify_all()
    assert h.result(5) == "woken"
    assert not h.is_alive()


def test_thread_exception_and_timeout(env: PosixEnv) -> None:
    def boom() -> None:
        raise KeyError("x")

    h = env.start_thread(boom)
    h.join(5)
    with pytest.raises(KeyError):
        h.result()
    stop = threading.Event()
    h = env.start_thread(stop.wait, 5)
    with pytest.raises(TimeoutError):
        h.result(0.01)
    stop.set()
    h.join()


def test_sockets(env: PosixEnv) -> None:
    srv = env.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    h = env.start_thread(serve)
    with env.create_connection(srv.getsockname(), timeout=5) as c:
        c.sendall(b"ping")
        assert c.recv(100) == b"PING"
    h.result(5)
    srv.close()
