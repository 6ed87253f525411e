"""The io_uring driver: bounded queue depth, cancellation with ops in flight, errors."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from shardio import tame
from shardio.io.uring import UringDriver
from shardio.tame import stacks


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]:
    def runner(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return uvloop.run(main()) if request.param == "uvloop" else asyncio.run(main())

    return runner


@pytest.fixture
def data_file() -> Any:
    d = tempfile.mkdtemp(dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None)
    path = os.path.join(d, "data")
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())
    yield path
    os.remove(path)
    os.rmdir(d)


def _direct_fd(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"O_DIRECT unsupported here: {exc}")


def test_queue_depth_is_bounded_and_fifo(run: Any, data_file: str) -> None:
    fd = _direct_fd(data_file)
    expected = {i: os.pread(os.open(data_file, os.O_RDONLY), 4096, i * 4096) for i in range(64)}

    async def main() -> dict[str, int]:
        rt = stacks.runtime()
        rt._uring = UringDriver(rt, max_inflight=4)
        got = await asyncio.gather(
            *(tame.call(rt.uring.read, fd, 4096, i * 4096, True) for i in range(64))
        )
        assert got == [expected[i] for i in range(64)]
        return rt.uring.stats()

    try:
        st = run(main)
    finally:
        os.close(fd)
    assert st["inflight_peak"] <= 4 and st["slot_waits"] > 0 and st["inflight"] == 0
    assert st["fallback"] == 0 and st["read_uring"] == 64


def test_cancel_with_op_in_flight_keeps_buffer_until_completion(run: Any, data_file: str) -> None:
    fd = _direct_fd(data_file)

    async def main() -> dict[str, int]:
        drv = stacks.runtime().uring
        tasks = [
            asyncio.ensure_future(tame.call(drv.read, fd, 1 << 20, i << 20, True)) for i in range(8)
        ]
        await asyncio.sleep(0)  # the SQEs are queued, not yet complete
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        for _ in range(200):  # the kernel finishes the reads; the reaper pools the buffers
            if not drv.stats()["inflight"]:
                break
            await asyncio.sleep(0.005)
        st = drv.stats()
        # the driver still works, and the stacks went back to the pool
        assert await tame.call(drv.read, fd, 4096, 0, True) == os.pread(
            os.open(data_file, os.O_RDONLY), 4096, 0
        )
        assert tame.stats()["free_stacks"] == tame.stats()["stacks"]
        return st

    try:
        st = run(main)
    finally:
        os.close(fd)
    assert st["inflight"] == 0


def test_io_errors_are_oserrors(run: Any, data_file: str) -> None:
    async def main() -> None:
        drv = stacks.runtime().uring
        fd = os.open(data_file, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as info:
                await tame.call(drv.write, fd, b"x" * 10, 0)  # read-only fd
            assert info.value.errno == 9  # EBADF from the CQE
            with pytest.raises(OSError):
                await tame.call(drv.fsync, 12345)  # not an fd
        finally:
            os.close(fd)
        assert drv.stats()["inflight"] == 0

    run(main)


def test_reaped_on_ring_fd_readability_without_a_reactor(run: Any, data_file: str) -> None:
    """On a plain loop there is no poller: completions arrive through add_reader(ring_fd)."""

    async def main() -> None:
        rt = stacks.runtime()
        assert rt.reactor is None
        drv = rt.uring
        fd = _direct_fd(data_file)
        try:
            await tame.call(drv.read, fd, 4096, 5 << 20, True)
            st = drv.stats()
            assert st["reaps"] >= 1 and st["cqes"] >= 1
        finally:
            os.close(fd)

    run(main)
