"""tame.patch / tame.patched: per-module, scoped, restored exactly; tame on a stack only."""

from __future__ import annotations

import asyncio
import io
import os
import queue
import select
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest

from shardio import tame
from shardio.tame import TameSocket
from shardio.tame.sync import TameEvent, TameLock, TameQueue

# The global objects patching must leave alone, taken before any test patches anything.
# (On 3.13 threading.Lock is the class _thread.lock, no longer the function
# _thread.allocate_lock, so comparing it with another threading name is not a check.)
ORIGINALS = {"io.open": io.open, "threading.Lock": threading.Lock, "time.sleep": time.sleep}

FOREIGN_SOURCE = """
import io as _io
import os
import os as _os
import queue
import select
import socket
import threading
import time
from threading import Lock
from time import sleep

class Store:
    _os = _os          # like dbm.dumb: module references kept as class attributes
    _io = _io

    def write_text(self, path, text):
        with open(path, "w") as f:
            f.write(text)
        with self._io.open(path, "rb+") as f:
            self._os.fsync(f.fileno())

    def read_text(self, path):
        with open(path) as f:
            return f.read()

def nap(seconds, _sleep=time.sleep):   # a default argument bound at import time
    _sleep(seconds)

def direct_sleep(seconds):
    sleep(seconds)

def make_objects():
    return (Lock(), threading.RLock(), threading.Condition(), threading.Event(),
            threading.Semaphore(2), threading.BoundedSemaphore(1), queue.Queue(3))

def raw_fd_io(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"hello ")
        os.write(fd, b"world")
        os.pwrite(fd, b"H", 0)
        os.fsync(fd)
        os.fdatasync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 5) + b"|" + os.pread(fd, 5, 6)
    finally:
        os.close(fd)

def pipe_io():
    r, w = os.pipe()
    try:
        t = threading.Thread(target=lambda: (time.sleep(0.01), os.write(w, b"ping")))
        t.start()
        data = os.read(r, 10)
        t.join()
        return data
    finally:
        os.close(r)
        os.close(w)

def socket_echo():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    def serve():
        c, _ = srv.accept()
        with c:
            ready, _, _ = select.select([c], [], [], 5)
            c.sendall(c.recv(100)[::-1])
    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(srv.getsockname()) as c:
        c.sendall(b"abc")
        out = c.recv(100)
    t.join()
    srv.close()
    return out, isinstance(srv, socket.socket)
"""


def make_foreign_module() -> types.ModuleType:
    mod = types.ModuleType("tame_foreign_example")
    sys.modules[mod.__name__] = mod
    exec(compile(FOREIGN_SOURCE, "<tame_foreign_example>", "exec"), mod.__dict__)
    return mod


@pytest.fixture
def foreign() -> Any:
    mod = make_foreign_module()
    yield mod
    while tame.is_patched(mod):
        tame.unpatch(mod)
    del sys.modules[mod.__name__]


def snapshot(mod: types.ModuleType) -> dict[str, Any]:
    return {
        "globals": dict(mod.__dict__),
        "class": dict(mod.Store.__dict__),
        "defaults": mod.nap.__defaults__,
    }


def test_patch_is_scoped_and_restored_exactly(foreign: types.ModuleType) -> None:
    before = snapshot(foreign)
    with tame.patched(foreign):
        assert tame.is_patched(foreign)
        assert foreign.os is not os and foreign.os.path is os.path  # a proxy, real otherwise
        assert foreign.Store._os is foreign._os and foreign.Store._io is not io
        assert foreign.sleep is not time.sleep and foreign.Lock is not threading.Lock
        assert foreign.nap.__defaults__[0] is not time.sleep
        assert "open" in foreign.__dict__
        # nothing global changed
        assert os.read.__module__ == "posix" and time.sleep.__module__ == "time"
        assert io.open is open is ORIGINALS["io.open"]
        assert threading.Lock is ORIGINALS["threading.Lock"] and time.sleep is ORIGINALS["time.sleep"]
        with tame.patched(foreign):  # nesting is counted
            pass
        assert tame.is_patched(foreign)
    assert not tame.is_patched(foreign)
    after = snapshot(foreign)
    assert after["class"] == before["class"] and after["defaults"] == before["defaults"]
    assert after["globals"].keys() == before["globals"].keys()
    assert all(after["globals"][k] is v for k, v in before["globals"].items())
    with pytest.raises(tame.TameError, match="not patched"):
        tame.unpatch(foreign)
    with pytest.raises(tame.TameError, match="refusing"):
        tame.patch(os)
    with pytest.raises(TypeError):
        tame.patch("os")  # type: ignore[arg-type]


