"""One shard's keys: values, expiry on the shard's own loop timers, and the commands
that run where a key lives.

Each shard owns the keys whose hash slot it owns (``slots.py``) and nothing
else; a command for a key runs on that shard, called directly when the
connection is there and with ``submit_to`` when it is not. A key with a time
to live gets a loop timer that deletes it when due (and a read checks the
deadline too, so a key is never seen past it). Every function here returns
an encoded RESP reply, or the pieces a multi-key command assembles; ``null``
is the connection's encoding of a missing value (RESP2 and RESP3 differ).
"""

from __future__ import annotations

import asyncio

import shardio

from . import resp

__all__ = ["KeySpace", "keyspace"]

WRONG_INTEGER = resp.error("ERR value is not an integer or out of range")
WRONG_SYNTAX = resp.error("ERR syntax error")


class KeySpace:
    """The keys of this shard, with their deadlines (loop time) and expiry timers."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.deadlines: dict[bytes, float] = {}
        self.timers: dict[bytes, asyncio.TimerHandle] = {}
        self.commands = 0  #: commands run on this shard (the tests' per-shard counter)

    # -- keys ------------------------------------------------------------------------

    def _live(self, key: bytes) -> bytes | None:
        value = self.data.get(key)
        deadline = self.deadlines.get(key) if value is not None else None
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            self._delete(key)
            return None
        return value

    def _delete(self, key: bytes) -> bool:
        self._persist(key)
        return self.data.pop(key, None) is not None

    def _persist(self, key: bytes) -> None:
        self.deadlines.pop(key, None)
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _expire_at(self, key: bytes, deadline: float) -> None:
        self._persist(key)
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            self.data.pop(key, None)
            return
        self.deadlines[key] = deadline
        self.timers[key] = loop.call_at(deadline, self._expired, key)

    def _expired(self, key: bytes) -> None:
        self.timers.pop(key, None)
        if self.deadlines.get(key, float("inf")) <= asyncio.get_running_loop().time():
            self.deadlines.pop(key, None)
            self.data.pop(key, None)

    # -- single-key commands -----------------------------------------------------------

    def get(self, key: bytes, null: bytes) -> bytes:
        self.commands += 1
        value = self._live(key)
        return null if value is None else resp.bulk(value)

    def set(self, key: bytes, value: bytes, options: list[bytes], null: bytes) -> bytes:
        self.commands += 1
        ttl_ms: int | None = None
        only: bytes | None = None
        keep_ttl = False
        i = 0
        while i < len(options):
            word = options[i].upper()
            if word in (b"EX", b"PX") and i + 1 < len(options) and ttl_ms is None:
                try:
                    amount = int(options[i + 1])
                except ValueError:
                    return WRONG_INTEGER
                if amount <= 0:
                    return resp.error("ERR invalid expire time in 'set' command")
                ttl_ms = amount * 1000 if word == b"EX" else amount
                i += 2
            elif word in (b"NX", b"XX") and only is None:
                only = word
                i += 1
            elif word == b"KEEPTTL" and ttl_ms is None:
                keep_ttl = True
                i += 1
            else:
                return WRONG_SYNTAX
        exists = self._live(key) is not None
        if (only == b"NX" and exists) or (only == b"XX" and not exists):
            return null
        self.data[key] = value
        if ttl_ms is not None:
            self._expire_at(key, asyncio.get_running_loop().time() + ttl_ms / 1000)
        elif not keep_ttl:
            self._persist(key)
        return resp.OK

    def incr_by(self, key: bytes, amount: bytes) -> bytes:
        self.commands += 1
        try:
            delta = int(amount)
            current = int(self._live(key) or b"0")
        except ValueError:
            return WRONG_INTEGER
        value = current + delta
        if not -(1 << 63) <= value < 1 << 63:
            return resp.error("ERR increment or decrement would overflow")
        self.data[key] = b"%d" % value
        return resp.integer(value)

    def expire(self, key: bytes, amount: bytes, unit_ms: int) -> bytes:
        self.commands += 1
        try:
            ms = int(amount) * unit_ms
        except ValueError:
            return WRONG_INTEGER
        if self._live(key) is None:
            return resp.integer(0)
        self._expire_at(key, asyncio.get_running_loop().time() + ms / 1000)
        return resp.integer(1)

    def ttl(self, key: bytes, unit_ms: int) -> bytes:
        self.commands += 1
        if self._live(key) is None:
            return resp.integer(-2)
        deadline = self.deadlines.get(key)
        if deadline is None:
            return resp.integer(-1)
        left_ms = (deadline - asyncio.get_running_loop().time()) * 1000
        return resp.integer(max(0, round(left_ms / unit_ms)))

    # -- pieces of multi-key commands (the keys this shard owns) -----------------------

    def get_many(self, keys: list[bytes], null: bytes) -> list[bytes]:
        self.commands += 1
        return [null if (v := self._live(k)) is None else resp.bulk(v) for k in keys]

    def set_many(self, pairs: list[tuple[bytes, bytes]]) -> int:
        self.commands += 1
        for key, value in pairs:
            self.data[key] = value
            self._persist(key)
        return len(pairs)

    def delete_many(self, keys: list[bytes]) -> int:
        self.commands += 1
        return sum(1 for k in keys if self._live(k) is not None and self._delete(k))

    def exists_many(self, keys: list[bytes]) -> int:
        self.commands += 1
        return sum(1 for k in keys if self._live(k) is not None)

    def size(self) -> int:
        loop_time = asyncio.get_running_loop().time()
        expired = [k for k, d in self.deadlines.items() if d <= loop_time]
        for key in expired:
            self._delete(key)
        return len(self.data)

    async def stop(self) -> None:
        """The shard stops: cancel the expiry timers."""
        self.flush()

    def flush(self) -> int:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.deadlines.clear()
        self.data.clear()
        return 0


_SERVICE_KEY = "redis_kv.keyspace"


def keyspace() -> KeySpace:
    """This shard's keys (made on first use; one per shard, also on the thread backend)."""
    reactor = shardio.current_reactor()
    if reactor is None:
        raise shardio.NotInShardError("redis_kv keys live on shards: call this on a shard")
    services = reactor.services
    space = services.get(_SERVICE_KEY)
    if space is None:
        space = services[_SERVICE_KEY] = KeySpace()
    return space  # type: ignore[no-any-return]


# Module-level entry points for ``submit_to`` (functions cross by name).


def run(method: str, *args: object) -> object:
    """Run a KeySpace method on this shard (the owner of the keys in ``args``)."""
    return getattr(keyspace(), method)(*args)
