"""Helpers for the OSD tests: raw protocol sockets, shard RSS, free ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from shardio import tame
from shardio.osd.protocol import Frame, FrameDecoder, FrameError


def free_port() -> int:
    """A TCP port that was free a moment ago (for services that need a number up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RawConn:
    """A blocking socket speaking raw frames: for fuzzing and protocol-level checks."""

    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.timeout = timeout
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frames(self, n: int) -> list[Frame]:
        """Read until n frames arrived (AssertionError on EOF or timeout first)."""
        out: list[Frame] = []
        deadline = time.monotonic() + self.timeout
        while len(out) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"timed out after {len(out)} of {n} replies") from None
            if not data:
                raise AssertionError(f"EOF after {len(out)} of {n} replies")
            out.extend(self.decoder.feed(data))
        return out

    def read_until_close(self) -> tuple[list[Frame], bool]:
        """Read frames until the server closes; (frames, closed). closed False on timeout."""
        out: list[Frame] = []
        deadline = time.monotonic() + self.timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return out, False
            except ConnectionResetError:
                return out, True
            if not data:
                return out, True
            try:
                out.extend(self.decoder.feed(data))
            except FrameError:
                return out, True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def by_tid(frames: Iterable[Frame]) -> dict[int, Frame]:
    return {f.tid: f for f in frames}


@contextmanager
def shard_tame_config(osd: Any, shard: int = 0, **options: Any) -> Iterator[None]:
    """``tame.configure(**options)`` on one shard of a running OSD, for a with block;
    then the defaults again (the quota, and CPU accounting off)."""
    assert osd.group is not None
    osd.group.submit(shard, tame.configure, **options).result(10)
    try:
        yield
    finally:
        osd.group.submit(
            shard, tame.configure, quota=tame.DEFAULT_QUOTA, account_cpu=False
        ).result(10)
