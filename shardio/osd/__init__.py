"""The OSD read-path prototype: an object storage daemon built on shardio.

Modules (import them directly; this package imports nothing at import time,
so the protocol can be used without the reactor or the fabric):

* ``protocol``    -- the wire format: checksummed binary frames and their decoder
* ``osdmap``      -- placement: pools, placement groups (pgs), pg -> shard, epochs
* ``objectstore`` -- a log-structured object store written against the Env
  interface, so it runs on tame stacks in a shard and in plain threads alike
"""
