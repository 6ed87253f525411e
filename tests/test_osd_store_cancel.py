"""Cancelling or interrupting a store caller never changes the store's health.

On tame stacks: asyncio tasks run puts, partial writes, deletes and syncs
through ``tame.call`` and are cancelled after a random number of loop
iterations, so CancelledError lands inside pwrite, fdatasync, a directory
fsync, a lock wait or a group-commit wait. On threads (PosixEnv): an Env
over the real one raises a KeyboardInterrupt-like BaseException just before
or just after a real file operation, lock acquisition or wait, at random.

Each test checks that the store stays writable, that every acknowledged
change reads back exactly, that each interrupted change is wholly there or
wholly absent (now and after a reopen), and that only I/O errors make a
store read-only.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest

from shardio import tame
from shardio.osd.objectstore import ObjectNotFound, ObjectStore
from shardio.tame import PosixEnv, posix_env

# a store broken by a cancellation hangs its waiters: fail in a minute, not the suite's 5
pytestmark = pytest.mark.timeout(60)


def value(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice((0, 10, 3000, 5000, 9000)))


def plan(rng: random.Random, key: str, old: bytes | None) -> tuple[str, Any, bytes | None]:
    """(op, argument, value the key has if the op takes effect)."""
    r = rng.random()
    if old is not None and r < 0.2:
        return "delete", None, None
    if old is not None and r < 0.5:
        off = rng.randint(0, len(old) + 100)
        data = rng.randbytes(rng.randint(1, 4000))
        base = old + bytes(max(0, off - len(old)))
        return "write", (data, off), base[:off] + data + base[off + len(data) :]
    if r < 0.6:
        return "sync", None, old
    new = value(rng)
    return "put", new, new


def run(store: ObjectStore, key: str, op: str, arg: Any) -> None:
    if op == "put":
        store.put(key, arg)
    elif op == "write":
        store.write(key, arg[0], arg[1])
    elif op == "delete":
        store.delete(key)
    else:
        store.sync()


def current(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.read(key)
    except ObjectNotFound:
        return None


def check_model(store: ObjectStore, model: dict[str, bytes | None]) -> None:
    for key, want in model.items():
        assert current(store, key) == want, key


# -- tame stacks: real asyncio cancellation ---------------------------------------------


def test_cancelled_tame_callers_never_break_the_store(tmp_path: Any) -> None:
    d = str(tmp_path / "s")
    rng = random.Random(13)
    keys = [f"t{i}" for i in range(8)]
    model: dict[str, bytes | None] = {k: None for k in keys}
    cancelled_inside = 0

    async def main() -> tuple[int, int]:
        nonlocal cancelled_inside
        store = await tame.call(ObjectStore, d, None, segment_size=24 * 1024)
        loop = asyncio.get_running_loop()
        rounds = 0
        while tame.stats()["cancellations"] < 300:
            rounds += 1
            plans = {k: plan(rng, k, model[k]) for k in keys}
            tasks = {
                k: asyncio.ensure_future(tame.call(run, store, k, op, arg))
                for k, (op, arg, _) in plans.items()
            }
            for k in rng.sample(keys, rng.randint(1, len(keys))):
                # cancel after a random number of loop iterations: lands at a random blocking point
                n = rng.randint(0, 12)

                def later(task: asyncio.Future[Any], n: int) -> None:
                    if n:
                        loop.call_soon(later, task, n - 1)
                    else:
                        task.cancel()

                later(tasks[k], n)
            for k, task in tasks.items():
                op, _, new = plans[k]
                try:
                    await task
                    if op != "sync":
                        model[k] = new
                except asyncio.CancelledError:
                    cancelled_inside += 1
                    await tame.call(store.sync)  # a cancelled change that made the log shows now
                    got = await tame.call(current, store, k)
                    assert got == model[k] or got == new, f"round {rounds}: {k} half-changed"
                    model[k] = got
                except ObjectNotFound:
                    assert op == "delete"
            # still writable, and everything acknowledged reads back
            await tame.call(store.put, "health", b"ok %d" % rounds)
            await tame.call(check_model, store, model)
        cancels = tame.stats()["cancellations"]
        await tame.call(store.close)
        return rounds, cancels

    rounds, cancels = asyncio.run(main())
    assert cancels >= 300  # CancelledError thrown into the tame code, inside the store
    with ObjectStore(d, posix_env) as s:  # after a reopen too
        check_model(s, model)
        assert s.read("health") == b"ok %d" % rounds


def test_cancelled_compactions_never_break_the_store(tmp_path: Any) -> None:
    """Compactions cancelled after a random number of loop turns, writes going on."""
    d = str(tmp_path / "s")
    rng = random.Random(21)
    model: dict[str, bytes | None] = {}

    async def main() -> int:
        store = await tame.call(ObjectStore, d, None, segment_size=16 * 1024)
        loop = asyncio.get_running_loop()
        cancelled = 0
        for trial in range(40):
            for _ in range(30):  # garbage for the compaction to work on
                k = f"c{rng.randrange(20)}"
                model[k] = rng.randbytes(rng.randint(500, 3000))
                await tame.call(store.put, k, model[k])
            task = asyncio.ensure_future(tame.call(store.compact, 0.0))
            n = rng.randint(0, 60)

            def later(task: asyncio.Future[Any], n: int) -> None:
                if n:
                    loop.call_soon(later, task, n - 1)
                else:
                    task.cancel()

            later(task, n)
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
            await tame.call(store.put, "health", b"ok %d" % trial)
            await tame.call(check_model, store, model)
        await tame.call(store.close)
        return cancelled

    cancelled = asyncio.run(main())
    assert cancelled >= 10
    with ObjectStore(d, posix_env) as s:
        check_model(s, model)


# -- threads: interrupts injected around real operations ---------------------------------


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt / GreenletExit: not an I/O error."""


