"""shardio's networking: the connection core its servers share.

* ``connection``: ``TameBatchConnection``, a server connection whose requests
  run in batches on tame stacks, with per-connection limits and one write
  per loop pass (the OSD's messenger and the Redis example build on it);
* ``listen``: listening sockets on a shard's own port and on a port shared
  by every shard (``SO_REUSEPORT``);
* ``waiting``: the registry of requests that wait, with their stage
  (Ceph's ``dump_ops_in_flight``).
"""

from .connection import ConnectionCounters, ConnectionLimits, Entry, Service, TameBatchConnection
from .listen import listen
from .waiting import STAGE_RUNNING, STAGE_SENT, STAGE_THROTTLED, WaitingRequests

__all__ = [
    "STAGE_RUNNING",
    "STAGE_SENT",
    "STAGE_THROTTLED",
    "ConnectionCounters",
    "ConnectionLimits",
    "Entry",
    "Service",
    "TameBatchConnection",
    "WaitingRequests",
    "listen",
]
