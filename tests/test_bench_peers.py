"""The latency suite's peer servers serve the OSD's data and protocol correctly.

A smoke test, not a benchmark: each peer starts on a data directory written
by a shardio OSD, serves verified 4 KiB reads (pipelined) and misses to the
same client, and stops on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from shardio.osd.client import Client, ObjectNotFound
from shardio.osd.loadgen import content, object_names
from shardio.osd.server import OSDServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import latency  # noqa: E402  (bench/latency.py: the suite's server specs)

OBJECTS = 200


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("peer-data"))
    names = object_names(OBJECTS)
    with OSDServer(directory, shards=2, port=0, sync=False) as osd, Client(*osd.address) as c:
        for name in names:
            c.put(name, content(name, 4096))
    return directory


@pytest.mark.parametrize(
    "key", ["asyncio", "uvloop", "gevent", "threaded", "shardio-threaded", "reuseport"]
)
def test_peer_serves_verified_reads(key, data_dir, tmp_path):
    if key == "gevent" and importlib.util.find_spec("gevent") is None:
        pytest.skip("gevent is in the 'bench' extra, not installed here")
    server = latency.Server(
        latency.SERVERS[key], data_dir, set(os.sched_getaffinity(0)), str(tmp_path / "server.log")
    )
    try:
        names = object_names(OBJECTS)
        with Client(*server.address) as c:
            got = c.read_many(names, length=4096)
            assert got == [content(name, 4096) for name in names]
            with pytest.raises(ObjectNotFound):
                c.read("no-such-object", length=4096)
    finally:
        server.stop()
    assert server.proc.returncode is not None


def test_the_thread_pool_peer_serves_verified_reads(tmp_path):
    """bench/osd.py's baseline (the store in an asyncio server's thread pool) on a
    one-shard data directory: verified pipelined reads, a miss, a PING."""
    directory = str(tmp_path / "one-shard")
    names = object_names(OBJECTS)
    with OSDServer(directory, shards=1, pg_num=64, port=0) as osd, Client(*osd.address) as c:
        for name in names:
            c.put(name, content(name, 4096))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bench", "peers", "asyncio_threadpool.py"),
         "--data", directory, "--pg-num", "64"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        host, port = line.split()[-1].rsplit(":", 1)
        with Client(host, int(port)) as c:
            assert c.read_many(names, length=4096) == [content(name, 4096) for name in names]
            with pytest.raises(ObjectNotFound):
                c.read("no-such-object", length=4096)
            c.ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
