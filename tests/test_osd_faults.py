"""Faults: kill -9 of a shard process under load, then a restart on the same data.

While clients write and read through both routes, one shard process gets
SIGKILL. Requests for that shard's placement groups must fail promptly with
a client error (connection error, or ESHUTDOWN from a surviving shard that
tried the hop) -- never hang until a timeout; the other shard keeps serving
its pgs through both routes. After the OSD is stopped and started again on
the same directory, every write that was acknowledged reads back verified.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from shardio.osd.client import (
    AsyncClient,
    OSDClientError,
    OSDConnectionError,
    OSDTimeout,
    ShardUnavailable,
)
from shardio.osd.loadgen import content
from shardio.osd.server import OSDServer

SIZE = 6000
TIMEOUT = 8.0  # per request; a hang would show up as OSDTimeout


class Load:
    """Writers and readers; every outcome recorded with its time and target shard."""

    def __init__(self, osd: OSDServer) -> None:
        assert osd.osdmap is not None
        self.map = osd.osdmap
        self.acked: dict[str, int] = {}  # name -> size
        self.outcomes: list[tuple[float, str, int, str]] = []  # (time, kind, shard, result)
        self.stop = False

    def record(self, kind: str, name: str, result: str) -> None:
        self.outcomes.append((time.monotonic(), kind, self.map.shard_for(name), result))

    async def writer(self, client: AsyncClient, tag: str) -> None:
        i = 0
        while not self.stop:
            name = f"kill-{tag}-{i:06d}"
            i += 1
            try:
                await client.put(name, content(name, SIZE))
            except OSDTimeout:
                self.record("put", name, "timeout")
            except (OSDConnectionError, ShardUnavailable) as exc:
                self.record("put", name, type(exc).__name__)
                await asyncio.sleep(0.005)
            except OSDClientError as exc:
                self.record("put", name, f"other:{exc!r}")
            else:
                self.acked[name] = SIZE
                self.record("put", name, "ok")

    async def reader(self, client: AsyncClient, names: list[str]) -> None:
        i = 0
        while not self.stop:
            name = names[i % len(names)]
            i += 1
            try:
                data = await client.read(name, 0, SIZE)
            except OSDTimeout:
                self.record("read", name, "timeout")
            except (OSDConnectionError, ShardUnavailable) as exc:
                self.record("read", name, type(exc).__name__)
                await asyncio.sleep(0.005)
            except OSDClientError as exc:
                self.record("read", name, f"other:{exc!r}")
            else:
                self.record("read", name, "ok" if data == content(name, SIZE) else "CORRUPT")


def test_kill_9_of_a_shard_under_load_then_restart(tmp_path) -> None:  # noqa: ANN001
    osd = OSDServer(tmp_path, shards=2, stop_timeout=10)
    osd.start()
    try:
        assert osd.osdmap is not None and osd.address is not None
        preload = [f"pre-{i:04d}" for i in range(200)]
        load = Load(osd)

        async def body() -> float:
            direct = await AsyncClient.connect(*osd.address, timeout=TIMEOUT)
            shared = await AsyncClient.connect(*osd.address, route="shared", timeout=TIMEOUT)
            try:
                await asyncio.gather(*(direct.put(n, content(n, SIZE)) for n in preload))
                for n in preload:
                    load.acked[n] = SIZE
                tasks = (
                    [asyncio.ensure_future(load.writer(direct, f"d{k}")) for k in range(4)]
                    + [asyncio.ensure_future(load.writer(shared, f"s{k}")) for k in range(2)]
                    + [
                        asyncio.ensure_future(load.reader(direct, preload)),
                        asyncio.ensure_future(load.reader(shared, preload[::-1])),
                    ]
                )
                await asyncio.sleep(0.8)
                killed_at = time.monotonic()
                osd.kill_shard(1)  # SIGKILL
                await asyncio.sleep(2.0)
                load.stop = True
                # nothing hangs: every request in flight completes or fails well within TIMEOUT
                await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT / 2)
                return killed_at
            finally:
                await direct.close()
                await shared.close()

        killed_at = asyncio.run(body())
        deadline = time.monotonic() + 5
        while osd.is_alive(1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not osd.is_alive(1) and osd.is_alive(0)
    finally:
        t_stop = time.monotonic()
        osd.stop()
        stop_seconds = time.monotonic() - t_stop

    outcomes = load.outcomes
    results = Counter(r for *_, r in outcomes)
    assert results["timeout"] == 0, f"requests hung until their timeout: {results}"
    assert results["CORRUPT"] == 0
    assert not [r for r in results if r.startswith("other:")], results
    settle = killed_at + 0.5  # in-flight requests at the kill may still complete
    after = [(kind, shard, r) for t, kind, shard, r in outcomes if t > settle]
    on_dead = Counter(r for kind, shard, r in after if shard == 1)
    on_live = Counter((kind, r) for kind, shard, r in after if shard == 0)
    assert on_dead and set(on_dead) <= {"OSDConnectionError", "ShardUnavailable"}, on_dead
    assert on_live[("put", "ok")] > 10 and on_live[("read", "ok")] > 10, on_live
    assert set(r for _, r in on_live) == {"ok"}, on_live
    assert stop_seconds < 15

    # restart on the same data: every acknowledged write reads back verified
    with OSDServer(tmp_path, shards=2) as again:
        assert again.address is not None

        async def check() -> list[str]:
            async with await AsyncClient.connect(*again.address) as c:
                names = sorted(load.acked)
                got = await asyncio.gather(*(c.get(n) for n in names), return_exceptions=True)
                return [
                    n
                    for n, g in zip(names, got, strict=True)
                    if isinstance(g, BaseException) or g != content(n, SIZE)
                ]

        bad = asyncio.run(check())
    assert not bad, f"{len(bad)} acknowledged writes lost or corrupt, e.g. {bad[:5]}"
    print(f"{len(load.acked)} acknowledged writes verified after restart; outcomes {dict(results)}")


@pytest.mark.parametrize("route", ["direct", "shared"])
def test_requests_to_a_dead_shard_fail_fast(tmp_path, route: str) -> None:  # noqa: ANN001
    """With shard 1 dead, its objects fail at once (no timeout) and shard 0's still work."""
    with OSDServer(tmp_path, shards=2) as osd:
        assert osd.osdmap is not None and osd.address is not None
        on0 = next(f"n{i}" for i in range(100) if osd.osdmap.shard_for(f"n{i}") == 0)
        on1 = next(f"n{i}" for i in range(100) if osd.osdmap.shard_for(f"n{i}") == 1)

        async def body() -> None:
            async with await AsyncClient.connect(*osd.address, route=route, timeout=30) as c:
                await c.put(on0, b"zero")
                await c.put(on1, b"one")
                osd.kill_shard(1)
                deadline = time.monotonic() + 5
                while osd.is_alive(1) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)  # the survivors hear of the death
                for _ in range(5):
                    t0 = time.monotonic()
                    with pytest.raises((OSDConnectionError, ShardUnavailable)):
                        await c.read(on1)
                    assert time.monotonic() - t0 < 5
                    assert await c.read(on0) == b"zero"

        asyncio.run(body())
