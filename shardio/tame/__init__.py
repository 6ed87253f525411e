"""Tame stacks: run unmodified blocking code inside a shard's reactor.

The Env interface and its plain blocking implementation are in
``shardio.tame.env`` (see that module's docstring for the full API).
"""

from __future__ import annotations

from .env import DIRECT_ALIGN, Env, EnvFile, PosixEnv, ThreadHandle, posix_env

__all__ = ["DIRECT_ALIGN", "Env", "EnvFile", "PosixEnv", "ThreadHandle", "env", "posix_env"]


def env() -> Env:
    """The Env for the caller: TameEnv on a tame stack, PosixEnv anywhere else."""
    return posix_env
