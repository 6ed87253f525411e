"""The fabric's layout: an N x (N-1) matrix of SPSC rings in one shared segment.

Endpoints 0..N-2 are the shards; the last endpoint is the group's owner
(the "outside": the process that started the group and its threads).  Each
ordered pair (i, j), i != j, has its own ring, written only by i and read
only by j, as seastar's ``smp_message_queue`` does; no endpoint has a ring
to itself.  Each endpoint has a control block with its ``sleeping`` flag
(set while it may block in epoll) and its ``alive`` flag (cleared when the
shard is known to be dead).

Rings cost N x (N-1) times their size, so by default the size follows the
endpoint count (:func:`default_ring_bytes`): 1 MiB each up to 11 endpoints,
smaller beyond, keeping the whole mesh within ``RING_MEMORY_BUDGET``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._ring import HEADER_BYTES, Flag, Ring
from .doorbell import Doorbell
from .segment import SharedSegment

CONTROL_BLOCK_BYTES = 64
_PAGE = 4096
MAX_DEFAULT_RING_BYTES = 1 << 20
MIN_DEFAULT_RING_BYTES = 64 << 10
RING_MEMORY_BUDGET = 128 << 20
"""Total ring memory the default ring size aims at (it never goes below 64 KiB a ring)."""


def default_ring_bytes(endpoints: int) -> int:
    """The largest power of two <= 1 MiB whose N x (N-1) rings fit the budget."""
    rings = max(1, endpoints * (endpoints - 1))
    size = MAX_DEFAULT_RING_BYTES
    while size > MIN_DEFAULT_RING_BYTES and rings * (HEADER_BYTES + size + _PAGE) > \
            RING_MEMORY_BUDGET:
        size //= 2
    return size


@dataclass(frozen=True)
class MeshLayout:
    """Where each flag and ring lives in the segment."""

    endpoints: int
    ring_bytes: int

    def __post_init__(self) -> None:
        if self.endpoints < 2:
            raise ValueError("a fabric needs at least two endpoints")
        if self.ring_bytes < 4096 or self.ring_bytes & (self.ring_bytes - 1):
            raise ValueError(f"ring_bytes must be a power of two >= 4096, got {self.ring_bytes}")

    @property
    def rings_offset(self) -> int:
        control = CONTROL_BLOCK_BYTES * self.endpoints
        return (control + _PAGE - 1) // _PAGE * _PAGE

    @property
    def ring_stride(self) -> int:
        return (HEADER_BYTES + self.ring_bytes + _PAGE - 1) // _PAGE * _PAGE

    @property
    def size(self) -> int:
        return self.rings_offset + self.ring_stride * self.endpoints * (self.endpoints - 1)

    def sleeping_offset(self, endpoint: int) -> int:
        return CONTROL_BLOCK_BYTES * endpoint

    def alive_offset(self, endpoint: int) -> int:
        return CONTROL_BLOCK_BYTES * endpoint + 4

    def ring_offset(self, source: int, destination: int) -> int:
        if source == destination or not (0 <= source < self.endpoints
                                          and 0 <= destination < self.endpoints):
            raise ValueError(f"no ring from endpoint {source} to endpoint {destination} in a "
                             f"mesh of {self.endpoints}")
        column = destination if destination < source else destination - 1
        return self.rings_offset + self.ring_stride * (source * (self.endpoints - 1) + column)


class Mesh:
    """The shared segment and the doorbells, as owned by one process."""

    def __init__(self, layout: MeshLayout, segment: SharedSegment, doorbells: list[Doorbell]):
        self.layout = layout
        self.segment = segment
        self.doorbells = doorbells

    @classmethod
    def create(cls, endpoints: int, ring_bytes: int) -> Mesh:
        layout = MeshLayout(endpoints, ring_bytes)
        segment = SharedSegment(layout.size)
        doorbells: list[Doorbell] = []
        try:
            for _ in range(endpoints):
                doorbells.append(Doorbell())
            mesh = cls(layout, segment, doorbells)
            for i in range(endpoints):
                for j in range(endpoints):
                    if i != j:
                        Ring(segment.map, layout.ring_offset(i, j), ring_bytes, True).close()
                alive = Flag(segment.map, layout.alive_offset(i))
                alive.set()
                alive.close()
            return mesh
        except BaseException:
            for bell in doorbells:
                bell.close()
            segment.close()
            raise

    def handle(self) -> tuple:
        """A picklable description for a spawned shard process."""
        return (self.layout, self.segment.handle(), [bell.handle() for bell in self.doorbells])

    @classmethod
    def attach(cls, handle: tuple) -> Mesh:
        layout, segment_handle, bell_handles = handle
        return cls(
            layout,
            SharedSegment.attach(segment_handle),
            [Doorbell(h.detach()) for h in bell_handles],
        )

    def ring(self, source: int, destination: int) -> Ring:
        return Ring(self.segment.map, self.layout.ring_offset(source, destination),
                    self.layout.ring_bytes)

    def sleeping_flag(self, endpoint: int) -> Flag:
        return Flag(self.segment.map, self.layout.sleeping_offset(endpoint))

    def alive_flag(self, endpoint: int) -> Flag:
        return Flag(self.segment.map, self.layout.alive_offset(endpoint))

    def close(self) -> None:
        """Close the doorbells and the segment (after every Ring/Flag is closed)."""
        for bell in self.doorbells:
            bell.close()
        self.segment.close()
