"""Sleeping on a tame stack: a loop timer instead of a blocked thread."""

from __future__ import annotations

from collections.abc import Callable

from . import _parking

#: ``tame_sleep(seconds)``: time.sleep that parks the calling tame stack on a loop
#: timer (plain ``time.sleep`` elsewhere); ``sleep(0)`` lets the loop run one turn,
#: whatever the quota says. The cheapest blocking call, the one bench/tame.py's per-op
#: row measures: in C (``_parking.sleep``), a timer that resumes the stack with its own
#: switch, then Parked.park's bookkeeping, switch and arrival check; the timer is
#: cancelled when an exception (a cancellation) is thrown into the sleep.
tame_sleep: Callable[[float], None] = _parking.sleep
