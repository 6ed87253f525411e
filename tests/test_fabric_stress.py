"""Stress of the fabric and of the sleep/wake protocol, on real shard processes."""

from __future__ import annotations

import concurrent.futures
import random
import zlib

import pytest
import stress_functions as sx

import shardio


def check_reports(group, expected_per_source: dict[int, dict[int, int]]) -> int:
    """Every receiver saw every source's messages exactly once, in order, intact."""
    total = 0
    for shard, per_source in expected_per_source.items():
        report = group.submit(shard, sx.report).result(timeout=30)
        assert report["violations"] == [], report["violations"][:10]
        for source, count in per_source.items():
            next_expected, messages, _ = report["seen"][source]
            assert (next_expected, messages) == (count, count), (shard, source)
            total += messages
    return total


def test_a_million_messages_between_process_shards(leak_check):
    """1,000,000 calls across two process shards (both directions at once), sizes
    1 B .. 1.5 MiB with rings of 256 KiB: no loss, duplication, corruption or
    reordering per pair."""
    per_direction = 500_000
    with shardio.ShardGroup(2, backend="process", ring_bytes=256 << 10,
                            idle_poll_us=200) as group:
        futures = [group.submit(0, sx.blast, [1], per_direction, 256, 1),
                   group.submit(1, sx.blast, [0], per_direction, 256, 2)]
        results = [f.result(timeout=400) for f in futures]
        assert [r["sent"] for r in results] == [per_direction, per_direction]
        total = check_reports(group, {1: {0: per_direction}, 0: {1: per_direction}})
        assert total == 1_000_000


def test_three_shards_all_pairs_and_the_outside(backend, leak_check):
    """Every ordered pair of shards plus owner->shard traffic from several threads."""
    count = 20_000 if backend == "process" else 5_000
    with shardio.ShardGroup(3, backend=backend, ring_bytes=64 << 10) as group:
        futures = [group.submit(s, sx.blast, [d for d in range(3) if d != s], count, 64, s)
                   for s in range(3)]

        owner = 3  # the owner endpoint's number in the receivers' bookkeeping

        def from_outside(destination):
            rng = random.Random(destination)
            pending = []
            for sequence in range(count // 4):
                data = sx.payload_for(owner, sequence, sx.message_size(rng, sequence))
                pending.append(group.submit(destination, sx.receive, owner, sequence,
                                            zlib.crc32(data), data))
                if len(pending) > 64:
                    pending.pop(0).result(timeout=60)
            for f in pending:
                f.result(timeout=60)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(from_outside, range(3)))
        for f in futures:
            assert f.result(timeout=300)["sent"] == 2 * count
        expected = {d: {s: count for s in range(3) if s != d} | {owner: count // 4}
                    for d in range(3)}
        check_reports(group, expected)


@pytest.mark.parametrize("backend_name,idle_poll_us", [("process", 200), ("process", 0),
                                                        ("thread", 0)])
def test_no_lost_wakeups_under_sleep_wake_churn(backend_name, idle_poll_us, leak_check):
    """Pauses straddle the idle-poll window, so the peer keeps falling asleep right
    around the moment the next message arrives; each round trip must still finish
    within a bound that a lost wake-up would break."""
    with shardio.ShardGroup(2, backend=backend_name, idle_poll_us=idle_poll_us) as group:
        before = group.submit(1, sx.stats).result(timeout=10)
        result = group.submit(0, sx.churn, 1, 6000, 3 * max(idle_poll_us, 100), 7, 2.0
                              ).result(timeout=300)
        after = group.submit(1, sx.stats).result(timeout=10)
    assert result["round_trips"] >= 6000
    assert result["worst"] < 2.0
    # The peer really did go to sleep and get woken by the doorbell, many times.
    assert after["wakeups"] - before["wakeups"] > 500


def test_no_lost_wakeups_from_outside(backend, leak_check):
    """Owner-to-shard churn: the shard sleeps between calls; each call must return."""
    rng = random.Random(3)
    import time

    with shardio.ShardGroup(1, backend=backend, idle_poll_us=200) as group:
        for i in range(1500):
            assert group.submit(0, sx.noop, i).result(timeout=2.0) == i
            time.sleep(rng.uniform(0, 600) / 1e6)
