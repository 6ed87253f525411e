"""Sleeping on a tame stack: a loop timer instead of a blocked thread."""

from __future__ import annotations

import time

from greenlet import getcurrent

from ._parking import suspend
from .stacks import TameGreenlet


def tame_sleep(seconds: float) -> None:
    """time.sleep that parks the calling tame stack on a loop timer (plain sleep elsewhere).

    ``sleep(0)`` lets the loop run one turn, whatever the quota says.
    """
    g = getcurrent()
    if type(g) is not TameGreenlet:
        time.sleep(seconds)
        return
    rt = g.rt
    # The loop resumes the stack with greenlet.switch itself: this is the cheapest
    # blocking call, the one bench/tame.py's per-op row measures. The timer handle is
    # the wake-up token: cancelled on any early exit (cancellation), so it can only
    # fire while this stack sleeps here. suspend: Parked.park's bookkeeping, switch and
    # arrival check, in C, with the seconds as what the stack waits on.
    handle = rt.call_later(seconds, g.switch) if seconds > 0 else rt.call_soon(g.switch)
    try:
        suspend(g, seconds)
    except BaseException:
        handle.cancel()
        raise
