"""Sleeping on a tame stack: a loop timer instead of a blocked thread."""

from __future__ import annotations

import time

from greenlet import getcurrent

from .stacks import _BLOCKED, TameGreenlet

_perf_counter = time.perf_counter


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
    # fire while this stack sleeps here. Parked.park's bookkeeping, inlined.
    handle = rt.call_later(seconds, g.switch) if seconds > 0 else rt.call_soon(g.switch)
    g.parked = seconds
    rt.last_end = g.parked_at = _perf_counter()
    if rt.account_cpu:
        rt._account_end()
    try:
        rt.hub_switch(_BLOCKED)
    except BaseException:
        handle.cancel()
        if rt.account_cpu:
            rt._account_start()
        raise
    if rt.account_cpu:
        rt._account_start()
    now = _perf_counter()
    if now > rt.half_deadline and not rt._may_run(now):  # Runtime.arrive, inlined
        rt.stats.deferred_resumes += 1
        rt._requeue()