def test_patched_module_off_a_stack_is_unchanged(foreign: types.ModuleType, tmp_path: Any) -> None:
    with tame.patched(foreign):
        s = foreign.Store()
        s.write_text(tmp_path / "a.txt", "plain")
        assert s.read_text(tmp_path / "a.txt") == "plain"
        objs = foreign.make_objects()
        assert type(objs[0]) is type(threading.Lock()) and isinstance(objs[6], queue.Queue)
        assert isinstance(objs[3], threading.Event)  # isinstance through the dispatcher
        assert foreign.raw_fd_io(str(tmp_path / "raw")) == b"Hello|world"
        assert foreign.pipe_io() == b"ping"
        assert foreign.socket_echo() == (b"cba", True)
        t0 = time.monotonic()
        foreign.nap(0.01)
        assert time.monotonic() - t0 >= 0.009


def test_patched_module_on_a_stack_yields(
    foreign: types.ModuleType, tmp_path: Any, run: Any
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        tick = loop.create_task(ticker())
        with tame.patched(foreign):

            def work() -> Any:
                s = foreign.Store()
                s.write_text(str(tmp_path / "t.txt"), "tamed text\n" * 1000)
                text = s.read_text(str(tmp_path / "t.txt"))
                objs = foreign.make_objects()
                t0 = time.monotonic()
                foreign.nap(0.03)  # default-argument sleep
                foreign.direct_sleep(0.03)  # `from time import sleep`
                slept = time.monotonic() - t0
                return (
                    text,
                    objs,
                    slept,
                    foreign.raw_fd_io(str(tmp_path / "raw")),
                    foreign.pipe_io(),
                    foreign.socket_echo(),
                )

            before = tame.stats()["blocked_calls"]
            text, objs, slept, raw, pipe, sock = await tame.call(work)
            driver = await tame.call(lambda: tame.stacks.runtime().uring.stats())
        tick.cancel()
        assert text == "tamed text\n" * 1000
        assert (
            isinstance(objs[0], TameLock)
            and isinstance(objs[3], TameEvent)
            and isinstance(objs[6], TameQueue)
        )
        assert (
            isinstance(objs[3], foreign.threading.Event) is False
        )  # restored: the real class again
        assert slept >= 0.055 and ticks >= 30  # the loop ran while the stack slept
        assert raw == b"Hello|world" and pipe == b"ping" and sock == (b"cba", True)
        assert driver["write"] >= 3 and driver["fsync"] + driver["fdatasync"] >= 3
        assert tame.stats()["blocked_calls"] > before

    run(main)


def test_tame_open_is_io_compatible(tmp_path: Any, run: Any) -> None:
    """tame_open behaves like open for text/binary, append, seek, truncate, modes and errors."""
    p = str(tmp_path / "f")

    def scenario(opener: Callable[..., Any]) -> list[Any]:
        out: list[Any] = []
        with opener(p, "w", encoding="utf-8") as f:
            f.write("héllo\nwörld\n")
        with opener(p, "a") as f:
            f.write("more\n")
        with opener(p) as f:
            out.append(f.readlines())
        with opener(p, "rb") as f:
            out.append((f.read(3), f.tell(), f.seek(-5, 2), f.read()))
        with opener(p, "r+b") as f:
            f.seek(1)
            f.write(b"E")
            f.truncate(8)
        with opener(p, "rb", buffering=0) as f:
            out.append((f.readall(), f.mode))
        with opener(p, "ab+") as f:
            f.write(b"!")
            f.seek(0)
            out.append(f.read())
        with pytest.raises(FileExistsError):
            opener(p, "x")
        with pytest.raises(ValueError):
            opener(p, "rw")
        with pytest.raises(FileNotFoundError):
            opener(str(tmp_path / "missing"))
        return out

    plain = scenario(open)
    os.remove(p)

    async def main() -> list[Any]:
        return await tame.call(scenario, tame.tame_open)

    assert run(main) == plain


def test_dispatcher_isinstance_and_unpatched_objects() -> None:
    from shardio.tame.patch import _PROXIES

    th = _PROXIES[threading]
    assert isinstance(threading.Event(), th.Event) and issubclass(threading.Event, th.Event)
    with TameSocket.from_socket(socket.socket()) as s:
        assert isinstance(s, _PROXIES[socket].socket)
    assert _PROXIES[select].epoll is select.epoll  # not intercepted: passes through
    assert _PROXIES[os].environ is os.environ
