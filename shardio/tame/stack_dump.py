"""What every tame stack of a shard is doing: parked on what, for how long, where.

``dump_stacks()`` on a reactor (in a shard: ``group.submit(shard,
tame.dump_stacks)`` from the owner) lists the stacks of the running loop
that have a job: what each one is parked on (an fd, an io_uring op, a lock,
a timer, a future...), since when, and its Python stack. The stall detector
adds the same listing, as text, to a stall report when tame stacks were busy
(``stall_section``, registered through the reactor's start hooks).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from greenlet import getcurrent

from .stacks import Parked, Runtime, TameGreenlet, job_started, loop_runtime

__all__ = ["StackDump", "dump_stacks", "format_dumps", "stall_section"]

_TARGET_CHARS = 120


@dataclass
class StackDump:
    """One busy tame stack at the moment of the dump (plain data: it pickles across shards)."""

    stack_id: int
    function: str
    state: str  # "running", "parked" or "ready" (woken, resuming next loop turn)
    waits_on: str  # kind of thing it is parked on: "fd", "io_uring", "lock", "timer"...
    target: str  # repr of that thing (the fd and direction, the lock, the op...)
    seconds: float  # how long it has been parked (0.0 while running)
    python_stack: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.state == "running":
            head = f"tame stack {self.stack_id:#x} running {self.function}"
        else:
            what = self.waits_on + (f" {self.target}" if self.target else "")
            head = (
                f"tame stack {self.stack_id:#x} ({self.function}) {self.state} on {what} "
                f"for {self.seconds * 1e3:.1f} ms"
            )
        return head + "\n" + "".join(self.python_stack).rstrip("\n")


def _function_name(g: TameGreenlet) -> str:
    job = g.job
    func = getattr(job, "func", None)
    if func is None:
        return "?"
    name = getattr(func, "__qualname__", None) or repr(func)
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else name


def _describe(g: TameGreenlet, now: float, running: Any) -> StackDump:
    parked = g.parked
    job = g.job
    if job is not None and not job_started(job):
        state, kind, target, seconds = "ready", "start", "", 0.0
        frame = None
    elif g is running or parked is None or g.gr_frame is None:  # running (see Parked.park)
        state, kind, target, seconds = "running", "", "", 0.0
        frame = None
    elif not isinstance(parked, Parked):  # a sleep: parked is its seconds
        state, kind, target = "parked", "timer", repr(parked)
        seconds = max(0.0, now - g.parked_at)
        frame = g.gr_frame
    else:
        state = "ready" if parked.deferred else "parked"
        kind = parked.kind
        target = "" if parked.target is None else repr(parked.target)
        if len(target) > _TARGET_CHARS:
            target = target[: _TARGET_CHARS - 3] + "..."
        seconds = max(0.0, now - g.parked_at)
        frame = g.gr_frame
    lines = traceback.format_stack(frame) if frame is not None else []
    return StackDump(id(g), _function_name(g), state, kind, target, seconds, lines)


def describe_runtime(rt: Runtime) -> list[StackDump]:
    """The busy stacks of rt, oldest-parked first (safe to call from another thread)."""
    now = time.perf_counter()
    running = getcurrent()
    for _ in range(3):  # another thread may add a stack while we copy the set
        try:
            stacks = list(rt.stacks)
            break
        except RuntimeError:
            continue
    else:
        return []
    dumps = [_describe(g, now, running) for g in stacks if g.job is not None and not g.dead]
    dumps.sort(key=lambda d: -d.seconds)
    return dumps


def dump_stacks() -> list[StackDump]:
    """The busy tame stacks of the running loop (empty when it has no tame runtime).

    Call it on a shard's reactor thread or from its coroutines; from the
    owner: ``group.submit(shard, shardio.tame.dump_stacks).result()``.
    """
    rt = loop_runtime(asyncio.get_running_loop())
    return [] if rt is None else describe_runtime(rt)


def format_dumps(dumps: list[StackDump]) -> str:
    """Readable text of a dump, one block per stack."""
    if not dumps:
        return "no busy tame stacks"
    return f"{len(dumps)} busy tame stacks:\n" + "\n".join(str(d) for d in dumps)


def stall_section(loop: asyncio.AbstractEventLoop) -> str:
    """The tame part of a stall report of ``loop``'s reactor ("" when no stack is busy)."""
    rt = loop_runtime(loop)
    if rt is None:
        return ""
    dumps = describe_runtime(rt)
    return format_dumps(dumps) if dumps else ""
