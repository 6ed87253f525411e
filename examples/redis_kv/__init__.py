"""A Redis-compatible key-value server on shardio, where every shard is a cluster node.

    cd examples && python -m redis_kv --shards 2 --port 6379

Plain clients use the shared port (6379); cluster-aware clients (``redis-cli
-c``, redis-py's ``RedisCluster``) learn each shard's port from ``CLUSTER
SLOTS`` and send every command to the shard that owns its key.

Modules: ``resp`` (the protocol), ``slots`` (key -> slot -> shard),
``keyspace`` (one shard's keys and the commands run where a key lives),
``server`` (connections on shardio's connection core, cluster commands),
``__main__`` (the command line).
"""
