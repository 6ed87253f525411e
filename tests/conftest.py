"""Shared test fixtures: leak checks on real processes, fds and shared memory."""

from __future__ import annotations

import os
import time

import pytest


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def child_pids() -> set[int]:
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
    return set(os.listdir("/dev/shm"))


class LeakCheck:
    """Snapshot fds, child processes and /dev/shm; assert nothing new is left."""

    def __init__(self) -> None:
        self.fds = open_fds()
        self.children = child_pids()
        self.shm = shm_entries()

    def assert_clean(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            new_fds = {fd for fd in open_fds() - self.fds if _is_leakable(fd)}
            new_children = child_pids() - self.children
            new_shm = shm_entries() - self.shm
            if not (new_fds or new_children or new_shm) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not new_children, f"leaked child processes: {sorted(new_children)}"
        assert not new_shm, f"leaked /dev/shm entries: {sorted(new_shm)}"
        assert not new_fds, f"leaked fds: {_describe(new_fds)}"


def _is_leakable(fd: int) -> bool:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False  # closed meanwhile (the listing's own fd)
    # pytest's capture files and the like are not ours.
    return not target.startswith("/dev/pts") and "pytest" not in target


def _describe(fds: set[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} -> (closed)")
    return ", ".join(out)


@pytest.fixture(scope="session", autouse=True)
def _process_wide_singletons():
    """Create the once-per-process things before any leak baseline, so that they are
    not counted as left behind: multiprocessing's resource tracker (spawned processes
    start it: one helper per parent, gone with the parent) and libuv's signal pipe."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    # libuv makes one process-wide pipe (its signal lock) with the first uvloop loop.
    from shardio.reactor import new_event_loop

    new_event_loop().close()


@pytest.fixture
def leak_check():
    check = LeakCheck()
    yield check
    check.assert_clean()


@pytest.fixture(params=["process", "thread"])
def backend(request) -> str:
    return request.param
