"""Requests in flight that wait on something: Ceph's ``dump_ops_in_flight``.

A request that completes in the loop pass that started it (a page-cache
hit) is never recorded: tracking costs nothing on the hot path. A request is
recorded when it starts to wait — its tame stack parked in the store (a
cold read, an fsync, a lock), it crossed to the shard that owns it, or it
waits in its connection's backlog — with the stage it waits in, and removed
when it completes. ``dump(threshold)`` lists those older than a threshold,
oldest first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .protocol import Op

__all__ = ["OpInFlight", "OpsInFlight"]

#: What a recorded request waits for.
STAGE_STORE = "store: parked on its tame stack (file I/O, sync or a lock)"
STAGE_STORE_FOR_PEER = "store, for shard {shard}: parked on its tame stack"
STAGE_HOP = "sent to shard {shard}, waiting for its reply"
STAGE_THROTTLED = "throttled: waiting in its connection's backlog"


@dataclass(slots=True)
class OpInFlight:
    """One waiting request."""

    op: int
    name: bytes
    pool: int
    tid: int
    peer: Any
    stage: str
    started: float  #: time.perf_counter() when the shard decoded it

    def describe(self, now: float) -> dict[str, Any]:
        try:
            op_name = Op(self.op).name
        except ValueError:
            op_name = str(self.op)
        return {
            "op": op_name,
            "object": self.name.decode("utf-8", "backslashreplace"),
            "pool": self.pool,
            "tid": self.tid,
            "client": None if self.peer is None else str(self.peer),
            "stage": self.stage,
            "age_seconds": round(now - self.started, 6),
        }


class OpsInFlight:
    """The waiting requests of one shard, by a key the caller chooses (``id`` of its item)."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: dict[int, OpInFlight] = {}

    def track(self, key: int, record: OpInFlight) -> None:
        self.ops[key] = record

    def untrack(self, key: int) -> None:
        self.ops.pop(key, None)

    def slow(self, threshold: float) -> int:
        """How many waiting requests are older than ``threshold`` seconds."""
        limit = time.perf_counter() - threshold
        return sum(1 for record in self.ops.values() if record.started <= limit)

    def dump(self, threshold: float = 0.0) -> list[dict[str, Any]]:
        """The requests waiting for longer than ``threshold`` seconds, oldest first."""
        now = time.perf_counter()
        records = [r for r in self.ops.values() if now - r.started >= threshold]
        records.sort(key=lambda r: r.started)
        return [r.describe(now) for r in records]
