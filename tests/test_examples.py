"""Every example runs with one command and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_hello_shards(backend):
    out = run_example("examples/hello_shards.py", "--shards", "3", "--backend", backend)
    assert "hits per shard: [34, 33, 33] total: 100" in out
    assert "shard 2 of 3" in out and out.rstrip().endswith("done")


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_sharded_kv_self_test(backend):
    out = run_example("examples/sharded_kv.py", "--selftest", "--backend", backend)
    assert "self-test passed: 8 clients, 2000 keys" in out
