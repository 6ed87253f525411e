"""A Link: one peer as seen from one endpoint.

It owns this side of the two rings between the pair (the outbound ring as
producer, the inbound ring as consumer), the peer's sleeping flag and
doorbell (to wake it), and the calls waiting for the peer's replies.

A message that does not fit in the outbound ring waits in the link's
backlog, in order, until the consumer frees space; the ring never grows.
The backlog holds only messages whose callers are waiting for their result.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from ._ring import Flag, Ring

_eventfd_write = os.eventfd_write


class Link:
    __slots__ = (
        "peer", "outbound", "inbound", "peer_sleeping", "peer_doorbell_fd", "backlog",
        "pending", "dead", "sent_messages", "sent_bytes", "received_messages",
        "received_bytes", "producer_waits", "doorbells_rung", "interned", "functions",
    )

    def __init__(self, peer: int, outbound: Ring, inbound: Ring, peer_sleeping: Flag,
                 peer_doorbell_fd: int) -> None:
        self.peer = peer
        self.outbound = outbound
        self.inbound = inbound
        self.peer_sleeping = peer_sleeping
        self.peer_doorbell_fd = peer_doorbell_fd
        self.backlog: deque[list[Any]] = deque()
        self.pending: dict[int, Any] = {}
        self.dead = False
        self.sent_messages = 0
        self.sent_bytes = 0
        self.received_messages = 0
        self.received_bytes = 0
        self.producer_waits = 0
        self.doorbells_rung = 0
        self.interned: dict[Any, int] = {}   # functions this side sent, by number
        self.functions: dict[int, Any] = {}  # functions the peer sent, by number

    def send(self, payload: bytes) -> bool:
        """Put a message on the ring (or the backlog); wake the peer if it sleeps.

        Returns True when the message went to the backlog.
        """
        self.sent_messages += 1
        self.sent_bytes += len(payload)
        if self.backlog:
            self.backlog.append([payload, 0])
            return True
        size = len(payload)
        reached = self.outbound.put(payload)
        if reached and self.peer_sleeping.test_and_clear():  # wake_peer(), inlined
            self._ring_peer()
        if reached == size:
            return False
        self.backlog.append([payload, reached])
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
            if reached == len(payload):
                backlog.popleft()
                continue
            entry[1] = reached
            if not outbound.request_space():
                break
        if moved:
            self.wake_peer()
        return moved

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
