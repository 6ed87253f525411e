"""The shardio pytest plugin: shard groups as fixtures, with leak checks.

Fixtures:

* ``shard_group`` -- a started :class:`~shardio.ShardGroup`, stopped after the test;
* ``shardio_run`` -- ``shardio_run(main, *args, **kwargs)`` starts a fresh
  group, runs ``main`` (usually async) on shard 0, stops the group and
  returns ``main``'s result;
* ``shardio_clock`` -- a :class:`~shardio.testing.Clock` on ``shard_group``
  (asking for it makes ``shard_group`` a virtual-time group).

Configure them with the ``shardio`` marker (defaults shown)::

    @pytest.mark.shardio(shards=2, backend="process", clock=False, timeout=60.0,
                         leak_check=True, leak_grace=2.0, **shard_group_options)

``backend`` may be a list, ``backend=["process", "thread"]``, which runs the
test once per backend.  ``clock=True`` makes the groups run on a
:class:`~shardio.testing.VirtualTime` (``Clock()`` works inside ``shardio_run``'s
main).  ``timeout`` bounds ``shardio_run`` in real seconds: past it, the
shards' tasks are cancelled and it raises ``TimeoutError``.  The same options can be given
by indirect parametrization of ``shardio_options``::

    @pytest.mark.parametrize("shardio_options", [{"shards": 1}, {"shards": 3}], indirect=True)

Leak check.  Around each test that uses these fixtures, the plugin notes the
process's fds, child processes and its user's ``/dev/shm`` entries, and after the
groups have stopped fails the test (an error at teardown) with whatever is
new and still there after a short grace period.  Process-wide helpers that
are created once and kept (multiprocessing's resource tracker, libuv's
signal pipe) are created before the first snapshot.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..group import ShardGroup
from .clock import Clock, VirtualTime, virtual_group

DEFAULTS: dict[str, Any] = {
    "shards": 2, "backend": "process", "clock": False, "timeout": 60.0,
    "leak_check": True, "leak_grace": 2.0,
}
"""``leak_grace``: seconds a leak check waits for late closers (a child being reaped)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shardio(shards=2, backend='process', clock=False, timeout=60.0, leak_check=True, "
        "leak_grace=2.0, **group_options): configure the shard_group / shardio_run fixtures; "
        "backend=['process', 'thread'] runs the test on each.")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("shardio")
    if marker is None or "shardio_options" not in metafunc.fixturenames:
        return
    backends = marker.kwargs.get("backend")
    if isinstance(backends, (list, tuple)):
        metafunc.parametrize("shardio_options", [{"backend": b} for b in backends],
                             indirect=True, ids=[str(b) for b in backends])


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def shardio_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The options of this test's groups: defaults < ``shardio`` marker < indirect param."""
    options = dict(DEFAULTS)
    marker = request.node.get_closest_marker("shardio")
    if marker is not None:
        if marker.args:
            pytest.fail("@pytest.mark.shardio takes keyword arguments only", pytrace=False)
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    if isinstance(options["backend"], (list, tuple)):
        pytest.fail("backend=[...] parametrizes tests that use shardio_options, shard_group "
                    "or shardio_run", pytrace=False)
    return options


@pytest.fixture
def shardio_leak_check(shardio_options: dict[str, Any]) -> Iterator[LeakCheck | None]:
    """Fails the test if fds, child processes or /dev/shm entries outlive its groups."""
    if not shardio_options["leak_check"]:
        yield None
        return
    create_process_singletons(shardio_options["backend"])
    check = LeakCheck()
    yield check
    problems = check.leaks(shardio_options["leak_grace"])
    if problems:
        pytest.fail("the test left behind " + "; ".join(problems), pytrace=False)


@pytest.fixture
def shard_group(request: pytest.FixtureRequest, shardio_options: dict[str, Any],
                shardio_leak_check: LeakCheck | None) -> Iterator[ShardGroup]:
    """A running ShardGroup configured by the ``shardio`` marker; stopped after the test."""
    clock = shardio_options["clock"] or "shardio_clock" in request.fixturenames
    group = make_group(shardio_options, clock=clock)
    try:
        yield group.start()
    finally:
        close_group(group)


