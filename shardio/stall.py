"""The stall detector: a watchdog thread per shard.

The reactor runs a heartbeat callback every quarter of the threshold; the
watchdog thread checks the time of the last beat just as often.  When the
reactor thread has not come back to its loop for longer than the threshold
(seastar's ``blocked-reactor-notify-ms``, 25 ms by default), the watchdog
logs "reactor stalled for N ms on shard S" with the Python stack the
reactor thread is executing at that moment (on a tame stack, the greenlet's
stack), and counts it.  Reports are rate-limited as seastar does: at most
``reports_per_minute``; the ones held back are counted and announced with
the next report.  One stall is reported once, however long it lasts; its
full length is logged when it ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("shardio.stall")


class StallDetector:
    """Watches one reactor; start() on the reactor thread once its loop exists."""

    def __init__(self, reactor: Any, threshold: float, *, reports_per_minute: int = 5,
                 logger: logging.Logger = log) -> None:
        if threshold <= 0:
            raise ValueError(f"the stall threshold must be positive, got {threshold}")
        self.reactor = reactor
        self.threshold = threshold
        self.period = threshold / 4
        self.reports_per_minute = reports_per_minute
        self.logger = logger
        self.stalls = 0
        self.suppressed = 0
        self.longest = 0.0
        self._last_beat = time.monotonic()
        self._report_times: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: Any = None
        self._sections: list[Callable[[], str]] = []

    def add_section(self, section: Callable[[], str]) -> None:
        """Add ``section()``'s text to every stall report (called on the watchdog thread
        while the reactor is stalled; "" adds nothing). The tame runtime adds its stacks."""
        self._sections.append(section)

    def start(self) -> None:
        self._last_beat = time.monotonic()
        self._timer = self.reactor.loop.call_later(self.period, self._beat)
        self._thread = threading.Thread(
            target=self._watch, name=f"shardio-stall-{self.reactor.shard_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        self._timer = self.reactor.loop.call_later(self.period, self._beat)

    def _watch(self) -> None:
        self.reactor.adopt_thread()  # so its log records name the shard
        stalled_since = 0.0
        while not self._stop.wait(self.period):
            beat = self._last_beat
            lag = time.monotonic() - beat
            if lag <= self.threshold:
                if stalled_since:
                    self.longest = max(self.longest, beat - stalled_since)
                    self.logger.info("reactor on shard %d ran again after a %.0f ms stall",
                                     self.reactor.shard_id, (beat - stalled_since) * 1e3)
                    stalled_since = 0.0
                continue
            if beat == stalled_since:
                continue  # the same stall, already reported
            stalled_since = beat
            self._report(lag)

    def _report(self, lag: float) -> None:
        self.stalls += 1
        self.reactor.stats.stalls += 1
        now = time.monotonic()
        self._report_times = [t for t in self._report_times if now - t < 60.0]
        if len(self._report_times) >= self.reports_per_minute:
            self.suppressed += 1
            return
        self._report_times.append(now)
        frame = sys._current_frames().get(self.reactor.thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
        held_back = ""
        if self.suppressed:
            held_back = f" ({self.suppressed} more stalls were not reported in the last minute)"
            self.suppressed = 0
        extra = []
        for section in self._sections:
            try:
                text = section()
            except Exception as error:  # a report must not kill the watchdog
                text = f"({section!r} failed: {error!r})"
            if text:
                extra.append(text.rstrip())
        self.logger.warning("reactor stalled for %.0f ms on shard %d%s; its stack:\n%s",
                            lag * 1e3, self.reactor.shard_id, held_back,
                            "\n\n".join([stack.rstrip(), *extra]))
