"""shardio: seastar-style sharded reactors for Python.

One reactor (an asyncio loop) per core; shards share nothing and talk by
messages over SPSC rings in shared memory; unmodified blocking code runs
on tame greenlet stacks.  See README.md for the tour.
"""

from .errors import (
    GroupStateError,
    MessageTooLarge,
    NotInShardError,
    RemoteError,
    ShardDied,
    ShardioError,
    ShardStartError,
    WrongThreadError,
)
from .fabric.messages import CannotCrossError
from .group import ShardGroup
from .reactor import current_reactor
from .run import run
from .sharded import ServiceNotRunning, Sharded
from .submit import (
    bind_thread,
    external_submit,
    invoke_on_all,
    map_reduce,
    shard_count,
    submit_to,
    this_shard,
)

__all__ = [
    "CannotCrossError",
    "GroupStateError",
    "MessageTooLarge",
    "NotInShardError",
    "RemoteError",
    "ServiceNotRunning",
    "ShardDied",
    "ShardGroup",
    "ShardStartError",
    "Sharded",
    "ShardioError",
    "WrongThreadError",
    "bind_thread",
    "current_reactor",
    "external_submit",
    "invoke_on_all",
    "map_reduce",
    "run",
    "shard_count",
    "submit_to",
    "this_shard",
]
