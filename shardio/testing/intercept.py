"""Message interception on the fabric: drop, delay, expect and spoof cross-shard calls.

libprocess's ``DROP_MESSAGE``/``FUTURE_MESSAGE``/``post`` for shardio.  Rules
sit on the *source* shard, in front of its sends (``Reactor.interceptor``),
and see every call it makes with ``submit_to`` to another shard::

    from shardio.testing import intercept

    with intercept(group) as net:
        lost = net.drop(1, 2, net.match(func=replicate))   # shard 1 -> 2 calls to replicate
        group.submit(1, write_with_retry, b"x")
        first = lost.result(timeout=5)                     # the Message that was lost
        net.inject(1, 2, replicate, *first.args)           # spoof it, as if from shard 1

* ``net.drop(src, dst, match)``: matching calls are lost: the callee never
  runs them and the caller's future never completes (its own timeout fires;
  with a virtual clock, after ``clock.advance``).
* ``net.delay(src, dst, match, seconds)``: matching calls go out ``seconds``
  later (loop time: virtual on a virtual-time group), in the order they were
  made; other calls may overtake them.
* ``net.expect(src, dst, match)``: matching calls go through; its future is
  the first one.
* ``net.inject(src, dst, func, *args, **kwargs)``: shard ``dst`` runs the
  call as if shard ``src`` had sent it (it crosses the src -> dst ring,
  untouched by the rules); a future of its result.

drop, delay and expect return a :class:`concurrent.futures.Future` of the
first :class:`Message` they matched, which fails with :class:`NoMatchingMessage`
if none came before the ``with`` block ended.  ``src``/``dst`` of ``None``
mean any shard; ``count`` limits drop and delay to their first ``count``
matches on each source shard.  Rules are checked in the order they were
made: every matching expect sees the call, the first matching drop or delay
takes it.

``match`` is None (every call), ``net.match(func=..., args=...)``,
``net.match(method="name")`` (a method of a ``Sharded`` service), or any
picklable predicate ``match(func, args, kwargs) -> bool`` (a module-level
function: it runs on the source shard, maybe in another process).

Leaving the block removes every rule, sends the calls still delayed (in
order) and leaves the dropped ones lost.  Only shard-to-shard calls are seen:
not calls a shard makes to itself, not ``group.submit`` from the owner, not
replies.  Leave the block before stopping the group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from ..errors import ShardioError
from ..group import ShardGroup
from ..reactor import Reactor, require_reactor
from ..sharded import _invoke as _sharded_invoke  # Sharded calls: (key, method, args, kw)

__all__ = ["Match", "Message", "Net", "NoMatchingMessage", "intercept"]

Predicate = Callable[[Callable, tuple, dict], bool]


class NoMatchingMessage(ShardioError):
    """The interception ended before any call matched the rule."""


@dataclass(frozen=True)
class Message:
    """A cross-shard call as a rule saw it."""

    src: int
    dst: int
    func: Callable
    args: tuple
    kwargs: dict

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        return f"<Message {self.src}->{self.dst} {name}{self.args!r} {self.kwargs or ''}>"


@dataclass(frozen=True)
class Match:
    """Matches calls to ``func`` (by equality) whose positional args start with ``args``.

    ``method`` matches calls to that method of a :class:`~shardio.Sharded`
    service (``svc.invoke_on(shard, "method", ...)``); ``args`` then applies
    to the method's arguments.
    """

    func: Callable | None = None
    args: tuple | None = None
    method: str | None = None

    def __call__(self, func: Callable, args: tuple, kwargs: dict) -> bool:
        if self.method is not None:
            if func is not _sharded_invoke or args[1] != self.method:
                return False
            args = args[2]
        if self.func is not None and func != self.func:
            return False
        return self.args is None or tuple(args[:len(self.args)]) == tuple(self.args)


@dataclass
class _Rule:
    """One rule, as installed on a source shard (it crosses there pickled)."""

    token: int
    rule_id: int
    action: Literal["drop", "delay", "expect"]
    dst: int | None
    match: Predicate | None
    seconds: float = 0.0
    count: int | None = None

    def matches(self, dst: int, func: Callable, args: tuple, kwargs: dict) -> bool:
        if self.dst is not None and self.dst != dst:
            return False
        if self.count is not None and self.count <= 0:
            return False
        return self.match is None or bool(self.match(func, args, kwargs or {}))


_tokens = itertools.count(1)
_rule_ids = itertools.count(1)  # unique across interceptions: shards key their state by it


class Net:
    """The rules of one ``intercept(group)`` block; see the module docstring."""

    match = Match

    def __init__(self, group: ShardGroup, *, timeout: float = 10.0) -> None:
        self.group = group
        self.timeout = timeout
        self._token = next(_tokens)
        self._shards: set[int] = set()
        self._firsts: dict[int, concurrent.futures.Future] = {}
        self._closed = False

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------ rules

    def drop(self, src: int | None, dst: int | None, match: Predicate | None = None, *,
             count: int | None = None) -> concurrent.futures.Future[Message]:
        """Lose matching calls from ``src`` to ``dst``; a future of the first one lost."""
        return self._add("drop", src, dst, match, count=count)

    def delay(self, src: int | None, dst: int | None, match: Predicate | None,
              seconds: float, *, count: int | None = None) -> concurrent.futures.Future[Message]:
        """Send matching calls ``seconds`` later, in order; a future of the first one."""
        if seconds < 0:
            raise ValueError(f"a delay cannot be negative, got {seconds}")
        return self._add("delay", src, dst, match, seconds=seconds, count=count)

    def expect(self, src: int | None, dst: int | None, match: Predicate | None = None
               ) -> concurrent.futures.Future[Message]:
        """Let matching calls through; a future of the first one."""
        return self._add("expect", src, dst, match)

    def inject(self, src: int, dst: int, func: Callable, /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future:
        """Make shard ``dst`` run ``func(*args, **kwargs)`` as if shard ``src`` had sent it."""
        if src == dst:
            raise ValueError("inject() needs two different shards")
        self._check_shard(dst)
        return self.group.submit(src, _inject, dst, func, args, kwargs)

    def _add(self, action: Literal["drop", "delay", "expect"], src: int | None,
             dst: int | None, match: Predicate | None, *, seconds: float = 0.0,
             count: int | None = None) -> concurrent.futures.Future[Message]:
        if self._closed:
            raise ShardioError("this interception has ended; open a new intercept(group)")
        if dst is not None:
            self._check_shard(dst)
        if src is not None and src == dst:
            raise ValueError(f"shard {src} does not send calls to itself through the fabric")
        sources = range(self.group.shards) if src is None else [self._check_shard(src)]
        rule = _Rule(self._token, next(_rule_ids), action, dst, match, seconds, count)
        first: concurrent.futures.Future[Message] = concurrent.futures.Future()
        self._firsts[rule.rule_id] = first
        deadline = time.monotonic() + self.timeout
        for shard in sources:
            if shard == dst:
                continue
            _wait(self.group.submit(shard, _install, rule), deadline, "installing a rule")
            self._shards.add(shard)
            self.group.submit(shard, _watch, rule.rule_id).add_done_callback(
                partial(_settle_first, first))
        return first

    def _check_shard(self, shard: int) -> int:
        if not 0 <= shard < self.group.shards:
            raise ValueError(f"no shard {shard}: this group has shards 0..{self.group.shards - 1}")
        return shard

    # ------------------------------------------------------------ ending

    def close(self) -> None:
        """Remove every rule, send what is still delayed, fail the unmatched futures."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.group.running:
                deadline = time.monotonic() + self.timeout
                removals = [self.group.submit(shard, _uninstall, self._token)
                            for shard in sorted(self._shards)]
                for removal in removals:
                    for rule_id, message in _wait(removal, deadline, "removing rules").items():
                        if message is not None:
                            _set(self._firsts[rule_id], message)
        finally:
            for first in self._firsts.values():
                _set(first, NoMatchingMessage(
                    "no call matched this rule before the interception ended"))


