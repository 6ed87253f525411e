"""Doorbells: one eventfd per fabric endpoint, rung to wake a sleeping reactor."""

from __future__ import annotations

import os

from .handles import FdHandle


class Doorbell:
    """An eventfd; ``ring()`` from anywhere, ``drain()`` by its owner."""

    __slots__ = ("fd",)

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        """Reset the counter; return how many rings it had collected (0 if none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def handle(self) -> FdHandle:
        return FdHandle(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
