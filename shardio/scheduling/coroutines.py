"""Coroutines governed by a scheduling group: each step is run by the group's dispatcher.

uvloop's ready queue cannot be reordered from Python, so a group cannot hold
back a task's steps inside the loop. Instead ``SchedulingGroup.create_task``
makes a real ``asyncio.Task`` of a wrapper around the coroutine: whenever the
coroutine waits for a future, the wrapper hands the task a :class:`Turn`
instead, a future-like object (the ``asyncio.isfuture`` protocol) that
becomes done only when the group's dispatcher runs it, after the awaited
future is done. The dispatcher calls the task's wake-up callback itself,
inside the group's slice, so the task's next step, which drives the
coroutine one step further, runs there and is accounted to the group.
A bare ``yield`` (``asyncio.sleep(0)``) waits for a turn as well.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["Turn", "governed"]

T = TypeVar("T")


class Turn:
    """Done when the group's dispatcher runs it, once the awaited future (if any) is done."""

    # _asyncio_future_blocking is the asyncio future protocol (asyncio.isfuture).
    __slots__ = (
        "_queue",
        "_loop",
        "_awaited",
        "_callbacks",
        "_done",
        "_cancel_message",
        "_cancelled",
        "_asyncio_future_blocking",
    )

    def __init__(self, queue: Any, loop: asyncio.AbstractEventLoop, awaited: Any) -> None:
        self._queue = queue
        self._loop = loop
        self._awaited = awaited
        self._callbacks: list[tuple[Callable[[Any], None], contextvars.Context | None]] = []
        self._done = False
        self._cancelled = False
        self._cancel_message: Any = None
        self._asyncio_future_blocking = True  # handed to the task by a yield, like Future
        if awaited is None:
            queue.defer(Turn._fire, self)
        else:
            awaited.add_done_callback(self._ready)

    def _ready(self, _awaited: Any) -> None:
        self._queue.defer(Turn._fire, self)

    def _fire(self) -> None:
        if self._done:
            return
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback, context in callbacks:
            if context is None:
                callback(self)
            else:
                context.run(callback, self)

    # -- what asyncio.Task uses ------------------------------------------------------
    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_done_callback(
        self, callback: Callable[[Any], None], *, context: contextvars.Context | None = None
    ) -> None:
        if self._done:
            self._loop.call_soon(callback, self, context=context)
        else:
            self._callbacks.append((callback, context))

    def remove_done_callback(self, callback: Callable[[Any], None]) -> int:
        kept = [entry for entry in self._callbacks if entry[0] != callback]
        removed = len(self._callbacks) - len(kept)
        self._callbacks = kept
        return removed

    def cancel(self, msg: Any = None) -> bool:
        """The task was cancelled: cancel what the coroutine awaits; the coroutine gets
        CancelledError at its next step, which still runs in the group's turn."""
        if self._done:
            return False
        self._cancelled = True
        self._cancel_message = msg
        awaited = self._awaited
        if awaited is None or awaited.done() or not awaited.cancel(msg):
            self._queue.defer(Turn._fire, self)
        return True

    def cancelled(self) -> bool:
        return self._done and self._cancelled

    def done(self) -> bool:
        return self._done

    def result(self) -> None:
        if self._cancelled:
            raise asyncio.CancelledError(self._cancel_message)
        return None

    def exception(self) -> BaseException | None:
        if self._cancelled:
            raise asyncio.CancelledError(self._cancel_message)
        return None

    def __await__(self) -> Generator[Any, None, None]:
        if not self._done:
            yield self
        return self.result()


class _Steps:
    """Drives the coroutine one step per turn of its group (what the task awaits)."""

    __slots__ = ("coro", "queue")

    def __init__(self, coro: Coroutine[Any, Any, Any], queue: Any) -> None:
        self.coro = coro
        self.queue = queue

    def __await__(self) -> Generator[Any, None, Any]:
        coro = self.coro
        queue = self.queue
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        try:
            yield Turn(queue, loop, None)  # the first step, too, runs in the group's turn
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                coro.close()
                raise
            error = exc
        while True:
            try:
                yielded = coro.send(None) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            error = None
            if yielded is None:  # a bare yield: asyncio.sleep(0)
                turn = Turn(queue, loop, None)
            elif asyncio.isfuture(yielded) and yielded._asyncio_future_blocking:
                yielded._asyncio_future_blocking = False  # as asyncio.Task does on receipt
                turn = Turn(queue, loop, yielded)
            else:
                error = RuntimeError(
                    f"a coroutine in scheduling group {queue.name!r} yielded {yielded!r}, "
                    "which is not an asyncio future (use await, not yield)"
                )
                continue
            try:
                yield turn
            except BaseException as exc:  # the task's cancellation, passed on
                if isinstance(exc, GeneratorExit):
                    coro.close()
                    raise
                error = exc


async def governed(coro: Coroutine[Any, Any, T], queue: Any) -> T:
    """Run ``coro`` one step per turn of the group whose queue is ``queue``."""
    return await _Steps(coro, queue)  # type: ignore[no-any-return]
