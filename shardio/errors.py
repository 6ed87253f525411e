"""The exceptions shardio raises, all under :class:`ShardioError`: the one place to find them.

The core's are defined here.  Each subsystem defines its own next to its
code and they are reachable from here too, imported on first use (so that
``shardio.errors`` stays free of the subsystems' imports)::

    from shardio.errors import ShardDied, CannotCrossError   # the core
    from shardio.errors import TameError, ClockError         # tame, testing: loaded on use

The OSD prototype's errors (frames, the map, the store, the client) live in
its own modules (``shardio.osd.protocol``, ``.osdmap``, ``.objectstore``,
``.client``, ``.server``), see docs/osd.md; they too derive from
:class:`ShardioError`.
"""

from __future__ import annotations

import importlib
from typing import Any


class ShardioError(Exception):
    """Base class of every error shardio raises itself."""


class ShardDied(ShardioError):
    """The shard a call depends on has died (killed, crashed, or exited).

    Every pending call to that shard fails with it, and so does every later call.
    """

    def __init__(self, shard: int, detail: str = "") -> None:
        self.shard = shard
        self.detail = detail
        message = f"shard {shard} died"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):  # the default would pass only the message back to __init__
        return (type(self), (self.shard, self.detail))


class RemoteError(ShardioError):
    """A remote failure that could not cross as its own exception type.

    Raised when the remote exception (or a result) could not be pickled or
    unpickled; ``type_name`` and ``remote_traceback`` say what happened there.
    """

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.type_name, self.remote_traceback))


class NotInShardError(ShardioError, RuntimeError):
    """A call that only makes sense on a shard's reactor thread was made elsewhere."""


class WrongThreadError(ShardioError, RuntimeError):
    """An object that belongs to one reactor thread was used from another thread."""


class SchedulingError(ShardioError, ValueError):
    """A scheduling group was misused: a bad name or share count, or a group API
    called outside a running loop (``shardio.SchedulingGroup``, docs/scheduling.md)."""


class GroupStateError(ShardioError, RuntimeError):
    """The shard group is not in a state that allows this (not started, or stopped)."""


class ShardStartError(ShardioError):
    """A shard failed to start."""


class MessageTooLarge(ShardioError, ValueError):
    """A message is larger than the group's ``max_message_bytes``."""


class CannotCrossError(ShardioError, TypeError):
    """A function, argument or result cannot be pickled to cross to another shard."""


class ServiceNotRunning(ShardioError, LookupError):
    """The Sharded service has no instance on this shard (not started, or stopped)."""


class AttachError(ShardioError):
    """Attaching a process to a running group failed (``shardio.connect``, ``listen=``)."""


class InsecureSocketPath(AttachError, ValueError):
    """The attach socket's path is unsafe: its directory is not private to this user
    (mode 0700, owned by us, not a symlink) or it names the abstract namespace."""


class AttachRefused(AttachError):
    """The group's owner refused this client (its user is not allowed, or its hello
    was malformed); the message says which."""


class ProtocolMismatch(AttachRefused):
    """The client and the group speak different attach protocol versions or come from
    different builds (shardio version, Python, ring layout); upgrade the older side."""


_SUBSYSTEM_ERRORS = {
    "MetricsError": "shardio.metrics",
    "TameError": "shardio.tame.stacks",
    "NotOnTameStack": "shardio.tame.stacks",
    "StackKilled": "shardio.tame.stacks",
    "TameConfigError": "shardio.tame.stacks",
    "UringSubmitError": "shardio.io.uring",
    "ClockError": "shardio.testing.clock",
    "SimulatedCrash": "shardio.testing.crash_env",
    "NoMatchingMessage": "shardio.testing.intercept",
}


def __getattr__(name: str) -> Any:
    module = _SUBSYSTEM_ERRORS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBSYSTEM_ERRORS])
