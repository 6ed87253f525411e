"""What every tame stack waits on: dump_stacks on real shards, and in stall reports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import shardio
from shardio import tame

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_dump_from_the_owner_names_what_each_stack_waits_on() -> None:
    import tame_dump_functions as fn

    with shardio.ShardGroup(1, stall_threshold_ms=None) as group:
        assert group.submit(0, tame.dump_stacks).result(timeout=60) == []  # nothing busy
        assert group.submit(0, fn.park_stacks).result(timeout=60) == 5
        dumps = group.submit(0, tame.dump_stacks).result(timeout=60)
        by_function = {d.function.rsplit(".", 1)[-1]: d for d in dumps}
        assert {"_hold_lock", "_wait_lock", "_sleep_long", "_wait_future", "_join_thread"} <= set(
            by_function
        ), [str(d) for d in dumps]
        assert by_function["_hold_lock"].waits_on == "event"
        assert by_function["_wait_lock"].waits_on == "lock"
        assert "tame Lock locked" in by_function["_wait_lock"].target
        assert by_function["_sleep_long"].waits_on == "timer"
        assert by_function["_sleep_long"].target == "60"
        assert by_function["_wait_future"].waits_on == "future"
        assert by_function["_join_thread"].waits_on == "thread"
        assert "sleeper-thread" in by_function["_join_thread"].target
        for d in dumps:
            assert d.state == "parked" and d.seconds > 0.0, str(d)
            assert any(d.function.rsplit(".", 1)[-1] in line for line in d.python_stack), str(d)
        text = tame.format_dumps(dumps)
        assert "parked on lock" in text and "_wait_lock" in text
        outcomes = group.submit(0, fn.release_stacks).result(timeout=60)
        assert outcomes[:2] == ["held", "locked"] and outcomes[3] == "resolved"
        assert outcomes[2] == outcomes[4] == "CancelledError"
        assert group.submit(0, tame.dump_stacks).result(timeout=60) == []


def test_a_stall_report_lists_the_busy_tame_stacks() -> None:
    body = """
        import shardio, tame_dump_functions as fn
        with shardio.ShardGroup(1, stall_threshold_ms=25) as group:
            group.submit(0, fn.park_stacks).result(timeout=60)
            group.submit(0, fn.block_reactor_on_a_stack, 0.3).result(timeout=60)
            group.submit(0, fn.release_stacks).result(timeout=60)
    """
    env = dict(os.environ, PYTHONPATH=TESTS)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "reactor stalled for" in err and "time.sleep(seconds)" in err
    assert "busy tame stacks:" in err, err
    assert "running tame_dump_functions._blocking_sleep" in err, err
    assert "parked on lock" in err and "parked on timer 60" in err, err
