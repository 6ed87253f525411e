"""The cross-shard fabric: SPSC rings in shared memory, flags and doorbells."""

from ._ring import Flag, Ring
from .doorbell import Doorbell
from .link import Link
from .mesh import Mesh, MeshLayout
from .segment import SharedSegment

__all__ = ["Doorbell", "Flag", "Link", "Mesh", "MeshLayout", "Ring", "SharedSegment"]
