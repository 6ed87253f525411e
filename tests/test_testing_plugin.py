"""The pytest plugin, run by pytest inside pytest (pytester): fixtures, options, leak checks."""

from __future__ import annotations

import os
import signal
from importlib.metadata import entry_points

pytest_plugins = ["pytester"]

# Once the package registers its pytest11 entry point, pytest loads the plugin by itself.
PLUGIN = ([] if any(ep.value == "shardio.testing.plugin" for ep in entry_points(group="pytest11"))
          else ["-p", "shardio.testing.plugin"])

FIXTURES = '''
import asyncio
import pytest
import shardio
from shardio.testing import Clock


def whoami():
    return shardio.this_shard(), shardio.shard_count()


async def main(peer, seconds):
    clock = Clock()
    clock.pause()
    task = asyncio.ensure_future(shardio.submit_to(peer, asyncio.sleep, seconds, "slept"))
    await clock.settle_async()
    clock.advance(seconds)
    return await task, shardio.this_shard()


def test_defaults(shard_group):
    assert (shard_group.shards, shard_group.backend) == (2, "process")
    assert shard_group.submit(1, whoami).result(timeout=10) == (1, 2)


@pytest.mark.shardio(shards=3, backend="thread", idle_poll_us=50)
def test_marker(shard_group):
    assert (shard_group.shards, shard_group.backend) == (3, "thread")
    assert shard_group.options.idle_poll_us == 50


@pytest.mark.shardio(shards=1, backend=["process", "thread"])
def test_every_backend(shard_group, request):
    assert shard_group.backend == request.node.callspec.id


@pytest.mark.parametrize("shardio_options", [{"shards": 1}, {"shards": 3}], indirect=True)
@pytest.mark.shardio(backend="thread")
def test_indirect(shard_group, shardio_options):
    assert shard_group.shards == shardio_options["shards"]


@pytest.mark.shardio(backend="thread")
def test_clock_fixture(shard_group, shardio_clock):
    shardio_clock.pause()
    nap = shard_group.submit(1, asyncio.sleep, 3600, "rested")
    shardio_clock.settle()
    shardio_clock.advance(3600)
    assert nap.result(timeout=1) == "rested"


@pytest.mark.shardio(backend=["process", "thread"], clock=True)
def test_run(shardio_run):
    assert shardio_run(main, 1, 3600) == ("slept", 0)


async def forever():
    await shardio.submit_to(1, asyncio.sleep, 3600)


@pytest.mark.shardio(backend=["process", "thread"], timeout=0.3)
def test_run_timeout(shardio_run):
    with pytest.raises(TimeoutError, match="forever did not finish on shard 0 within 0.3 s"):
        shardio_run(forever)
'''

LEAKS = '''
import os
import subprocess
import pytest

kept = []


@pytest.mark.shardio(backend="thread", leak_grace=0.2)
def test_leaks_an_fd(shard_group):
    kept.append(os.pipe())


@pytest.mark.shardio(backend="thread", leak_grace=0.2)
def test_leaks_a_child(shardio_run):
    child = subprocess.Popen(["sleep", "30"])
    with open("child.pid", "w") as f:
        f.write(str(child.pid))
    kept.append(child)


@pytest.mark.shardio(backend="thread", leak_grace=0.2)
def test_leaks_shared_memory(shard_group):
    kept.append(open(SHM, "w"))
    kept[-1].close()


@pytest.mark.shardio(backend="thread", leak_check=False)
def test_no_check_when_turned_off(shard_group):
    kept.append(os.pipe())


@pytest.mark.shardio(backend="process")
def test_clean_process_group(shard_group):
    assert shard_group.submit(1, os.getpid).result(timeout=10) != os.getpid()
'''


def test_fixtures_and_options(pytester):
    pytester.makepyfile(test_fixtures=FIXTURES)
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["*test_every_backend?process? PASSED*",
                                 "*test_every_backend?thread? PASSED*"])


def test_a_leaking_test_fails_at_teardown(pytester):
    shm = f"/dev/shm/shardio-plugin-test-{os.getpid()}"
    pytester.makepyfile(test_leaks=f"SHM = {shm!r}\n" + LEAKS)
    try:
        result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider")
    finally:
        if os.path.exists(shm):
            os.unlink(shm)
        pid_file = pytester.path / "child.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines_random([
        "*ERROR at teardown of test_leaks_an_fd*",
        "*the test left behind fds * -> pipe:*",
        "*ERROR at teardown of test_leaks_a_child*",
        "*the test left behind child processes*",
        "*ERROR at teardown of test_leaks_shared_memory*",
        f"*the test left behind /dev/shm entries ?'{os.path.basename(shm)}'?",
    ])


def test_another_users_shm_entries_are_not_leaks():
    """A database server of another user creates /dev/shm segments at any time."""
    from shardio.testing.plugin import LeakCheck

    check = LeakCheck()
    theirs = f"/dev/shm/shardio-plugin-other-user-{os.getpid()}"
    mine = f"/dev/shm/shardio-plugin-this-user-{os.getpid()}"
    try:
        for path in (theirs, mine):
            with open(path, "wb"):
                pass
        os.chown(theirs, 65534, 65534)  # nobody
        problems = check.leaks(timeout=0)
    finally:
        for path in (theirs, mine):
            os.unlink(path)
    assert problems == [f"/dev/shm entries ['{os.path.basename(mine)}']"], problems
