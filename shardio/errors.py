"""The exceptions shardio raises, all under :class:`ShardioError`."""

from __future__ import annotations


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


class GroupStateError(ShardioError, RuntimeError):
    """The shard group is not in a state that allows this (not started, or stopped)."""


class ShardStartError(ShardioError):
    """A shard failed to start."""


class MessageTooLarge(ShardioError, ValueError):
    """A message is larger than the group's ``max_message_bytes``."""
