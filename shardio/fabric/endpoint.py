"""Endpoints added to a running group: rings to and from every shard in a segment of their own.

The group's mesh (shards and owner) is fixed when the group starts; an
endpoint added later gets a separate memfd holding its control block (its
``sleeping`` flag) and two rings per shard, ``endpoint -> shard s`` and
``shard s -> endpoint``, plus a doorbell of its own.  Endpoints talk only to
shards, never to each other, so a group with E added endpoints and N shards
holds 2 x N x E extra rings, made and freed one endpoint at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._ring import HEADER_BYTES, Flag, Ring
from .doorbell import Doorbell
from .segment import SharedSegment

_PAGE = 4096


@dataclass(frozen=True)
class EndpointLayout:
    """Where an added endpoint's flag and rings live in its segment."""

    shard_count: int
    ring_bytes: int

    @property
    def ring_stride(self) -> int:
        return (HEADER_BYTES + self.ring_bytes + _PAGE - 1) // _PAGE * _PAGE

    @property
    def size(self) -> int:
        return _PAGE + self.ring_stride * 2 * self.shard_count

    def to_shard_offset(self, shard: int) -> int:
        return _PAGE + self.ring_stride * 2 * shard

    def from_shard_offset(self, shard: int) -> int:
        return _PAGE + self.ring_stride * (2 * shard + 1)

    def shard_sleeping_offset(self, shard: int) -> int:
        """Where shard ``shard`` mirrors its sleeping flag for an attached client."""
        if not 0 <= shard < MAX_MIRRORED_SHARDS:
            raise ValueError(f"an endpoint mirrors at most {MAX_MIRRORED_SHARDS} shards' flags")
        return SHARD_SLEEPING_OFFSET + 4 * shard


SLEEPING_OFFSET = 0
SHARD_SLEEPING_OFFSET = 64
"""The control page also holds a copy of each shard's sleeping flag (for a client in
another process, which cannot see the mesh): one u32 per shard from here."""
MAX_MIRRORED_SHARDS = (_PAGE - SHARD_SLEEPING_OFFSET) // 4


class EndpointSegment:
    """An added endpoint's memfd and doorbell, as held by one process."""

    def __init__(
        self, number: int, layout: EndpointLayout, segment: SharedSegment, doorbell: Doorbell
    ) -> None:
        self.number = number
        self.layout = layout
        self.segment = segment
        self.doorbell = doorbell

    @classmethod
    def create(cls, number: int, shard_count: int, ring_bytes: int, *,
               sealed: bool = False) -> EndpointSegment:
        """A new segment; ``sealed`` (another process attaches) seals its size."""
        layout = EndpointLayout(shard_count, ring_bytes)
        segment = SharedSegment(layout.size, name=f"shardio-endpoint-{number}", sealed=sealed)
        try:
            doorbell = Doorbell()
        except BaseException:
            segment.close()
            raise
        for shard in range(shard_count):
            Ring(segment.map, layout.to_shard_offset(shard), ring_bytes, True).close()
            Ring(segment.map, layout.from_shard_offset(shard), ring_bytes, True).close()
        return cls(number, layout, segment, doorbell)

    @classmethod
    def adopt(
        cls, number: int, layout: EndpointLayout, segment_fd: int, doorbell_fd: int
    ) -> EndpointSegment:
        """Take ownership of descriptors received from the group's owner."""
        return cls(number, layout, SharedSegment(layout.size, fd=segment_fd), Doorbell(doorbell_fd))

    def to_shard(self, shard: int) -> Ring:
        return Ring(self.segment.map, self.layout.to_shard_offset(shard), self.layout.ring_bytes)

    def from_shard(self, shard: int) -> Ring:
        return Ring(self.segment.map, self.layout.from_shard_offset(shard), self.layout.ring_bytes)

    def sleeping_flag(self) -> Flag:
        return Flag(self.segment.map, SLEEPING_OFFSET)

    def close(self) -> None:
        """Close the doorbell and the segment (after every Ring/Flag on it is closed)."""
        self.doorbell.close()
        self.segment.close()
