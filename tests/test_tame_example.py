"""examples/embed_blocking_store.py, run with its one command and driven over HTTP."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp
import pytest

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples",
    "embed_blocking_store.py",
)


def disk_base() -> str:
    for cand in ("/var/tmp", os.path.dirname(EXAMPLE)):
        if os.path.isdir(cand) and os.access(cand, os.W_OK):
            return cand
    return tempfile.gettempdir()


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_embed_blocking_store_serves_get_and_put(backend: str) -> None:
    data = tempfile.mkdtemp(prefix="shardio-example-", dir=disk_base())
    try:
        _serve_and_drive(data, backend)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _serve_and_drive(data: str, backend: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            EXAMPLE,
            "--port",
            "0",
            "--shards",
            "2",
            "--backend",
            backend,
            "--data",
            data,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []  # log lines (a stall warning on a loaded machine) may come first
        m = None
        while m is None and len(seen) < 200:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"http://([\d.]+):(\d+)", line)
        assert m, f"the example never printed its address: {''.join(seen)!r}"
        base = f"http://{m.group(1)}:{m.group(2)}"
        rng = random.Random(5)
        values = {
            f"key-{i}": rng.randbytes(rng.choice([0, 1, 4096, 100_000, 300_000])) for i in range(60)
        }

        async def drive() -> dict:
            async with aiohttp.ClientSession() as http:

                async def put(k: str, v: bytes) -> None:
                    async with http.put(f"{base}/kv/{k}", data=v) as r:
                        assert r.status == 204, await r.text()

                async def get(k: str) -> bytes | None:
                    async with http.get(f"{base}/kv/{k}") as r:
                        if r.status == 404:
                            return None
                        assert r.status == 200
                        return await r.read()

                await asyncio.gather(*(put(k, v) for k, v in values.items()))
                got = await asyncio.gather(*(get(k) for k in values))
                assert dict(zip(values, got, strict=True)) == values
                assert await get("never-written") is None
                await put("key-0", b"overwritten")
                assert await get("key-0") == b"overwritten"
                async with http.get(f"{base}/stats") as r:
                    return await r.json()

        stats = asyncio.run(drive())
        shards = stats["shards"]
        assert [s["shard"] for s in shards] == [0, 1]
        if backend == "process":
            assert len({s["pid"] for s in shards}) == 2 and proc.pid not in {
                s["pid"] for s in shards
            }
        writes = sum(s["file_io"]["write"] for s in shards if s["file_io"])
        fsyncs = sum(s["file_io"]["fsync"] for s in shards if s["file_io"])
        assert writes >= len(values) - 10 and fsyncs >= 2 * len(
            values
        )  # zero-byte values write nothing
        assert all(s["tame"]["free_stacks"] == s["tame"]["stacks"] for s in shards)
        # The server's own loop never waits on the store: it only awaits futures. Its
        # worst 1 ms-timer lag is a sanity bound here (a few ms on a quiet machine; the
        # shared 2-CPU CI machine can preempt the process for 100+ ms).
        assert stats["server_max_loop_lag_ms"] < 1000, stats["server_max_loop_lag_ms"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "stopped" in out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _children_of(proc.pid):
        time.sleep(0.1)
    assert not _children_of(proc.pid)


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids
