"""Timeouts and lost messages, tested on the virtual clock: no real waiting."""

from __future__ import annotations

import asyncio
import time

import pytest
import shard_functions as sf

import shardio
from shardio.testing import intercept


async def call_with_retry(target: int, attempts: int, timeout: float) -> tuple[int, int]:
    """A caller's usual defence against a lost message: a timeout and a retry."""
    for attempt in range(attempts):
        try:
            return attempt, await asyncio.wait_for(shardio.submit_to(target, sf.add, 20, 22),
                                                   timeout)
        except TimeoutError:
            continue
    raise TimeoutError(f"all {attempts} attempts were lost")


@pytest.mark.shardio(shards=2, backend=["process", "thread"])
def test_a_lost_call_times_out_and_the_retry_gets_through(shard_group, shardio_clock):
    started = time.monotonic()
    with intercept(shard_group) as net:
        lost = net.drop(0, 1, net.match(func=sf.add), count=1)
        shardio_clock.pause()
        result = shard_group.submit(0, call_with_retry, 1, 3, 30.0)
        assert lost.result(timeout=10).args == (20, 22)  # the first attempt was lost
        shardio_clock.settle()
        assert not result.done()  # still waiting for its timeout
        shardio_clock.advance(30)
        assert result.result(timeout=10) == (1, 42)
    assert time.monotonic() - started < 10  # 30 s of timeout, in virtual time


@pytest.mark.shardio(shards=2, backend=["process", "thread"])
def test_every_attempt_lost_fails_after_the_last_timeout(shard_group, shardio_clock):
    with intercept(shard_group) as net:
        net.drop(0, 1, net.match(func=sf.add))
        shardio_clock.pause()
        result = shard_group.submit(0, call_with_retry, 1, 3, 5.0)
        for _ in range(3):
            shardio_clock.settle()
            assert not result.done()
            shardio_clock.advance(5)
        with pytest.raises(TimeoutError, match="all 3 attempts were lost"):
            result.result(timeout=10)