def intercept(group: ShardGroup, *, timeout: float = 10.0) -> Net:
    """``with intercept(group) as net:`` -- rules on the calls between ``group``'s shards."""
    if not group.running:
        raise ShardioError(f"intercept() needs a running group, not {group!r}")
    return Net(group, timeout=timeout)


def _wait(future: concurrent.futures.Future, deadline: float, what: str) -> Any:
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        raise ShardioError(f"{what}: a shard did not answer in time (is its reactor blocked?)"
                           ) from None


def _set(future: concurrent.futures.Future, outcome: Any) -> None:
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass  # another source shard, or the caller, got there first


def _settle_first(first: concurrent.futures.Future, watch: concurrent.futures.Future) -> None:
    if not watch.cancelled() and watch.exception() is None and watch.result() is not None:
        _set(first, watch.result())


# ---------------------------------------------------------------- shard side


class ShardNet:
    """The interceptor of one source shard: its rules, delayed calls and first matches."""

    def __init__(self, reactor: Reactor, previous: Any) -> None:
        self.reactor = reactor
        self.previous = previous
        self.rules: list[_Rule] = []
        self.firsts: dict[int, asyncio.Future] = {}
        self.delayed: dict[int, deque] = {}

    def submit(self, reactor: Reactor, shard: int, func: Callable, args: tuple,
               kwargs: dict | None) -> asyncio.Future:
        """The hook: decide the fate of one outgoing call (Reactor.submit_to calls it)."""
        for rule in self.rules:
            if not rule.matches(shard, func, args, kwargs):
                continue
            first = self.firsts[rule.rule_id]
            if not first.done():
                first.set_result(Message(reactor.shard_id, shard, func, args, kwargs or {}))
            if rule.action == "expect":
                continue
            if rule.count is not None:
                rule.count -= 1
            if rule.action == "drop":
                return reactor.loop.create_future()  # lost: nobody will ever complete it
            return self._delay(rule, shard, func, args, kwargs)
        return self._send(shard, func, args, kwargs)

    def _send(self, shard: int, func: Callable, args: tuple, kwargs: dict | None
              ) -> asyncio.Future:
        if self.previous is not None:
            return self.previous.submit(self.reactor, shard, func, args, kwargs)
        return self.reactor.send_call(shard, func, args, kwargs)

    def _delay(self, rule: _Rule, shard: int, func: Callable, args: tuple,
               kwargs: dict | None) -> asyncio.Future:
        loop = self.reactor.loop
        proxy = loop.create_future()
        queue = self.delayed.setdefault(rule.rule_id, deque())
        queue.append((loop.time() + rule.seconds, shard, func, args, kwargs, proxy))
        if len(queue) == 1:
            loop.call_at(queue[0][0], self._release, rule.rule_id)
        return proxy

    def _release(self, rule_id: int) -> None:
        """The timer of the oldest delayed call fired: send it, and those due with it.

        The times in a queue never decrease (one delay, a loop time that does
        not go back), so this needs no reading of the clock, whose resolution
        differs between loops (libuv's is a millisecond).  Then arm the next.
        """
        queue = self.delayed.get(rule_id)
        if not queue:
            return
        due = queue[0][0]
        while queue and queue[0][0] <= due:
            self._forward(*queue.popleft()[1:])
        if queue:
            self.reactor.loop.call_at(queue[0][0], self._release, rule_id)

    def _forward(self, shard: int, func: Callable, args: tuple, kwargs: dict | None,
                 proxy: asyncio.Future) -> None:
        try:
            real = self._send(shard, func, args, kwargs)
        except Exception as error:
            if not proxy.done():
                proxy.set_exception(error)
            return
        real.add_done_callback(partial(_copy_outcome, proxy))

    def remove(self, token: int) -> dict[int, Message | None]:
        """Drop the rules of one interception; flush its delayed calls; its first matches."""
        mine = [rule for rule in self.rules if rule.token == token]
        self.rules = [rule for rule in self.rules if rule.token != token]
        outcome: dict[int, Message | None] = {}
        for rule in mine:
            for entry in self.delayed.pop(rule.rule_id, ()):
                self._forward(*entry[1:])
            first = self.firsts.pop(rule.rule_id)
            caught = first.done() and not first.cancelled()
            outcome[rule.rule_id] = first.result() if caught else None
            first.cancel()
        return outcome


