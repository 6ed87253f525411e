"""Functions the tests submit to shards (shards import them by module name)."""

from __future__ import annotations

import asyncio
import os
import threading
import zlib

import shardio


def identify(tag=None):
    return shardio.this_shard(), os.getpid(), threading.current_thread().name, tag


def add(a, b=0):
    return a + b


async def async_add(a, b=0):
    await asyncio.sleep(0.001)
    return a + b


class CustomError(Exception):
    pass


class TwoArgError(Exception):
    """An exception whose constructor does not round-trip through pickle."""

    def __init__(self, code, text):
        super().__init__(f"{code}: {text}")
        self.code = code


def fail(kind: str):
    if kind == "custom":
        raise CustomError("custom failure on purpose")
    if kind == "two-arg":
        raise TwoArgError(42, "odd constructor")
    if kind == "key":
        raise KeyError("missing-key")
    raise ValueError(f"unknown kind {kind}")


async def hop_to(shard, func, *args):
    return await shardio.submit_to(shard, func, *args)


async def submit_to_all_and_collect(tag):
    return await shardio.invoke_on_all(identify, tag)


async def sum_of_shard_numbers():
    return await shardio.map_reduce(shardio.this_shard, lambda_free_add, 100)


def lambda_free_add(acc, value):
    return acc + value


def unpicklable_result():
    return threading.Lock()


async def local_call_without_pickling():
    lock = threading.Lock()  # cannot be pickled: proves the local path does not pickle
    return await shardio.submit_to(shardio.this_shard(), holds_lock, lock)


def holds_lock(lock):
    return type(lock).__name__


async def send_unpicklable_to(shard):
    try:
        shardio.submit_to(shard, holds_lock, threading.Lock())
    except TypeError as error:
        return str(error)
    return "no error"


def echo_bytes(data):
    return len(data), zlib.crc32(data), bytes(data[-16:])


async def big_roundtrip(shard, size):
    data = os.urandom(size)
    length, crc, tail = await shardio.submit_to(shard, echo_bytes, data)
    return length == size and crc == zlib.crc32(data) and tail == data[-16:]


class Counter:
    stopped: list = []

    def __init__(self, start=0):
        self.value = start
        self.shard = shardio.this_shard()

    def incr(self, by=1):
        self.value += by
        return self.value

    async def slow_value(self):
        await asyncio.sleep(0.001)
        return self.value

    def reset(self):
        self.value = 0

    def stop(self):
        Counter.stopped.append(self.shard)


async def sharded_counter_scenario():
    svc = shardio.Sharded(Counter, 10)
    await svc.start()
    assert svc.local().value == 10
    await svc.invoke_on(1 % shardio.shard_count(), "incr", 5)
    total = await svc.map_reduce("slow_value", lambda_free_add, 0)
    per_shard = await svc.invoke_on_all("incr", 1)
    # the handle itself can cross to another shard
    remote_local = await shardio.submit_to(shardio.shard_count() - 1, read_local, svc)
    await svc.invoke_on_all("reset")
    after_reset = await svc.map_reduce("slow_value", lambda_free_add, 0)
    await svc.stop()
    try:
        svc.local()
    except shardio.ServiceNotRunning:
        stopped_ok = True
    else:
        stopped_ok = False
    return total, per_shard, remote_local, after_reset, stopped_ok


def read_local(svc):
    return svc.local().value


async def start_counter_and_leave_running():
    svc = shardio.Sharded(Counter, 1)
    await svc.start()
    return True


def stopped_counters():
    return list(Counter.stopped)


def external_submit_from_thread(n, bind):
    """On a shard: start a plain thread that uses external_submit n times."""
    results = []
    reactor = shardio.current_reactor()

    def worker():
        if bind:
            shardio.bind_thread(reactor)
        futures = [shardio.external_submit(add, i, 1) for i in range(n)]
        results.extend(f.result(timeout=10) for f in futures)
        futures = [shardio.external_submit(async_add, i, 2) for i in range(n)]
        results.extend(f.result(timeout=10) for f in futures)

    thread = threading.Thread(target=worker)
    thread.start()
    return _join_later(thread, results)


async def _join_later(thread, results):
    while thread.is_alive():
        await asyncio.sleep(0.001)
    return results


def external_submit_on_reactor_thread():
    try:
        shardio.external_submit(add, 1, 2)
    except shardio.WrongThreadError as error:
        return str(error)
    return "no error"


async def sleep_then(value, seconds):
    await asyncio.sleep(seconds)
    return value


def pid():
    return os.getpid()


def block_forever():
    threading.Event().wait()


async def load_until_dead(target: int, window: int = 32) -> dict:
    """Keep ``window`` calls in flight to ``target`` until they fail; report when."""
    import time

    completed = 0
    in_flight = {shardio.submit_to(target, add, i) for i in range(window)}
    while True:
        done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            error = future.exception()
            if error is not None:
                failed_at = time.monotonic()
                for other in in_flight:  # the rest must fail as well, not hang
                    try:
                        await asyncio.wait_for(other, 1.0)
                    except shardio.ShardDied:
                        pass
                later_call = shardio.submit_to(target, add, 1)
                failed_at_once = later_call.done()  # refused on the spot, not after a wait
                try:
                    await later_call
                    later = "no error"
                except shardio.ShardDied as later_error:
                    later = repr(later_error)
                return {"failed_at": failed_at, "error": repr(error), "completed": completed,
                        "later": later, "later_failed_at_once": failed_at_once}
            completed += 1
            in_flight.add(shardio.submit_to(target, add, completed))


def say(text):
    import logging
    import sys

    print(text)
    print("and on stderr", file=sys.stderr)
    logging.getLogger("tests.log").warning("a log record")
    return True


async def stall_in_coroutine(seconds):
    import time

    time.sleep(seconds)  # deliberately blocks the reactor
    return shardio.current_reactor().stats.stalls


def stall_count():
    return shardio.current_reactor().stats.stalls


async def many_short_tasks(count):
    async def short(i):
        await asyncio.sleep(0)
        return sum(range(200))

    done = 0
    for start in range(0, count, 500):
        await asyncio.gather(*(short(i) for i in range(start, start + 500)))
        done += 500
    return done


def affinity():
    return sorted(os.sched_getaffinity(0))


def register_hook_that_calls_a_peer(path):
    """A shutdown hook that still needs another shard: it must run while peers live."""
    reactor = shardio.current_reactor()

    async def hook():
        answer = await shardio.submit_to(1, identify, "from-hook")
        with open(path, "w") as f:
            f.write(f"{answer[0]} {answer[3]}")

    reactor.add_shutdown_hook(hook)
    return True
