"""A Link: one peer as seen from one endpoint.

It owns this side of the two rings between the pair (the outbound ring as
producer, the inbound ring as consumer), the peer's sleeping flag and
doorbell (to wake it), and the calls waiting for the peer's replies.

A message that does not fit in the outbound ring waits in the link's
backlog, in order, until the consumer frees space; the ring never grows.

Calls toward the peer are bounded (seastar's ``smp_service_group``): at most
``max_calls`` wait for their replies and at most ``max_bytes`` of pickled
calls sit in the backlog (plus the one message that crossed the line).  A
call beyond that waits in ``waiting``, not yet pickled, in submission order,
until a reply or a drained backlog makes room (see :meth:`has_room`).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from ._ring import Flag, Ring

_eventfd_write = os.eventfd_write

DEFAULT_MAX_CALLS = 1024
"""Calls in flight toward one peer, by default (ShardGroup's ``max_calls_per_peer``)."""
DEFAULT_MAX_BYTES = 4 << 20
"""Pickled bytes queued toward one peer outside the ring, by default
(ShardGroup's ``max_queued_bytes_per_peer``)."""


class Link:
    __slots__ = (
        "peer", "outbound", "inbound", "peer_sleeping", "peer_doorbell_fd", "backlog",
        "backlog_bytes", "pending", "waiting", "max_calls", "max_bytes", "dead", "death_detail",
        "sent_messages", "sent_bytes", "_received_messages", "_received_bytes",
        "producer_waits", "bound_waits", "doorbells_rung", "interned", "functions",
    )

    def __init__(self, peer: int, outbound: Ring, inbound: Ring, peer_sleeping: Flag,
                 peer_doorbell_fd: int, *, max_calls: int = DEFAULT_MAX_CALLS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.peer = peer
        self.outbound = outbound
        self.inbound = inbound
        self.peer_sleeping = peer_sleeping
        self.peer_doorbell_fd = peer_doorbell_fd
        self.backlog: deque[list[Any]] = deque()
        self.backlog_bytes = 0
        self.pending: dict[int, Any] = {}
        self.waiting: deque[tuple] = deque()  # calls held back by the bound, not pickled
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.dead = False
        self.death_detail = ""  # how the peer died: every later call's ShardDied says it too
        self.sent_messages = 0
        self.sent_bytes = 0
        self._received_messages = 0  # taken with Ring.get(); Ring.dispatch() counts its own
        self._received_bytes = 0
        self.producer_waits = 0
        self.bound_waits = 0
        self.doorbells_rung = 0
        self.interned: dict[Any, int] = {}   # functions this side sent, by number
        self.functions: dict[int, Any] = {}  # functions the peer sent, by number

    @property
    def received_messages(self) -> int:
        """Messages taken from the peer (by ``inbound.get`` or ``inbound.dispatch``)."""
        return self._received_messages + self.inbound.dispatched_messages

    @received_messages.setter
    def received_messages(self, value: int) -> None:
        self._received_messages = value - self.inbound.dispatched_messages

    @property
    def received_bytes(self) -> int:
        """Bytes of the messages taken from the peer."""
        return self._received_bytes + self.inbound.dispatched_bytes

    @received_bytes.setter
    def received_bytes(self, value: int) -> None:
        self._received_bytes = value - self.inbound.dispatched_bytes

    def has_room(self) -> bool:
        """May a new call be pickled and sent now?  False while others wait (FIFO)."""
        return (not self.waiting and len(self.pending) < self.max_calls
                and self.backlog_bytes < self.max_bytes)

    def room_for_waiting(self) -> bool:
        """May the first waiting call go now?"""
        return len(self.pending) < self.max_calls and self.backlog_bytes < self.max_bytes

    def send(self, payload: bytes, wake: bool = True) -> bool:
        """Put a message on the ring (or the backlog); wake the peer if it sleeps.

        ``wake=False`` leaves the wake-up to the caller, who must call
        :meth:`wake_peer` afterwards (once for a batch of sends: the check only
        has to follow the publication, so one check covers every send before it).
        Returns True when the message went to the backlog.
        """
        self.sent_messages += 1
        size = len(payload)
        self.sent_bytes += size
        if self.backlog:
            self.backlog.append([payload, 0])
            self.backlog_bytes += size
            return True
        reached = self.outbound.put(payload)
        if reached and wake and self.peer_sleeping.test_and_clear():  # wake_peer(), inlined
            self._ring_peer()
        if reached == size:
            return False
        self.backlog.append([payload, reached])
        self.backlog_bytes += size - reached
        self.producer_waits += 1
        # flush() marks us as waiting for space and retries if space appeared
        # in the meantime; returning without that retry could wait forever.
        self.flush()
        return bool(self.backlog)

    def flush(self) -> bool:
        """Move backlog into the ring as space allows; True if anything moved."""
        moved = False
        backlog = self.backlog
        outbound = self.outbound
        while backlog:
            entry = backlog[0]
            payload, start = entry
            reached = outbound.put(payload, start)
            if reached != start:
                moved = True
                self.backlog_bytes -= reached - start
            if reached == len(payload):
                backlog.popleft()
                continue
            entry[1] = reached
            if not outbound.request_space():
                break
        if moved:
            self.wake_peer()
        return moved

    def drop_backlog(self) -> None:
        self.backlog.clear()
        self.backlog_bytes = 0

    def wake_peer(self) -> None:
        """Ring the peer's doorbell if, and only if, it is asleep."""
        if self.peer_sleeping.test_and_clear():
            self._ring_peer()

    def _ring_peer(self) -> None:
        self.doorbells_rung += 1
        try:
            _eventfd_write(self.peer_doorbell_fd, 1)
        except OSError:
            pass  # the peer's doorbell is gone: it is dead or stopping

    def close(self) -> None:
        self.outbound.close()
        self.inbound.close()
        self.peer_sleeping.close()