@pytest.fixture
def shardio_clock(shard_group: ShardGroup) -> Iterator[Clock]:
    """The virtual clock of ``shard_group``; resumed after the test."""
    clock = Clock(shard_group)
    yield clock
    clock.resume()


@pytest.fixture
def shardio_run(shardio_options: dict[str, Any], shardio_leak_check: LeakCheck | None
                ) -> Callable[..., Any]:
    """``shardio_run(main, *args, **kwargs)``: main's result, run on shard 0 of a fresh group."""

    def run(main: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        group = make_group(shardio_options, clock=shardio_options["clock"])
        timeout = shardio_options["timeout"]
        future = None
        try:
            future = group.start().submit(0, main, *args, **kwargs)
            return future.result(timeout=timeout)
        except TimeoutError:
            if future is None or future.done():
                raise
            # Cancel it (and whatever it started) so that stopping does not wait for it.
            for shard in range(group.shards):
                group.submit(shard, _cancel_tasks)
            raise TimeoutError(f"{getattr(main, '__qualname__', main)} did not finish on "
                               f"shard 0 within {timeout} s (the shardio marker's timeout)"
                               ) from None
        finally:
            close_group(group, stop_timeout=None if future is None or future.done() else 5.0)

    return run


def make_group(options: dict[str, Any], *, clock: bool) -> ShardGroup:
    group_options = {k: v for k, v in options.items() if k not in DEFAULTS}
    group_options["backend"] = options["backend"]
    if clock:
        return virtual_group(options["shards"], **group_options)
    return ShardGroup(options["shards"], **group_options)


async def _cancel_tasks() -> None:
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()


def close_group(group: ShardGroup, stop_timeout: float | None = None) -> None:
    group.stop(timeout=stop_timeout)
    if isinstance(group.options.loop, VirtualTime):
        group.options.loop.close()


# ---------------------------------------------------------------- leak checks


_singletons: set[str] = set()


def create_process_singletons(backend: str) -> None:
    """Create, once, the helpers a process keeps for good, so they are not taken for leaks."""
    if backend == "process" and "tracker" not in _singletons:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # spawned shards start it, and it stays
        _singletons.add("tracker")
    if "libuv" not in _singletons:
        from ..reactor import new_event_loop

        new_event_loop().close()  # libuv's process-wide signal pipe, made by its first loop
        _singletons.add("libuv")


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def child_pids() -> set[int]:
    """Living (not zombie) children of this process."""
    me = str(os.getpid())
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            children.add(int(entry))
    return children


def shm_entries() -> set[str]:
    """The /dev/shm entries of this user: other users' (a database server) come and go."""
    mine = set()
    uid = os.getuid()
    for entry in os.scandir("/dev/shm"):
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                mine.add(entry.name)
        except FileNotFoundError:
            pass  # removed meanwhile
    return mine


class LeakCheck:
    """Snapshot fds, child processes and /dev/shm; report what is new later."""

    def __init__(self) -> None:
        self.fds = open_fds()
        self.children = child_pids()
        self.shm = shm_entries()

    def leaks(self, timeout: float = 5.0) -> list[str]:
        """What is new since the snapshot, after waiting up to ``timeout`` for it to go."""
        deadline = time.monotonic() + timeout
        while True:
            new_fds = {fd for fd in open_fds() - self.fds if _is_leakable(fd)}
            new_children = child_pids() - self.children
            new_shm = shm_entries() - self.shm
            if not (new_fds or new_children or new_shm) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        problems = []
        if new_children:
            problems.append(f"child processes {sorted(new_children)}")
        if new_shm:
            problems.append(f"/dev/shm entries {sorted(new_shm)}")
        if new_fds:
            problems.append(f"fds {_describe(new_fds)}")
        return problems

    def assert_clean(self, timeout: float = 5.0) -> None:
        problems = self.leaks(timeout)
        assert not problems, "leaked " + "; ".join(problems)


def _is_leakable(fd: int) -> bool:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False  # closed meanwhile (the listing's own fd)
    # pytest's capture files and the terminal are not ours.
    return not target.startswith("/dev/pts")


def _describe(fds: set[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} -> (closed)")
    return ", ".join(out)
