"""Waiting for a file descriptor to become readable or writable on a tame stack."""

from __future__ import annotations

import select
from typing import Any

from .stacks import Parked, current_runtime


def wait_fd(fd: int, write: bool) -> None:
    rt = current_runtime()
    p = Parked()
    loop = rt.loop
    (loop.add_writer if write else loop.add_reader)(fd, p.wake, None)
    try:
        p.park()
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def ready_now(fd: int, write: bool) -> bool:
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], 0)
    return bool(r or w)


def tame_select(
    rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """select.select on a tame stack: the wait happens in the loop (read/write sets)."""
    r, w, x = select.select(rlist, wlist, xlist, 0)
    if r or w or x or timeout == 0:
        return r, w, x
    rt = current_runtime()
    loop = rt.loop
    p = Parked()
    rfds = [o if isinstance(o, int) else o.fileno() for o in rlist]
    wfds = [o if isinstance(o, int) else o.fileno() for o in wlist]
    for fd in rfds:
        loop.add_reader(fd, p.wake, None)
    for fd in wfds:
        loop.add_writer(fd, p.wake, None)
    timer = None if timeout is None else loop.call_later(timeout, p.wake, None)
    try:
        p.park()
    finally:
        for fd in rfds:
            loop.remove_reader(fd)
        for fd in wfds:
            loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
    return select.select(rlist, wlist, xlist, 0)
