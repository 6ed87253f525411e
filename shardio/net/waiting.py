"""Requests in flight that wait on something: Ceph's ``dump_ops_in_flight``.

A request that completes in the loop pass that started it (a page-cache
hit) is never recorded: tracking costs nothing on the hot path. A request is
recorded when it starts to wait — its tame stack parked in ``execute`` (a
cold read, an fsync, a lock), it was sent to another shard, or it waits in
its connection's backlog — with the stage it waits in, and removed when it
completes. ``dump(threshold)`` lists those older than a threshold, oldest
first.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["STAGE_RUNNING", "STAGE_SENT", "STAGE_THROTTLED", "WaitingRequests"]

#: What a recorded request waits for.
STAGE_RUNNING = "running here: parked on its tame stack (file I/O, sync or a lock)"
STAGE_SENT = "sent to shard {shard}, waiting for its reply"
STAGE_THROTTLED = "throttled: waiting in its connection's backlog"


class WaitingRequests:
    """The waiting requests of one service on one shard, by a key the caller chooses."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        #: key -> (stage, started: perf_counter() when decoded, details for the dump)
        self.entries: dict[int, tuple[str, float, dict[str, Any]]] = {}

    def track(self, key: int, stage: str, started: float, details: dict[str, Any]) -> None:
        self.entries[key] = (stage, started, details)

    def untrack(self, key: int) -> None:
        self.entries.pop(key, None)

    def slow(self, threshold: float) -> int:
        """How many waiting requests are older than ``threshold`` seconds."""
        limit = time.perf_counter() - threshold
        return sum(1 for _stage, started, _d in self.entries.values() if started <= limit)

    def dump(self, threshold: float = 0.0) -> list[dict[str, Any]]:
        """The requests waiting for longer than ``threshold`` seconds, oldest first:
        their details, ``stage`` and ``age_seconds``."""
        now = time.perf_counter()
        waiting = sorted(
            (e for e in self.entries.values() if now - e[1] >= threshold), key=lambda e: e[1]
        )
        return [
            {**details, "stage": stage, "age_seconds": round(now - started, 6)}
            for stage, started, details in waiting
        ]
