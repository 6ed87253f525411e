"""Tame stacks: run unmodified blocking code inside a shard's reactor.

The Env interface and its plain blocking implementation are in
``shardio.tame.env`` (see that module's docstring for the full API).
"""

from __future__ import annotations

from .env import DIRECT_ALIGN, Env, EnvFile, PosixEnv, ThreadHandle, posix_env
from .stacks import (
    DEFAULT_MAX_STACKS,
    NotOnTameStack,
    StackKilled,
    TameError,
    call,
    configure,
    current_runtime,
    on_tame_stack,
    stats,
    wait,
)

__all__ = [
    "DEFAULT_MAX_STACKS",
    "DIRECT_ALIGN",
    "Env",
    "EnvFile",
    "NotOnTameStack",
    "PosixEnv",
    "StackKilled",
    "TameError",
    "ThreadHandle",
    "call",
    "configure",
    "env",
    "on_tame_stack",
    "posix_env",
    "stats",
    "wait",
]


def env() -> Env:
    """The Env for the caller: TameEnv on a tame stack, PosixEnv anywhere else."""
    rt = current_runtime()
    return posix_env if rt is None else rt.env
