"""Scheduling groups across shards: a call made in a group runs in the same-named
group on the receiving shard (process and thread shards), and a group's metrics are
on the group's /metrics in valid Prometheus text."""

from __future__ import annotations

import asyncio
from typing import Any

import shardio
from shardio import tame

GROUP = shardio.SchedulingGroup("remote", 123)


def where_am_i() -> tuple[str | None, float | None]:
    """On the receiving shard: the group running this call, and its shares there."""
    name = shardio.scheduling.current_group_name()
    shares = None
    if name is not None:
        shares = next(s["shares"] for s in shardio.scheduling.stats() if s["group"] == name)
    return name, shares


async def where_am_i_later() -> tuple[str | None, str | None]:
    before = shardio.scheduling.current_group_name()
    await asyncio.sleep(0.001)
    return before, shardio.scheduling.current_group_name()


def from_a_stack() -> Any:
    return tame.wait(shardio.submit_to(1, where_am_i))


async def hop_in_group() -> dict[str, Any]:
    async def inside() -> dict[str, Any]:
        return {
            "call": await shardio.submit_to(1, where_am_i),
            "coroutine": await shardio.submit_to(1, where_am_i_later),
            "stack": await GROUP.call(from_a_stack),
        }

    seen = await GROUP.create_task(inside())
    seen["outside"] = await shardio.submit_to(1, where_am_i)
    return seen


def group_tasks(name: str) -> int:
    return next(s["tasks_processed"] for s in shardio.scheduling.stats() if s["group"] == name)


def test_cross_shard_calls_keep_their_group(backend: str) -> None:
    with shardio.ShardGroup(2, backend=backend) as group:
        seen = group.submit(0, hop_in_group).result(timeout=30)
        assert seen == {
            "call": ("remote", 123.0),  # made there on arrival, with the sender's shares
            "coroutine": ("remote", "remote"),  # every step of it, before and after awaits
            "stack": ("remote", 123.0),
            "outside": (None, None),
        }
        assert group.submit(1, group_tasks, "remote").result(timeout=10) >= 3


async def many_in_group(count: int) -> list[Any]:
    """``count`` calls made at once in GROUP: beyond the link's bound they wait, and
    are sent later, when replies make room."""

    async def inside() -> list[Any]:
        return list(await asyncio.gather(*(shardio.submit_to(1, where_am_i)
                                           for _ in range(count))))

    return await GROUP.create_task(inside())


def test_calls_held_back_by_the_bound_keep_their_group() -> None:
    from shardio.metrics import collect

    with shardio.ShardGroup(2, max_calls_per_peer=4) as group:
        seen = group.submit(0, many_in_group, 64).result(timeout=30)
        assert seen == [("remote", 123.0)] * 64
        waits = collect(group).value("shardio_fabric_bound_waits_total", shard="0", peer="1")
        assert waits >= 60  # 64 calls over a bound of 4: all but the first 4 waited


async def busy_groups() -> None:
    background = shardio.SchedulingGroup("background", 100)
    state = {"stop": False}

    def hog() -> None:
        while not state["stop"]:
            sum(range(2000))
            tame.checkpoint()

    task = asyncio.ensure_future(background.call(hog))
    while background.stats()["runtime_ms"] < 20:
        await asyncio.sleep(0.005)
    state["stop"] = True
    await task


def test_group_metrics_are_valid_prometheus_text() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with shardio.ShardGroup(2, backend="process") as group:
        for future in group.submit_to_all(busy_groups):
            future.result(timeout=30)
        text = shardio.metrics.collect(group).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "shardio_scheduler_runtime_ms": "counter",
        "shardio_scheduler_waittime_ms": "counter",
        "shardio_scheduler_starvetime_ms": "counter",
        "shardio_scheduler_tasks_processed": "counter",
        "shardio_scheduler_queue_length": "gauge",
        "shardio_scheduler_shares": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    samples = {
        (s.name, s.labels["shard"], s.labels["group"]): s.value
        for f in families.values()
        if f.name.startswith("shardio_scheduler")
        for s in f.samples
    }
    for shard in ("0", "1"):
        assert samples[("shardio_scheduler_runtime_ms_total", shard, "background")] >= 20
        assert samples[("shardio_scheduler_shares", shard, "background")] == 100
        assert samples[("shardio_scheduler_shares", shard, "default")] == 1000
        assert samples[("shardio_scheduler_tasks_processed_total", shard, "background")] > 0
        assert samples[("shardio_scheduler_runtime_ms_total", shard, "default")] > 0
        assert ("shardio_scheduler_queue_length", shard, "background") in samples
