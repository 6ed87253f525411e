"""Functions the fabric tests run on shards (importable by every shard process)."""

from __future__ import annotations

import asyncio
import resource
import time

import shardio

_received: dict[int, list[int]] = {}


def _refuse_to_unpickle():
    raise ValueError("this argument refuses to be unpickled")


class Unloadable:
    """Pickles fine; unpickling it on the receiver raises ValueError."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


def add(a, b=0):
    return a + b


async def poison_then_call(peer: int) -> tuple[str, int]:
    """First call of ``add`` on the link carries an argument that fails to unpickle."""
    try:
        await shardio.submit_to(peer, add, Unloadable(), 1)
    except shardio.CannotCrossError as error:
        first = str(error)
    else:
        first = "no error"
    return first, await shardio.submit_to(peer, add, 2, 3)


def record(source: int, sequence: int, payload: bytes) -> int:
    """Note the order calls arrive in; the result proves the payload crossed intact."""
    _received.setdefault(source, []).append(sequence)
    return sequence + len(payload)


def arrivals(source: int) -> list[int]:
    return _received.pop(source, [])


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def flood(peer: int, calls: int, payload_bytes: int) -> dict:
    """Submit ``calls`` calls at once, all sharing one payload; peak RSS growth here."""
    payload = b"x" * payload_bytes
    me = shardio.this_shard()
    before = peak_rss_kib()
    futures = [shardio.submit_to(peer, record, me, sequence, payload) for sequence in range(calls)]
    submitted = peak_rss_kib()
    results = await asyncio.gather(*futures)
    return {
        "growth_kib": max(submitted, peak_rss_kib()) - before,
        "correct": results == [s + payload_bytes for s in range(calls)],
    }


async def ping_pong(peer: int, depth: int) -> int:
    """A handler that calls back into the shard that called it, ``depth`` times."""
    if depth == 0:
        return shardio.this_shard()
    return await shardio.submit_to(peer, ping_pong, shardio.this_shard(), depth - 1)


def ping_pong_plain(peer: int, depth: int):
    """ping_pong as a plain function: its nested call is made while Ring.dispatch runs
    it (the serve path), and the future it returns is the call's awaitable result."""
    if depth == 0:
        return shardio.this_shard()
    return shardio.submit_to(peer, ping_pong_plain, shardio.this_shard(), depth - 1)


async def nested_storm(peer: int, calls: int, depth: int, plain: bool = False) -> list[int]:
    """Many concurrent calls whose handlers call back (nested) through the bound."""
    me = shardio.this_shard()
    handler = ping_pong_plain if plain else ping_pong
    return await asyncio.gather(
        *[shardio.submit_to(peer, handler, me, depth) for _ in range(calls)]
    )


def _spin(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


async def start_echo_server(work_us: float) -> int:
    """An echo server on this shard that burns ``work_us`` of CPU per line."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                _spin(work_us)
                writer.write(line)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    _servers.append(server)
    return server.sockets[0].getsockname()[1]


async def stop_echo_server() -> None:
    while _servers:
        server = _servers.pop()
        server.close()
        await server.wait_closed()


_servers: list = []


def noop(value=None):
    return value


def doorbells_rung_to(peer: int) -> int:
    return shardio.current_reactor().links[peer].doorbells_rung


async def paced_calls(peer: int, count: int, pause: float) -> dict:
    """``count`` calls to ``peer``, one at a time, ``pause`` seconds apart."""
    link = shardio.current_reactor().links[peer]
    rung_before = link.doorbells_rung
    cpu_before = time.thread_time()
    for i in range(count):
        assert await shardio.submit_to(peer, noop, i) == i
        await asyncio.sleep(pause)
    return {"doorbells": link.doorbells_rung - rung_before, "cpu": time.thread_time() - cpu_before}


def sleep_accounting() -> dict:
    """This shard's clocks: wall time since start, time asleep, the thread's CPU time."""
    reactor = shardio.current_reactor()
    stats = reactor.stats
    return {
        "wall": time.monotonic() - stats.started_at,
        "sleep": stats.sleep_seconds,
        "cpu": time.thread_time(),
        "sleeps": stats.sleeps,
        "doorbell_wakeups": stats.doorbell_wakeups,
        "work_wakeups": stats.work_wakeups,
    }


async def sum_over_shards() -> int:
    """Every shard asks every other shard for its number: the whole mesh answers."""
    return sum(await shardio.invoke_on_all(shardio.this_shard))


def endpoint_traffic(number: int) -> int | None:
    """Messages this shard took from endpoint ``number`` (None: not attached)."""
    links = shardio.current_reactor().links
    link = links[number] if number < len(links) else None
    return None if link is None else link.received_messages


_gate: list = []
_background: list = []


async def held() -> int:
    """Wait until release() is called on this shard."""
    if not _gate:
        _gate.append(asyncio.Event())
    await _gate[0].wait()
    return shardio.this_shard()


def release() -> None:
    if not _gate:
        _gate.append(asyncio.Event())
    _gate[0].set()


def start_held_calls(peer: int, count: int) -> None:
    """Start ``count`` calls to ``held`` on ``peer`` in the background."""
    futures = [shardio.submit_to(peer, held) for _ in range(count)]
    _background.append(asyncio.gather(*futures))


async def background_results() -> list:
    return await _background.pop()


async def nap(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def call_nap(peer: int, seconds: float) -> None:
    await shardio.submit_to(peer, nap, seconds)
