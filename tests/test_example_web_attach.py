"""End to end: gunicorn's aiohttp workers attached to one shard group holding a blocking store.

Real processes throughout: the store daemon (a ShardGroup with ``listen=``),
gunicorn's master and two workers, HTTP over loopback from several
connections at once; one worker is killed and the service goes on; then
everything stops and nothing is left behind.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GUNICORN = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
pytest.importorskip("aiohttp.worker")
pytestmark = pytest.mark.skipif(GUNICORN is None, reason="gunicorn is not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("X-Worker-Pid")
    finally:
        connection.close()


def wait_for(predicate, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("gave up waiting")


def attached_workers(port: int) -> int:
    status, body, _ = request(port, "GET", "/clients")
    assert status == 200, body
    return json.loads(body)["shards"][0]["clients"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_gunicorn_workers_share_one_shard_group(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    socket_path = str(run / "shards.sock")
    environment = {
        **os.environ,
        "SHARDIO_SOCKET": socket_path,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
    }
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "web_attach.daemon",
            "--socket",
            socket_path,
            "--data",
            str(tmp_path / "data"),
            "--shards",
            "2",
        ],
        cwd=EXAMPLES,
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    gunicorn = None
    try:
        started = json.loads(daemon.stdout.readline())
        shard_pids = started["shard_pids"]
        port = free_port()
        log = open(tmp_path / "gunicorn.log", "w")  # noqa: SIM115 (closed with the process)
        gunicorn = subprocess.Popen(
            [
                GUNICORN,
                "-k",
                "aiohttp.GunicornWebWorker",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "10",
                "web_attach.app:create_app",
            ],
            cwd=EXAMPLES,
            env=environment,
            stderr=log,
            text=True,
        )
        wait_for(lambda: attached_workers(port) == 2)

        bodies = {f"key-{i}": os.urandom(1000 + 37 * i) for i in range(60)}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # several connections at once
            puts = list(
                pool.map(
                    lambda item: request(port, "PUT", f"/kv/{item[0]}", item[1]), bodies.items()
                )
            )
            assert {status for status, _, _ in puts} == {204}
            gets = list(pool.map(lambda key: request(port, "GET", f"/kv/{key}"), bodies))
        assert [body for _, body, _ in gets] == list(bodies.values())
        workers = {pid for _, _, pid in puts + gets}
        assert request(port, "GET", "/kv/missing")[0] == 404

        victim = int(sorted(workers)[0])
        os.kill(victim, signal.SIGKILL)  # gunicorn starts another worker, which attaches
        wait_for(lambda: not alive(victim))
        wait_for(lambda: attached_workers(port) == 2)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda key: request(port, "GET", f"/kv/{key}"), bodies))
        assert [body for _, body, _ in again] == list(bodies.values())
        assert str(victim) not in {pid for _, _, pid in again}

        gunicorn.send_signal(signal.SIGTERM)
        assert gunicorn.wait(timeout=30) == 0, (tmp_path / "gunicorn.log").read_text()
        log.close()
        daemon.send_signal(signal.SIGTERM)
        assert json.loads(daemon.stdout.readline()) == {"stopped": True}
        assert daemon.wait(timeout=30) == 0
        assert not os.path.exists(socket_path)
        for pid in shard_pids:
            assert not alive(pid)
    finally:
        for process in (gunicorn, daemon):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
