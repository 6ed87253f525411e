"""The cold read in one C call (``Ring.read_direct``) keeps what ``_submit`` guarantees:
stacks parked on it show as ("io_uring", "read"), a cancelled wait cancels the op in the
kernel, a scheduling group's reads are admitted by its I/O queue, errors are OSErrors,
a broken or closed driver fails the read instead of hanging it, and a driver nobody
closed is still collected with its ring.

A pipe stands in for a slow device where a read must stay in flight: an io_uring read
of a pipe completes only once something is written to it."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import shardio
from shardio import tame
from shardio.io.uring import UringDriver, UringSubmitError
from shardio.tame import stacks


@pytest.fixture
def pipe() -> Any:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


@pytest.fixture
def direct_file() -> Any:
    d = tempfile.mkdtemp(dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None)
    path = os.path.join(d, "data")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"O_DIRECT unsupported here: {exc}")
    yield path, fd
    os.close(fd)
    os.remove(path)
    os.rmdir(d)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not within 5 s: {what}")


def _io_uring_driver() -> UringDriver:
    drv = stacks.runtime().uring
    if not isinstance(drv, UringDriver):
        pytest.skip("io_uring is not available here")
    return drv


def test_a_parked_direct_read_shows_as_io_uring_read(run: Any, pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    async def main() -> None:
        drv = _io_uring_driver()
        before = drv.stats()["read_uring"]
        task = asyncio.ensure_future(tame.call(drv.read, read_end, 4096, 0, True))
        await _until(lambda: drv.stats()["inflight"] == 1, "the read is in flight")
        dumps = [d for d in tame.dump_stacks() if d.state == "parked"]
        assert [(d.waits_on, d.target) for d in dumps] == [("io_uring", "'read'")]
        os.write(write_end, b"written")
        assert await asyncio.wait_for(task, 10) == b"written"
        assert drv.stats()["read_uring"] == before + 1

    run(main)


def test_cancelling_a_direct_read_cancels_it_in_the_kernel(run: Any, pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    async def main() -> None:
        drv = _io_uring_driver()
        task = asyncio.ensure_future(tame.call(drv.read, read_end, 4096, 0, True))
        await _until(lambda: drv.stats()["inflight"] == 1, "the read is in flight")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Nothing is written to the pipe: only the kernel's cancel ends the read.
        await _until(lambda: drv.stats()["inflight"] == 0, "the kernel cancelled the read")
        assert drv.stats()["cancels"] == 1
        os.write(write_end, b"still here")
        assert os.read(read_end, 100) == b"still here"  # the cancelled read took nothing
        assert tame.stats()["free_stacks"] == tame.stats()["stacks"]

    run(main)


def test_a_groups_direct_reads_are_admitted_by_its_io_queue(
    run: Any, direct_file: tuple[str, int]
) -> None:
    path, _ = direct_file
    expected = open(path, "rb").read()  # noqa: SIM115 - read once, closed by the GC

    def reader() -> list[bytes]:
        with tame.env().open(path, "rb", direct=True) as f:
            return [f.pread(4096, i * 4096) for i in range(16)]

    async def main() -> None:
        group = shardio.SchedulingGroup("readers", 100)
        got = await group.call(reader)
        assert got == [expected[i * 4096 : (i + 1) * 4096] for i in range(16)]
        assert group.stats()["io_admitted"] >= 16  # the open and close may count too

    run(main)


def test_a_direct_read_error_is_an_oserror(run: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "write-only")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)

    async def main() -> None:
        drv = _io_uring_driver()
        with pytest.raises(OSError) as info:
            await tame.call(drv.read, fd, 4096, 0, True)
        assert info.value.errno == errno.EBADF

    try:
        run(main)
    finally:
        os.close(fd)


def test_a_broken_driver_fails_direct_reads_instead_of_hanging(
    run: Any, direct_file: tuple[str, int]
) -> None:
    _, fd = direct_file

    async def main() -> None:
        drv = _io_uring_driver()
        assert len(await tame.call(drv.read, fd, 4096, 0, True)) == 4096
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, drv.ring_fd)  # io_uring_enter now fails with EOPNOTSUPP
        os.close(devnull)
        with pytest.raises(UringSubmitError, match="never started"):
            await asyncio.wait_for(tame.call(drv.read, fd, 4096, 4096, True), 10)
        with pytest.raises(UringSubmitError, match="unusable since a submit failed"):
            await asyncio.wait_for(tame.call(drv.read, fd, 4096, 8192, True), 10)

    run(main)


def test_a_closed_driver_fails_direct_reads_with_ebadf(
    run: Any, direct_file: tuple[str, int]
) -> None:
    _, fd = direct_file

    async def main() -> None:
        rt = stacks.runtime()
        drv = UringDriver(rt)
        assert len(await tame.call(drv.read, fd, 4096, 0, True)) == 4096
        drv.close()
        with pytest.raises(OSError) as info:
            await tame.call(drv.read, fd, 4096, 0, True)
        assert info.value.errno == errno.EBADF and "closed" in str(info.value)

    run(main)


def test_a_driver_nobody_closed_is_collected_with_its_ring(run: Any) -> None:
    """The ring holds the driver's slow paths and the driver holds the ring: a cycle the
    garbage collector must see through (the ring's fd is closed when it is freed)."""

    async def main() -> None:
        rt = stacks.runtime()
        drv = UringDriver(rt)
        ring_fd = drv.ring_fd
        rt.loop.remove_reader(ring_fd)  # what close() would do, except closing the ring
        if rt.reactor is not None:
            rt.reactor.remove_poller(drv._poll)
        ref = weakref.ref(drv)
        del drv
        gc.collect()
        assert ref() is None
        with pytest.raises(OSError) as info:
            os.fstat(ring_fd)
        assert info.value.errno == errno.EBADF

    run(main)


def test_a_direct_read_does_not_overtake_stacks_waiting_for_a_slot(
    run: Any, pipe: tuple[int, int], direct_file: tuple[str, int]
) -> None:
    """With one slot: A holds it (a pipe read), B and C wait for it in that order. A's next
    read, made while its completion is handed out and the slot is free again, must queue
    behind B and C rather than take the slot they wait for."""
    read_end, write_end = pipe
    _, fd = direct_file
    order: list[str] = []

    async def main() -> None:
        rt = stacks.runtime()
        drv = UringDriver(rt, max_inflight=1)

        def first() -> None:
            drv.read(read_end, 4096, 0, True)
            drv.read(fd, 4096, 0, True)
            order.append("A")

        def waiter(name: str) -> None:
            drv.read(fd, 4096, 4096, True)
            order.append(name)

        try:
            a = asyncio.ensure_future(tame.call(first))
            await _until(lambda: drv.stats()["inflight"] == 1, "A's read is in flight")
            b = asyncio.ensure_future(tame.call(waiter, "B"))
            await _until(lambda: drv.stats()["slot_waits"] == 1, "B waits for the slot")
            c = asyncio.ensure_future(tame.call(waiter, "C"))
            await _until(lambda: drv.stats()["slot_waits"] == 2, "C waits for the slot")
            os.write(write_end, b"go")
            await asyncio.wait_for(asyncio.gather(a, b, c), 10)
        finally:
            drv.close()
        assert order == ["B", "C", "A"]

    run(main)
