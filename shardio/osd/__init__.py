"""The OSD read-path prototype: an object storage daemon built on shardio.

Modules (import them directly; at import time this package loads only the
protocol module, so the protocol can be used without the reactor or the
fabric):

* ``protocol``    -- the wire format: checksummed binary frames and their decoder
* ``osdmap``      -- placement: pools, placement groups (pgs), pg -> shard, epochs
* ``objectstore`` -- a log-structured object store written against the Env
  interface, so it runs on tame stacks in a shard and in plain threads alike
* ``operations``  -- what each request op does to an object store (``apply_op``)
* ``messenger``   -- per-shard listeners and connections: pipelining, routing,
  cross-shard hops, backpressure
* ``server``      -- the per-shard OSD service (``ShardNode``) and the controller
  that starts a group and serves (``OSDServer``)
* ``client``      -- an asyncio client and a blocking client that route each
  request straight to the owning shard (``client_core``: their shared core,
  without I/O; ``client_blocking``, ``client_asyncio``: the two transports)
* ``stats``       -- the OSD's per-shard counters and latency histograms
* ``loadgen``     -- verifiable object contents, loading, closed- and open-loop reads
* ``demo``        -- the end-to-end demonstration (``python -m shardio.osd demo``)
* ``__main__``    -- the command line: serve, load, get, put, stat, ls, bench, demo

See docs/osd.md.
"""

from .protocol import (
    BadChecksum,
    BadHeaderChecksum,
    BadMagic,
    FrameError,
    FrameTooLarge,
    MalformedFrame,
    MalformedPayload,
    NameTooLong,
    ObjectNotFound,
    OSDClientError,
    OSDConnectionError,
    OSDProtocolError,
    OSDStatusError,
    OSDTimeout,
    ShardUnavailable,
    Truncated,
    UnknownOp,
    UnsupportedVersion,
)

#: The exceptions of the wire protocol and of the clients, from one place. (The map's
#: errors are in ``osdmap``, the store's in ``objectstore``, the server's in ``server``.)
__all__ = [
    "BadChecksum",
    "BadHeaderChecksum",
    "BadMagic",
    "FrameError",
    "FrameTooLarge",
    "MalformedFrame",
    "MalformedPayload",
    "NameTooLong",
    "OSDClientError",
    "OSDConnectionError",
    "OSDProtocolError",
    "OSDStatusError",
    "OSDTimeout",
    "ObjectNotFound",
    "ShardUnavailable",
    "Truncated",
    "UnknownOp",
    "UnsupportedVersion",
]
