"""End to end: many clients, many objects, every byte verified through both routes; the CLI.

Objects of many sizes (empty, sub-block, multi-block, larger than the
client's read chunk, written piecewise at offsets) are written by many
concurrent clients and read back by others, straight from the owning shard
and through the shared port (where about half the requests hop), with the
asyncio client and the blocking one. Then the command line: ``serve``,
``load``, ``get``, ``put``, ``stat``, ``ls``, ``bench`` and ``demo`` as a
user would run them.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shardio.osd.client import READ_CHUNK, AsyncClient, Client
from shardio.osd.loadgen import content
from shardio.osd.server import OSDServer

CLIENTS = 12
OBJECTS_PER_CLIENT = 150
SIZES = [0, 1, 100, 4095, 4096, 4097, 20_000, 65_536, 200_000]


def sizes_for(name: str) -> int:
    return SIZES[sum(name.encode()) % len(SIZES)]


@pytest.fixture(scope="module")
def osd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OSDServer]:
    with OSDServer(tmp_path_factory.mktemp("osd-e2e"), shards=2) as server:
        yield server


def test_many_clients_every_byte_verified_both_routes(osd: OSDServer) -> None:
    assert osd.address is not None

    async def body() -> tuple[int, int, int]:
        clients = [
            await AsyncClient.connect(*osd.address, route="direct" if i % 2 else "shared")
            for i in range(CLIENTS)
        ]
        try:
            owned = [
                [f"e2e-c{i}-{j:04d}" for j in range(OBJECTS_PER_CLIENT)] for i in range(CLIENTS)
            ]

            async def write_all(c: AsyncClient, names: list[str]) -> None:
                for name in names:
                    await c.put(name, content(name, sizes_for(name)))

            await asyncio.gather(*(write_all(c, n) for c, n in zip(clients, owned, strict=True)))

            # a large object written piecewise, out of order, across READ_CHUNK boundaries
            big_size = 2 * READ_CHUNK + 12_345
            big = content("e2e-big", big_size)
            pieces = list(range(0, big_size, 300_000))
            random.Random(7).shuffle(pieces)
            await asyncio.gather(
                *(
                    clients[k % CLIENTS].write("e2e-big", big[off : off + 300_000], off)
                    for k, off in enumerate(pieces)
                )
            )

            hops0 = osd.total_stats()["hops_out"]
            checked = 0
            mismatched: list[str] = []

            async def read_others(k: int) -> None:
                nonlocal checked
                c = clients[k]
                victim = owned[(k + 1) % CLIENTS] + owned[(k + 5) % CLIENTS]
                got = await asyncio.gather(*(c.get(n) for n in victim))
                for n, data in zip(victim, got, strict=True):
                    checked += 1
                    if data != content(n, sizes_for(n)):
                        mismatched.append(n)
                if await c.get("e2e-big") != big:
                    mismatched.append("e2e-big")

            await asyncio.gather(*(read_others(k) for k in range(CLIENTS)))
            hops = osd.total_stats()["hops_out"] - hops0
            assert not mismatched, mismatched[:10]
            return checked, hops, big_size
        finally:
            for c in clients:
                await c.close()

    checked, hops, _ = asyncio.run(body())
    assert checked == CLIENTS * 2 * OBJECTS_PER_CLIENT
    # the shared-port half of the reads hop whenever the accepting shard is not the owner
    assert hops > checked // 8, hops

    # blocking clients in threads, pipelined, both routes, at the same time
    errors: list[str] = []

    def blocking_reader(route: str, k: int) -> None:
        names = [f"e2e-c{k}-{j:04d}" for j in range(OBJECTS_PER_CLIENT)]
        try:
            with Client(*osd.address, route=route) as c:  # type: ignore[arg-type]
                for name, data in zip(names, c.read_many(names), strict=True):
                    if data != content(name, sizes_for(name)):
                        errors.append(f"{route} {name}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{route}: {exc!r}")

    threads = [
        threading.Thread(target=blocking_reader, args=(r, k))
        for k, r in enumerate(["direct", "shared"] * 3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]


# -- the command line ------------------------------------------------------------------------


def cli(*args: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardio.osd", *args],
        capture_output=True,
        timeout=timeout,
        input=input,
        check=False,
    )


def test_cli_serve_load_get_put_stat_ls_bench(tmp_path) -> None:  # noqa: ANN001
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardio.osd",
            "serve",
            "--shards",
            "2",
            "--data",
            str(data),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"shared port ([\d.]+):(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        addr = f"{m.group(1)}:{m.group(2)}"

        r = cli("load", "--addr", addr, "--objects", "300", "--size", "5000", "--verify")
        assert r.returncode == 0, r.stderr
        assert b"loaded 300 objects" in r.stdout and b"verified 300/300" in r.stdout

        r = cli("get", "--addr", addr, "obj-00000042")
        assert r.returncode == 0 and r.stdout == content("obj-00000042", 5000)

        r = cli("put", "--addr", addr, "greeting", input=b"hello from stdin")
        assert r.returncode == 0, r.stderr
        r = cli("get", "--addr", addr, "greeting", "--offset", "6", "--length", "4")
        assert r.stdout == b"from"
        r = cli("stat", "--addr", addr, "greeting")
        assert re.search(rb"size 16, version \d+, pg \d+, shard [01]", r.stdout), r.stdout

        r = cli("get", "--addr", addr, "no-such-object")
        assert r.returncode == 1 and b"ENOENT" in r.stderr

        r = cli("ls", "--addr", addr)
        listed = r.stdout.decode().split()
        assert len(listed) == 301 and "greeting" in listed

        r = cli(
            "bench",
            "--addr",
            addr,
            "--objects",
            "300",
            "--seconds",
            "1",
            "--rate",
            "500",
            "--closed",
            "--length",
            "5000",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout.decode()
        assert "closed loop" in out and "open loop at 500/s" in out and "p99.9" in out

        r = cli(
            "bench", "--addr", addr, "--objects", "300", "--seconds", "0.5", "--route", "shared"
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "stopped" in out
    # the data survives: a second server on the same directory has everything
    with OSDServer(data, shards=2) as again, Client(*again.address) as c:
        assert c.get("greeting") == b"hello from stdin"
        assert c.get("obj-00000299") == content("obj-00000299", 5000)


def test_cli_demo_runs_clean(tmp_path) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    r = cli("demo", "--objects", "400", "--seconds", "1.5", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "all checks passed" in out
    assert "verified 400/400 objects read straight from their shard" in out
    assert "400/400 through the shared port" in out
    assert "p99.9" in out and "cross-shard hops" in out
    assert "stopped cleanly" in out
    assert time.monotonic() - t0 < 60
    assert not [
        p
        for p in os.listdir("/tmp")
        if p.startswith("shardio-osd-demo-") and os.path.getmtime(os.path.join("/tmp", p)) >= t0 - 1
    ]


def test_cli_demo_ctrl_c_stops_cleanly() -> None:
    """Ctrl-C in the middle of the demo: the OSD stops, the temp dir goes, exit code 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardio.osd", "demo", "--objects", "300", "--seconds", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"data in (\S+)", first)
        assert m, first
        data_dir = m.group(1)
        for line in proc.stdout:  # type: ignore[union-attr]
            if "verified" in line:
                break
        time.sleep(0.5)  # inside the latency runs
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "stopped cleanly" in out and "interrupted" in err
    assert not os.path.exists(data_dir)
