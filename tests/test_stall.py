"""The stall detector reports a blocked reactor, with its stack, and only then."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from test_failure import TESTS


def _run(body: str) -> tuple[str, str]:
    import os

    env = dict(os.environ, PYTHONPATH=TESTS)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_a_blocking_sleep_in_a_coroutine_is_reported_with_its_stack():
    out, err = _run("""
        import shardio, shard_functions as sf
        with shardio.ShardGroup(2, stall_threshold_ms=25) as group:
            print(group.submit(1, sf.stall_in_coroutine, 0.2).result())
    """)
    assert out.strip() == "1"  # counted by the watchdog while the call was still blocked
    assert "reactor stalled for" in err and "ms on shard 1" in err
    assert "shard 1 WARNING shardio.stall" in err  # the record names its shard
    assert "in stall_in_coroutine" in err and "time.sleep(seconds)" in err


def test_thread_backend_and_the_stall_counter():
    out, err = _run("""
        import shardio, shard_functions as sf
        with shardio.ShardGroup(1, backend="thread", stall_threshold_ms=25) as group:
            group.submit(0, sf.stall_in_coroutine, 0.2).result()
            print(group.submit(0, sf.stall_count).result())
    """)
    assert int(out.strip()) == 1
    assert "reactor stalled for" in err


def test_many_short_tasks_are_not_a_stall():
    # The tasks take microseconds each, the batch far more than 100 ms: a detector that
    # took the batch for one stall reports one every time.  The OS descheduling the shard
    # for 100 ms on a loaded machine is indistinguishable from a stall, but it is rare:
    # one clean batch out of three shows the tasks themselves are not counted.
    out, err = _run("""
        import shardio, shard_functions as sf
        with shardio.ShardGroup(1, stall_threshold_ms=100) as group:
            for attempt in range(3):
                before = group.submit(0, sf.stall_count).result()
                print(group.submit(0, sf.many_short_tasks, 20000).result())
                if group.submit(0, sf.stall_count).result() == before:
                    print("clean")
                    break
    """)
    assert out.split()[-2:] == ["20000", "clean"], out + err
