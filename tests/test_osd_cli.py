"""The OSD command line as a Unix tool: where ``serve`` listens, ``ls`` in a pipeline.

Real processes: ``python -m shardio.osd serve`` in the background, the
listening sockets read from /proc/net/tcp{,6}, ``ls`` piped into ``head``
through a shell and into a pipe whose reader has already gone.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from shardio.osd.client import AsyncClient, Client

OSD = [sys.executable, "-m", "shardio.osd"]


@contextmanager
def serving(data: str, *extra: str) -> Iterator[tuple[str, list[int]]]:
    """A ``serve`` process on free ports: yields (the host it printed, every port)."""
    proc = subprocess.Popen(
        [*OSD, "serve", "--shards", "2", "--backend", "thread", "--data", data, "--port", "0"]
        + list(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"shared port ([\d.]+):(\d+), shard ports (\S+), (\S+);", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        ports = [int(m.group(2))] + [int(a.rsplit(":", 1)[1]) for a in m.group(3, 4)]
        yield m.group(1), ports
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def listening(ports: list[int]) -> set[tuple[str, str, int]]:
    """(table, local address in /proc's hex, port) of every listening socket on ports."""
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            next(f)
            for row in f:
                fields = row.split()
                address, port_hex = fields[1].rsplit(":", 1)
                if fields[3] == "0A" and int(port_hex, 16) in ports:  # 0A: LISTEN
                    found.add((table, address, int(port_hex, 16)))
    return found


def test_serve_listens_on_loopback_only_unless_told(tmp_path) -> None:  # noqa: ANN001
    with serving(str(tmp_path / "a")) as (host, ports):
        assert host == "127.0.0.1"
        sockets = listening(ports)
        # the shared port once per shard (SO_REUSEPORT), each shard port once
        assert len(sockets) == len(ports)
        assert {(table, address) for table, address, _ in sockets} == {("tcp", "0100007F")}

    # --host moves it (127.0.0.2 is loopback too, and not what the default binds)
    with serving(str(tmp_path / "b"), "--host", "127.0.0.2") as (host, ports):
        assert host == "127.0.0.2"
        assert {address for _, address, _ in listening(ports)} == {"0200007F"}
        with Client("127.0.0.2", ports[0]) as c:
            c.put("moved", b"here")
            assert c.get("moved") == b"here"


def test_ls_into_a_pipeline_ends_quietly(tmp_path) -> None:  # noqa: ANN001
    with serving(str(tmp_path)) as (host, ports):
        async def put_all() -> None:  # 3000 lines: more than a pipe buffers
            async with await AsyncClient.connect(host, ports[0]) as c:
                for first in range(0, 3000, 100):
                    await asyncio.gather(
                        *(c.put(f"object-name-{i:06d}", b"") for i in range(first, first + 100))
                    )

        asyncio.run(put_all())
        addr = f"{host}:{ports[0]}"

        # a reader that has already gone: the write fails at once, as for `yes | true`
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            r = subprocess.run(
                [*OSD, "ls", "--addr", addr], stdout=write_end, stderr=subprocess.PIPE, timeout=60
            )
        finally:
            os.close(write_end)
        assert r.stderr == b""
        assert r.returncode == -signal.SIGPIPE  # killed by SIGPIPE, like any Unix filter

        # and through a shell: head's lines, nothing on stderr, the shell sees 141
        r = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {' '.join(OSD)} ls --addr {addr} | head -n 3"],
            capture_output=True,
            timeout=60,
        )
        assert r.stdout.decode().split() == [f"object-name-{i:06d}" for i in range(3)]
        assert r.stderr == b""
        assert r.returncode in (0, 128 + signal.SIGPIPE), r.returncode

        # read to the end, it exits 0 with every name
        r = subprocess.run([*OSD, "ls", "--addr", addr], capture_output=True, timeout=60)
        assert r.returncode == 0 and r.stderr == b""
        assert len(r.stdout.split()) == 3000


def test_serve_refuses_a_bad_quota_or_stall_threshold_and_serves_with_them_off(
    tmp_path,  # noqa: ANN001
) -> None:
    for option, value in (("--tame-quota-ms", "-1"), ("--stall-threshold-ms", "inf"),
                          ("--tame-quota-ms", "soon")):  # fmt: skip
        r = subprocess.run([*OSD, "serve", "--data", str(tmp_path), option, value],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2, r
        assert option in r.stderr and value in r.stderr, r.stderr
    # 0 turns each off: the shards still serve
    off = ("--tame-quota-ms", "0", "--stall-threshold-ms", "0")
    with serving(str(tmp_path / "off"), *off) as (host, ports):
        c = Client(host, ports[0])
        try:
            assert c.put("q", b"quota off") == 9
            assert c.get("q") == b"quota off"
        finally:
            c.close()