def _copy_outcome(proxy: asyncio.Future, real: asyncio.Future) -> None:
    if proxy.done():  # the caller gave up (its timeout); the call still went out
        if not real.cancelled():
            real.exception()
        return
    if real.cancelled():
        proxy.cancel()
    elif real.exception() is not None:
        proxy.set_exception(real.exception())
    else:
        proxy.set_result(real.result())


def _install(rule: _Rule) -> None:
    reactor = require_reactor()
    net = reactor.interceptor
    if not isinstance(net, ShardNet):
        net = ShardNet(reactor, previous=net)
        reactor.interceptor = net
    net.firsts[rule.rule_id] = reactor.loop.create_future()
    net.rules.append(rule)


async def _watch(rule_id: int) -> Message | None:
    """Answers the owner with the first call the rule matched on this shard."""
    net = require_reactor().interceptor
    first = net.firsts.get(rule_id) if isinstance(net, ShardNet) else None
    if first is None:
        return None
    try:
        return await asyncio.shield(first)
    except asyncio.CancelledError:
        return None  # the interception ended: remove() reports the outcome


def _uninstall(token: int) -> dict[int, Message | None]:
    reactor = require_reactor()
    net = reactor.interceptor
    if not isinstance(net, ShardNet):
        return {}
    outcome = net.remove(token)
    if not net.rules:
        reactor.interceptor = net.previous
    return outcome


async def _inject(dst: int, func: Callable, args: tuple, kwargs: dict | None) -> Any:
    return await require_reactor().send_call(dst, func, args, kwargs)
