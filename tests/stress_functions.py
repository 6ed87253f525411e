"""Shard-side code for the fabric stress and wake-up tests."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
import zlib

import shardio

# What each receiving shard has seen, per (receiver, source): next expected sequence
# number, messages, bytes; and every violation found (loss/duplication/reorder/corruption).
# Keyed by receiver too, because thread-backend shards share this module.
_seen: dict[tuple[int, int], list[int]] = {}
_violations: list[str] = []


def payload_for(source: int, sequence: int, size: int) -> bytes:
    """Deterministic contents, cheap to make and to check."""
    seed = (source * 1_000_003 + sequence).to_bytes(8, "little")
    return (seed * (size // 8 + 1))[:size]


def receive(source: int, sequence: int, crc: int, data: bytes) -> int:
    state = _seen.setdefault((shardio.this_shard(), source), [0, 0, 0])
    if sequence != state[0]:
        _violations.append(f"from {source}: got sequence {sequence}, expected {state[0]}")
    if zlib.crc32(data) != crc or data != payload_for(source, sequence, len(data)):
        _violations.append(f"from {source}: message {sequence} is corrupt")
    state[0] = sequence + 1
    state[1] += 1
    state[2] += len(data)
    return sequence


def message_size(rng: random.Random, sequence: int) -> int:
    """Mostly small messages; every 1000th is large (64 KiB to 1.5 MiB, larger than
    the test's 256 KiB rings), so fragments interleave with small messages."""
    if sequence % 1000 == 999:
        return rng.randint(64 << 10, 3 << 19)
    return int(2 ** rng.uniform(0, 12))  # 1 B .. 4 KiB, log-uniform


async def blast(destinations: list[int], count: int, window: int, seed: int) -> dict:
    """Send ``count`` messages to each destination, ``window`` in flight per destination."""
    me = shardio.this_shard()
    rng = random.Random(seed)
    sizes = [message_size(rng, i) for i in range(count)]

    async def to(destination: int) -> int:
        # Oldest first: a link answers in order, and waiting on the oldest costs O(1)
        # per message where asyncio.wait over the window costs O(window).
        in_flight: collections.deque = collections.deque()
        for sequence in range(count):
            data = payload_for(me, sequence, sizes[sequence])
            fut = shardio.submit_to(destination, receive, me, sequence, zlib.crc32(data), data)
            in_flight.append(fut)
            oldest = sequence - window + 1
            if oldest >= 0 and await in_flight.popleft() != oldest:
                _violations.append(f"to {destination}: a reply out of order")
        for f in in_flight:
            await f
        return count

    start = time.perf_counter()
    sent = await asyncio.gather(*(to(d) for d in destinations))
    return {"sent": sum(sent), "seconds": time.perf_counter() - start,
            "bytes": sum(sizes) * len(destinations)}


def report() -> dict:
    me = shardio.this_shard()
    return {"seen": {source: list(v) for (receiver, source), v in _seen.items()
                     if receiver == me},
            "violations": list(_violations), "pid": os.getpid()}


def reset() -> None:
    _seen.clear()
    _violations.clear()


def noop(value):
    return value


async def churn(peer: int, bursts: int, max_pause_us: float, seed: int, bound: float) -> dict:
    """Bursts of round trips separated by random pauses around the idle-poll window.

    Every round trip must finish within ``bound`` seconds: a lost wake-up leaves the
    peer asleep with a message in its ring, and nothing else would wake it.
    """
    rng = random.Random(seed)
    worst = 0.0
    count = 0
    slept = 0
    for _ in range(bursts):
        for _ in range(rng.randint(1, 4)):
            start = time.perf_counter()
            await asyncio.wait_for(shardio.submit_to(peer, noop, count), bound)
            worst = max(worst, time.perf_counter() - start)
            count += 1
        pause = rng.uniform(0, max_pause_us) / 1e6
        if pause > 0.0002:
            slept += 1
        await asyncio.sleep(pause)
    return {"round_trips": count, "worst": worst, "long_pauses": slept}


def stats() -> dict:
    s = shardio.current_reactor().stats
    return {"sleeps": s.sleeps, "wakeups": s.doorbell_wakeups}
