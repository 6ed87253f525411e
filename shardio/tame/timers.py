"""Sleeping on a tame stack: a loop timer instead of a blocked thread."""

from __future__ import annotations

import time

from greenlet import getcurrent

from . import stacks
from .stacks import TameGreenlet


def tame_sleep(seconds: float) -> None:
    """time.sleep that parks the calling tame stack on a loop timer (plain sleep elsewhere)."""
    g = getcurrent()
    if type(g) is not TameGreenlet:
        time.sleep(seconds)
        return
    rt = g.rt
    # The timer handle is the wake-up token: cancelled on any early exit
    # (cancellation), so it can only fire while this stack sleeps here.
    handle = rt.loop.call_later(seconds, g.switch) if seconds > 0 else rt.loop.call_soon(g.switch)
    try:
        rt.hub.switch(stacks._BLOCKED)
    except BaseException:
        handle.cancel()
        raise
