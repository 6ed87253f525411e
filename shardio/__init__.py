"""shardio: seastar-style sharded reactors for Python.

One reactor (an asyncio loop) per core; shards share nothing and talk by
messages over SPSC rings in shared memory; unmodified blocking code runs
on tame greenlet stacks.  See README.md for the tour.

The subsystems are attributes too, imported on first use so that
``import shardio`` stays light: ``shardio.tame``, ``shardio.metrics``,
``shardio.testing``, ``shardio.osd``, ``shardio.io``, ``shardio.fabric``.
Every exception shardio raises is reachable from :mod:`shardio.errors`.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import errors
from .app import run
from .calls import (
    bind_thread,
    external_submit,
    invoke_on_all,
    map_reduce,
    shard_count,
    submit_to,
    this_shard,
)
from .connect import Client, connect
from .errors import (
    AttachError,
    AttachRefused,
    CannotCrossError,
    GroupStateError,
    InsecureSocketPath,
    MessageTooLarge,
    NotInShardError,
    ProtocolMismatch,
    RemoteError,
    SchedulingError,
    ServiceNotRunning,
    ShardDied,
    ShardioError,
    ShardStartError,
    WrongThreadError,
)
from .group import Endpoint, ShardGroup
from .reactor import current_reactor
from .scheduling.groups import SchedulingGroup
from .sharded import Sharded

_SUBPACKAGES = frozenset({"tame", "metrics", "testing", "osd", "io", "fabric", "scheduling"})


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBPACKAGES])


__all__ = [
    "AttachError",
    "AttachRefused",
    "CannotCrossError",
    "Client",
    "Endpoint",
    "GroupStateError",
    "InsecureSocketPath",
    "MessageTooLarge",
    "NotInShardError",
    "ProtocolMismatch",
    "RemoteError",
    "SchedulingError",
    "SchedulingGroup",
    "ServiceNotRunning",
    "ShardDied",
    "ShardGroup",
    "ShardStartError",
    "Sharded",
    "ShardioError",
    "WrongThreadError",
    "bind_thread",
    "connect",
    "current_reactor",
    "errors",
    "external_submit",
    "invoke_on_all",
    "map_reduce",
    "run",
    "shard_count",
    "submit_to",
    "this_shard",
]
