"""One tame file implementation with the stdlib's position semantics.

The same sequence of file operations gives the same results on a tame stack (patched
``open`` and ``os`` calls, the TameEnv's files) as the stdlib gives on a plain thread:
read/write use and advance the kernel file position, which a file object, its
``fileno()`` and ``os.lseek``/``os.read`` share; pread/pwrite leave it alone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

from shardio import tame

SOURCE = """
import os

def raw_file_and_fd(path):
    out = []
    with open(path, "r+b", buffering=0) as f:
        out.append(f.read(3))
        out.append(os.lseek(f.fileno(), 0, os.SEEK_CUR))  # the kernel position is the file's
        out.append(os.read(f.fileno(), 2))  # continues where the file object stopped
        out.append(f.tell())
        f.seek(1)
        out.append(f.write(b"XY"))
        out.append(os.lseek(f.fileno(), 0, os.SEEK_CUR))
        os.lseek(f.fileno(), 8, os.SEEK_SET)
        out.append(f.read(2))
        out.append(os.pread(f.fileno(), 3, 0))  # pread leaves the position alone
        out.append(f.tell())
        out.append(f.read())
    return out

def buffered_then_fd(path):
    out = []
    with open(path, "rb") as f:
        out.append(f.read(4))
        out.append(f.tell())
        out.append(os.lseek(f.fileno(), 0, os.SEEK_CUR))  # the buffer's read-ahead
    return out

def append_mode(path):
    out = []
    with open(path, "ab", buffering=0) as f:
        out.append(f.tell())
        out.append(f.write(b"++"))
        out.append(f.tell())
        os.write(f.fileno(), b"!!")
        out.append(f.tell())
    with open(path, "rb") as f:
        out.append(f.read())
    return out
"""


def make_module() -> types.ModuleType:
    mod = types.ModuleType("tame_files_example")
    exec(compile(SOURCE, "<tame_files_example>", "exec"), mod.__dict__)
    sys.modules[mod.__name__] = mod
    return mod


def env_file_sequence(env: Any, path: str) -> list[Any]:
    out: list[Any] = []
    with env.open(path, "r+b") as f:
        out.append(f.read(3))
        out.append(os.lseek(f.fileno(), 0, os.SEEK_CUR))
        out.append(f.pread(2, 10))
        out.append(f.read(2))
        out.append(f.write(b"--"))
        out.append(os.lseek(f.fileno(), 0, os.SEEK_CUR))
        out.append(f.read())
    return out


@pytest.mark.parametrize("case", ["raw_file_and_fd", "buffered_then_fd", "append_mode", "env"])
def test_a_tame_stack_sees_the_stdlib_positions(case: str, tmp_path: Any) -> None:
    mod = make_module()
    data = b"0123456789abcdefghij"

    def fresh(name: str) -> str:
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def run(fn: Callable[[str], Any], path: str) -> Any:
        return fn(path)

    if case == "env":
        plain = env_file_sequence(tame.posix_env, fresh("plain"))

        async def tamed_env() -> Any:
            return await tame.call(lambda: env_file_sequence(tame.env(), fresh("tamed")))

        tamed = asyncio.run(tamed_env())
    else:
        plain = run(getattr(mod, case), fresh("plain"))

        async def tamed_run() -> Any:
            with tame.patched(mod):
                return await tame.call(getattr(mod, case), fresh("tamed"))

        tamed = asyncio.run(tamed_run())
    try:
        assert tamed == plain
    finally:
        del sys.modules[mod.__name__]
