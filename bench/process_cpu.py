"""CPU time of a process and its descendants, from /proc (for the bench scripts)."""

from __future__ import annotations

import os

__all__ = ["tree_cpu", "tree_cpu_split"]


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and every process below it, now."""
    user, system = tree_cpu_split(pid)
    return user + system


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) seconds of ``pid`` and every process below it, now."""
    ticks = os.sysconf("SC_CLK_TCK")
    user, system, pending = 0.0, 0.0, [pid]
    while pending:
        p = pending.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / ticks
            system += int(fields[12]) / ticks
            with open(f"/proc/{p}/task/{p}/children") as f:
                pending += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return user, system
