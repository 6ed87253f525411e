"""Sleeping on a tame stack: a loop timer instead of a blocked thread."""

from __future__ import annotations

import time

from greenlet import getcurrent

from .stacks import Parked, TameGreenlet


def tame_sleep(seconds: float) -> None:
    """time.sleep that parks the calling tame stack on a loop timer (plain sleep elsewhere).

    ``sleep(0)`` lets the loop run one turn, whatever the quota says.
    """
    g = getcurrent()
    if type(g) is not TameGreenlet:
        time.sleep(seconds)
        return
    loop = g.rt.loop
    p = Parked("timer", seconds)
    # The Parked is the wake-up token: disarmed on any early exit (cancellation),
    # so the timer can only resume this stack while it sleeps here.
    handle = loop.call_later(seconds, p.wake) if seconds > 0 else loop.call_soon(p.wake)
    try:
        p.park()
    except BaseException:
        handle.cancel()
        raise
