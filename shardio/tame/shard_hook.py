"""How a shard's reactor takes tame in: the start hook ``shardio.launch`` registers.

The reactor knows nothing of tame; each shard's reactor runs this hook on
its thread when its loop exists. It tells tame which reactor owns the loop
(so runtimes close with the shard, reap I/O from its poll loop and post
through its inbox), applies the group's tame settings, adds the busy tame
stacks to the shard's stall reports, and optionally warms tame up.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from .stack_dump import stall_section
from .stacks import attach_reactor, configure, warm_up

__all__ = ["start_hook"]


def start_hook(*, quota: float | None, warm: bool = False) -> Callable[[Any], None]:
    """A reactor start hook: ``quota`` seconds (None: no preemption), warm-up if ``warm``."""

    def hook(reactor: Any) -> None:
        attach_reactor(reactor)
        configure(quota=quota)
        detector = reactor.stall_detector
        if detector is not None:
            detector.add_section(functools.partial(stall_section, asyncio.get_running_loop()))
        if warm:
            warm_up()

    return hook
