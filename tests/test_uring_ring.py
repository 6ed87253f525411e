"""The io_uring ring's completion pass (``Ring.complete``) on real NOPs: every token
woken once with its result, batched submits while tokens run, no nesting, a
raising token, a cancelled op's completion, and a token that closes the ring."""

from __future__ import annotations

from typing import Any

import pytest

from shardio.io import _uring


class Token:
    """A completion's receiver: records its result and may queue more work."""

    def __init__(self, log: list[Any], then: Any = None) -> None:
        self.log = log
        self.then = then

    def wake(self, value: Any) -> None:
        self.log.append((self, value))
        if self.then is not None:
            self.then(self)


def _wait_ready(ring: Any, n: int) -> None:
    for _ in range(200):
        if ring.ready() >= n:
            return
        ring.wait(10)
    raise AssertionError(f"only {ring.ready()} of {n} completions posted")


@pytest.fixture
def ring() -> Any:
    r = _uring.Ring(64)
    yield r
    r.close()


def test_complete_wakes_every_token_once_and_submits_each_batch(ring: Any) -> None:
    log: list[Any] = []

    def again(token: Token) -> None:  # a woken "stack" queues its next op
        token.then = None
        assert ring.nop(_uring.OP_NOP, token) is not None

    tokens = [Token(log, again) for _ in range(16)]
    for t in tokens:
        assert ring.nop(_uring.OP_NOP, t) is not None
    assert ring.submit() == 16 and ring.enters == 1
    _wait_ready(ring, 16)
    assert ring.complete(4) == 16
    assert [t for t, _ in log] == tokens and all(v == 0 for _, v in log)
    # the 16 NOPs the tokens queued went in 4 submits of 4, during the pass
    assert ring.enters == 1 + 4 and ring.unsubmitted == 0
    _wait_ready(ring, 16)
    assert ring.complete(4) == 16 and len(log) == 32 and ring.inflight == 0


def test_complete_called_from_a_wake_does_not_nest(ring: Any) -> None:
    log: list[Any] = []
    nested: list[int] = []
    first = Token(log, lambda t: nested.append(ring.complete(1)))
    second = Token(log)
    ring.nop(_uring.OP_NOP, first)
    ring.nop(_uring.OP_NOP, second)
    ring.submit()
    _wait_ready(ring, 2)
    assert ring.complete(1) == 2
    assert nested == [0] and [t for t, _ in log] == [first, second]


def test_a_raising_wake_leaves_the_later_completions_posted(ring: Any) -> None:
    log: list[Any] = []

    def boom(token: Token) -> None:
        raise ValueError("this stack's wake failed")

    tokens = [Token(log), Token(log, boom), Token(log)]
    for t in tokens:
        ring.nop(_uring.OP_NOP, t)
    ring.submit()
    _wait_ready(ring, 3)
    with pytest.raises(ValueError, match="wake failed"):
        ring.complete(1)
    assert [t for t, _ in log] == tokens[:2] and ring.ready() == 1
    assert ring.complete(1) == 1 and [t for t, _ in log] == tokens and ring.inflight == 0


def test_a_cancelled_ops_completion_is_discarded(ring: Any) -> None:
    log: list[Any] = []
    gone, kept = Token(log), Token(log)
    slot = ring.nop(_uring.OP_NOP, gone)
    ring.nop(_uring.OP_NOP, kept)
    assert ring.cancel(slot, gone) and ring.cancels == 1
    assert not ring.cancel(slot, gone)  # its token is already dropped
    ring.submit()  # the NOP, the other NOP and the ASYNC_CANCEL
    _wait_ready(ring, 3)
    assert ring.complete(8) == 3
    assert [t for t, _ in log] == [kept] and ring.inflight == 0


def test_a_wake_that_closes_the_ring_ends_the_pass(ring: Any) -> None:
    log: list[Any] = []
    first = Token(log, lambda t: ring.close())
    ring.nop(_uring.OP_NOP, first)
    ring.nop(_uring.OP_NOP, Token(log))
    ring.submit()
    _wait_ready(ring, 2)
    assert ring.complete(1) == 1 and [t for t, _ in log] == [first]
    assert ring.fd == -1 and ring.complete(1) == 0
