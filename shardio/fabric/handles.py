"""Passing file descriptors to spawned shard processes.

multiprocessing's spawn start method pickles the process arguments and
execs a fresh interpreter that inherits only the descriptors registered
through ``multiprocessing.reduction.DupFd`` while pickling: the child sees
them under the same numbers.  Outside of a spawn (threads backend) the
handle simply carries the number.
"""

from __future__ import annotations

from multiprocessing import context, reduction


class FdHandle:
    """A file descriptor that survives the trip into a spawned shard process."""

    __slots__ = ("_fd", "_dup")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._dup = None

    def detach(self) -> int:
        return self._dup.detach() if self._dup is not None else self._fd

    def __reduce__(self):
        if context.get_spawning_popen() is None:
            raise TypeError("FdHandle can only be pickled while spawning a shard process")
        return (_rebuild, (reduction.DupFd(self._fd),))


def _rebuild(dup) -> FdHandle:
    handle = FdHandle(-1)
    handle._dup = dup
    return handle
