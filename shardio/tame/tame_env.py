"""TameEnv: the Env of one reactor's tame stacks (see ``env`` for the interface)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from .env import Env
from .files import TameFile
from .sockets import TameSocket, tame_create_connection
from .stacks import Runtime, current_runtime
from .sync import (
    TameBoundedSemaphore,
    TameCondition,
    TameEvent,
    TameLock,
    TameQueue,
    TameRLock,
    TameSemaphore,
)
from .threads import TameThreadHandle
from .timers import tame_sleep


class TameEnv(Env):
    """The Env of one reactor's tame stacks. See the module docstring.

    Files, sleep and sockets yield when called on a tame stack (any
    reactor's: they use the loop running the caller) and are plain blocking
    calls anywhere else. Locks, conditions, events, semaphores and queues
    belong to this Env's reactor: using them from another thread raises
    ``WrongThreadError``, and waiting on them outside a tame stack of that
    reactor raises ``NotOnTameStack`` (non-waiting calls such as release,
    set, put_nowait work from the reactor's coroutines too).
    """

    name = "tame"

    def __init__(self, rt: Runtime) -> None:
        self.runtime = rt

    def open(
        self, path: str | os.PathLike[str], mode: str = "rb", *, direct: bool = False
    ) -> TameFile:
        return TameFile(path, mode, direct=direct)

    def _fsync_fd(self, fd: int) -> None:
        rt = current_runtime()
        if rt is None:
            os.fsync(fd)
        else:
            rt.uring.fsync(fd, False)

    sleep = staticmethod(tame_sleep)  # no extra frame on the cheapest blocking call

    def Lock(self) -> TameLock:  # noqa: N802
        return TameLock(self.runtime)

    def RLock(self) -> TameRLock:  # noqa: N802
        return TameRLock(self.runtime)

    def Condition(self, lock: Any = None) -> TameCondition:  # noqa: N802
        return TameCondition(self.runtime, lock)

    def Event(self) -> TameEvent:  # noqa: N802
        return TameEvent(self.runtime)

    def Semaphore(self, value: int = 1) -> TameSemaphore:  # noqa: N802
        return TameSemaphore(self.runtime, value)

    def BoundedSemaphore(self, value: int = 1) -> TameBoundedSemaphore:  # noqa: N802
        return TameBoundedSemaphore(self.runtime, value)

    def Queue(self, maxsize: int = 0) -> TameQueue:  # noqa: N802
        return TameQueue(self.runtime, maxsize)

    def start_thread(
        self, func: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any
    ) -> TameThreadHandle:
        return TameThreadHandle(self.runtime, func, args, kwargs, name)

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> TameSocket:  # noqa: A002
        return TameSocket.create(family, type, proto)

    def create_connection(
        self, address: tuple[str, int], timeout: float | None = None
    ) -> TameSocket:
        return tame_create_connection(address, timeout)

    def __repr__(self) -> str:
        return f"<TameEnv of {self.runtime!r}>"
