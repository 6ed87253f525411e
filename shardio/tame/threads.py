"""Tame threads: ``start_thread`` and ``threading.Thread`` as tame calls of the same reactor."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent

from . import stacks
from .env import ThreadHandle
from .stacks import NotOnTameStack, Parked, Runtime, TameError, TameGreenlet, current_runtime


class TameThreadHandle(ThreadHandle):
    """A 'thread' of the TameEnv: a tame call running as a task of the same reactor."""

    _counter = 0

    def __init__(
        self,
        rt: Runtime,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None,
    ) -> None:
        rt.check_thread("TameEnv.start_thread")
        TameThreadHandle._counter += 1
        self.name = name or f"tame-thread-{TameThreadHandle._counter}"
        self._rt = rt
        self._task = rt.loop.create_task(stacks.call(func, *args, **kwargs), name=self.name)

    def join(self, timeout: float | None = None) -> None:
        task = self._task
        if task.done():
            return
        self._rt.check_thread("a tame thread handle")
        g = getcurrent()
        if type(g) is not TameGreenlet or g.rt is not self._rt:
            raise NotOnTameStack(
                "join() on a running tame thread would block the reactor; call it from a tame stack "
                "of the same reactor, or await the thread's task from async code"
            )
        p = Parked()

        def done(_t: Any) -> None:
            p.wake()

        task.add_done_callback(done)
        timer = None if timeout is None else self._rt.loop.call_later(max(0.0, timeout), p.wake)
        try:
            p.park()
        finally:
            task.remove_done_callback(done)
            if timer is not None:
                timer.cancel()

    def is_alive(self) -> bool:
        return not self._task.done()

    def result(self, timeout: float | None = None) -> Any:
        self.join(timeout)
        if not self._task.done():
            raise TimeoutError(f"tame thread {self.name!r} still running after {timeout} s")
        return self._task.result()

    @property
    def task(self) -> asyncio.Task[Any]:
        """The asyncio task running the thread (await it from async code)."""
        return self._task

    def __repr__(self) -> str:
        return f"<TameThreadHandle {self.name!r} alive={self.is_alive()}>"


class TameThread:
    """threading.Thread's API on a tame stack: a tame thread of the same reactor."""

    _count = 0

    def __init__(
        self,
        group: None = None,
        target: Callable[..., Any] | None = None,
        name: str | None = None,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        TameThread._count += 1
        self._target = target
        self._args = tuple(args)
        self._kwargs = kwargs or {}
        self._name = name or f"TameThread-{TameThread._count}"
        self.daemon = bool(daemon)
        self._handle: Any = None
        self.ident: int | None = None
        self.native_id: int | None = None

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    def getName(self) -> str:  # noqa: N802
        return self._name

    def setName(self, name: str) -> None:  # noqa: N802
        self._name = name

    def isDaemon(self) -> bool:  # noqa: N802
        return self.daemon

    def setDaemon(self, daemonic: bool) -> None:  # noqa: N802
        self.daemon = daemonic

    def start(self) -> None:
        if self._handle is not None:
            raise RuntimeError("threads can only be started once")
        rt = current_runtime()
        if rt is None:
            raise TameError("a TameThread can only be started on a tame stack")
        self._handle = rt.env.start_thread(self._bootstrap, name=self._name)
        self.ident = id(self._handle)

    def _bootstrap(self) -> None:
        try:
            self.run()
        except BaseException:
            threading.excepthook(threading.ExceptHookArgs([*sys.exc_info(), self]))  # type: ignore[attr-defined]

    def run(self) -> None:
        if self._target is not None:
            self._target(*self._args, **self._kwargs)

    def join(self, timeout: float | None = None) -> None:
        if self._handle is None:
            raise RuntimeError("cannot join thread before it is started")
        self._handle.join(timeout)

    def is_alive(self) -> bool:
        return self._handle is not None and self._handle.is_alive()

    def __repr__(self) -> str:
        return f"<TameThread({self._name}, {'started' if self._handle else 'initial'})>"
