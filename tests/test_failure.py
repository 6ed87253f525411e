"""Failures and lifetimes: kill -9 of a shard, death of the parent, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import shard_functions as sf

import shardio

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_kill_9_of_a_shard_mid_load(leak_check):
    group = shardio.ShardGroup(3, backend="process").start()
    try:
        victim = group.pids[1]
        inner = group.submit(0, sf.load_until_dead, 1)  # shard 0 -> shard 1 load
        outside_errors: list = []
        stop_outside = threading.Event()

        def outside_load():  # owner -> shard 1 load, from a thread of the parent
            while not stop_outside.is_set():
                futures = [group.submit(1, sf.add, i) for i in range(16)]
                for future in futures:
                    try:
                        future.result(timeout=5)
                    except shardio.ShardDied as error:
                        outside_errors.append((time.monotonic(), error))
                        return
                    except Exception as error:  # a hang or anything else is a failure
                        outside_errors.append((time.monotonic(), error))
                        return

        loader = threading.Thread(target=outside_load)
        loader.start()
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        report = inner.result(timeout=10)
        loader.join(timeout=10)
        stop_outside.set()

        assert report["completed"] > 100, "the load was not running when the shard died"
        assert "ShardDied" in report["error"] and "SIGKILL" in report["error"]
        assert report["failed_at"] - killed_at < 1.0
        # a later call is refused at once, and says how the shard died, too
        assert "ShardDied" in report["later"] and "SIGKILL" in report["later"]
        assert report["later_failed_at_once"]
        when, error = outside_errors[0]
        assert isinstance(error, shardio.ShardDied) and error.shard == 1
        assert when - killed_at < 1.0
        # later submits fail fast, from outside too
        refused = group.submit(1, sf.add, 1)
        assert refused.done()  # refused on the spot, not after a wait
        with pytest.raises(shardio.ShardDied, match=r"shard 1 died \(.*SIGKILL"):
            refused.result(timeout=0)
        assert not group.is_alive(1) and group.is_alive(2)
        # the survivors keep serving, among themselves too
        assert group.submit(2, sf.add, 40, b=2).result(timeout=5) == 42
        assert group.submit(0, sf.hop_to, 2, sf.add, 1, 1).result(timeout=5) == 2
    finally:
        group.stop()
    assert not group.running


def _run_script(body: str, **kwargs) -> subprocess.Popen:
    script = textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_shards_exit_when_the_parent_dies():
    parent = _run_script("""
        import sys, time, shardio, shard_functions as sf
        group = shardio.ShardGroup(2).start()
        group.submit(0, sf.sleep_then, 1, 30)   # a shard busy in a call
        print(*group.pids, flush=True)
        time.sleep(60)
    """)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(not _gone(pid) for pid in pids)
        parent.kill()
        parent.wait(timeout=10)
        assert _wait_gone(pids, 5.0), "shard processes outlived their parent"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        parent.stderr.close()


def test_ctrl_c_stops_the_group_cleanly():
    before = set(os.listdir("/dev/shm"))
    parent = _run_script("""
        import time, shardio, shard_functions as sf
        with shardio.ShardGroup(2) as group:
            print(*group.pids, flush=True)
            while True:
                group.submit(1, sf.sleep_then, 1, 0.2).result()
    """, start_new_session=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        time.sleep(0.3)
        os.killpg(parent.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        out, err = parent.communicate(timeout=20)
    finally:
        parent.kill()
        parent.wait()
    assert parent.returncode != 0 and "KeyboardInterrupt" in err
    assert "Traceback" in err and "shard" not in err.split("KeyboardInterrupt")[-1]
    assert _wait_gone(pids, 5.0)
    assert set(os.listdir("/dev/shm")) == before


def test_keyboard_interrupt_inside_the_block(backend, leak_check):
    with pytest.raises(KeyboardInterrupt), shardio.ShardGroup(2, backend=backend) as group:
        group.submit(0, sf.add, 1).result(timeout=10)
        raise KeyboardInterrupt


def test_stop_after_a_crash_and_stop_twice(leak_check):
    group = shardio.ShardGroup(2).start()
    os.kill(group.pids[0], signal.SIGKILL)
    with pytest.raises(shardio.ShardDied):
        group.submit(0, sf.sleep_then, 1, 0.5).result(timeout=5)
    group.stop()
    group.stop()


def test_stuck_shard_is_killed_at_stop(leak_check):
    group = shardio.ShardGroup(1, stop_timeout=1.0).start()
    group.submit(0, sf.block_forever)  # blocks the reactor thread for good
    started = time.monotonic()
    group.stop()
    assert time.monotonic() - started < 10


def test_shard_output_carries_its_number():
    parent = _run_script("""
        import shardio, shard_functions as sf
        with shardio.ShardGroup(2) as group:
            group.submit(1, sf.say, "hello from a shard").result()
    """)
    out, err = parent.communicate(timeout=60)
    assert parent.returncode == 0, err
    assert "[shard 1] hello from a shard" in out
    assert "[shard 1] and on stderr" in err
    assert "shard 1 WARNING tests.log: a log record" in err


def test_process_shards_are_pinned_when_there_are_enough_cpus(leak_check):
    cpus = sorted(os.sched_getaffinity(0))
    shards = min(2, len(cpus))
    with shardio.ShardGroup(shards) as group:
        pinned = [group.submit(i, sf.affinity).result(timeout=10) for i in range(shards)]
    assert pinned == [[cpu] for cpu in cpus[:shards]]
    with shardio.ShardGroup(len(cpus) + 1) as group:  # more shards than CPUs: no pinning
        assert group.submit(0, sf.affinity).result(timeout=10) == cpus


def test_start_from_a_parent_running_threads_and_a_loop(leak_check):
    """Spawn (not fork) makes this safe: a lock held by another thread and a running
    event loop in the parent do not leak into the shards."""
    import asyncio

    held = threading.Lock()
    held.acquire()  # a forked child would inherit this lock locked
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(lambda: stop.is_set(), True)])
    spinner.start()

    async def main():
        group = shardio.ShardGroup(2).start()  # deliberately synchronous, inside the loop
        try:
            return await asyncio.gather(*(group.call(i, sf.add, i, b=1) for i in range(2)))
        finally:
            group.stop()

    try:
        assert asyncio.run(main()) == [1, 2]
    finally:
        stop.set()
        spinner.join()
        held.release()
