"""Shared memory for the fabric: one anonymous memfd, mapped by every shard.

A memfd has no name in /dev/shm, so a crash at any moment cannot leak a
segment: the kernel frees it when the last process holding it exits.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from .handles import FdHandle


class SharedSegment:
    """A memfd of ``size`` bytes, mapped read-write and shared."""

    def __init__(self, size: int, *, fd: int | None = None, name: str = "shardio-fabric",
                 sealed: bool = False) -> None:
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0))
            try:
                os.ftruncate(fd, size)
                if sealed:  # its size never changes: no mapping of it can fault (SIGBUS)
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            except BaseException:
                os.close(fd)
                raise
        self.size = size
        self.fd = fd
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def handle(self) -> tuple[FdHandle, int]:
        """A picklable reference for a child process (see :class:`FdHandle`)."""
        return FdHandle(self.fd), self.size

    @classmethod
    def attach(cls, handle: tuple[FdHandle, int]) -> SharedSegment:
        fd_handle, size = handle
        return cls(size, fd=fd_handle.detach())

    def close(self) -> None:
        """Unmap and close; every Ring and Flag on it must be closed first."""
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
