"""The OSD read-path prototype: an object storage daemon built on shardio.

Modules (import them directly; this package imports nothing at import time,
so the protocol can be used without the reactor or the fabric):

* ``protocol``    -- the wire format: checksummed binary frames and their decoder
* ``osdmap``      -- placement: pools, placement groups (pgs), pg -> shard, epochs
* ``objectstore`` -- a log-structured object store written against the Env
  interface, so it runs on tame stacks in a shard and in plain threads alike
* ``messenger``   -- per-shard listeners and connections: pipelining, routing,
  cross-shard hops, backpressure
* ``server``      -- the per-shard OSD service (``ShardNode``) and the controller
  that starts a group and serves (``OSDServer``)
* ``client``      -- an asyncio client and a blocking client that route each
  request straight to the owning shard
* ``stats``       -- the OSD's per-shard counters and latency histograms
* ``loadgen``     -- verifiable object contents, loading, closed- and open-loop reads
* ``demo``        -- the end-to-end demonstration (``python -m shardio.osd demo``)
* ``__main__``    -- the command line: serve, load, get, put, stat, ls, bench, demo

See docs/osd.md.
"""