class _Injector:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.local = threading.local()
        self.fired = 0
        self.count_lock = threading.Lock()

    def arm(self, n: int | None) -> None:
        self.local.left = n

    def point(self) -> None:
        left = getattr(self.local, "left", None)
        if left is None:
            return
        if left == 0:
            self.local.left = None
            with self.count_lock:
                self.fired += 1
            raise Interrupt()
        self.local.left = left - 1


class _File:
    def __init__(self, f: Any, inj: _Injector) -> None:
        self._f = f
        self._inj = inj

    def _around(self, fn: Any, *args: Any) -> Any:
        self._inj.point()  # before the real call...
        out = fn(*args)
        self._inj.point()  # ...or after it (the syscall done, the interrupt delivered late)
        return out

    def pwrite(self, data: Any, offset: int) -> int:
        return self._around(self._f.pwrite, data, offset)  # type: ignore[no-any-return]

    def fdatasync(self) -> None:
        self._around(self._f.fdatasync)

    def fsync(self) -> None:
        self._around(self._f.fsync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _Lock:
    def __init__(self, lock: Any, inj: _Injector) -> None:
        self._lock = lock
        self._inj = inj

    def acquire(self, *args: Any) -> bool:
        self._inj.point()
        return self._lock.acquire(*args)  # type: ignore[no-any-return]

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Event:
    def __init__(self, ev: Any, inj: _Injector) -> None:
        self._ev = ev
        self._inj = inj

    def wait(self, timeout: float | None = None) -> bool:
        self._inj.point()
        out = self._ev.wait(timeout)
        self._inj.point()
        return out  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ev, name)


class InterruptingEnv(PosixEnv):
    """PosixEnv whose file writes/syncs, directory fsyncs, locks and waits can be interrupted."""

    def __init__(self, inj: _Injector) -> None:
        self.inj = inj

    def open(self, path: Any, mode: str = "rb", *, direct: bool = False) -> Any:
        return _File(super().open(path, mode, direct=direct), self.inj)

    def fsync_dir(self, path: Any) -> None:
        self.inj.point()
        super().fsync_dir(path)
        self.inj.point()

    def Lock(self) -> Any:  # noqa: N802
        return _Lock(super().Lock(), self.inj)

    def Event(self) -> Any:  # noqa: N802
        return _Event(super().Event(), self.inj)


def test_interrupted_threads_never_break_the_store(tmp_path: Any) -> None:
    d = str(tmp_path / "s")
    inj = _Injector(5)
    env = InterruptingEnv(inj)
    store = ObjectStore(d, env, segment_size=24 * 1024)
    n_threads, n_ops = 4, 150
    models: list[dict[str, bytes | None]] = [{} for _ in range(n_threads)]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        rng = random.Random(w)
        keys = [f"w{w}-{i}" for i in range(4)]
        model = models[w]
        for k in keys:
            model[k] = None
        try:
            for _ in range(n_ops):
                k = rng.choice(keys)
                op, arg, new = plan(rng, k, model[k])
                inj.arm(rng.randint(0, 6))
                try:
                    run(store, k, op, arg)
                    inj.arm(None)
                    if op != "sync":
                        model[k] = new
                except Interrupt:
                    inj.arm(None)
                    store.sync()
                    got = current(store, k)
                    assert got == model[k] or got == new, f"{k} half-changed by {op}"
                    model[k] = got
                store.put(f"health-{w}", b"ok")  # never StoreFailed
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert inj.fired >= 200, inj.fired
    inj.arm(None)
    store.close()
    with ObjectStore(d, posix_env) as s:
        for model in models:
            check_model(s, model)
