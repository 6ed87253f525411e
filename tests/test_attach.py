"""Attach: unrelated processes reach a running group over a Unix socket.

Clients are separate processes (``tests/attach_clients.py``), started with
subprocess, not by the group; hostile ones speak the protocol by hand and
abuse the memory and the rings they were given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import external_functions as ef
import pytest

import shardio
from shardio.attach import client_links

CLIENTS = str(Path(__file__).with_name("attach_clients.py"))


@pytest.fixture
def socket_path(tmp_path) -> str:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    return str(directory / "shards.sock")


def start_client(mode: str, path: str, *arguments, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, CLIENTS, mode, path, *map(str, arguments)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        **options,
    )


def run_client(mode: str, path: str, *arguments) -> dict:
    done = subprocess.run(
        [sys.executable, CLIENTS, mode, path, *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def first_line(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    assert line, f"the client exited early (status {process.wait()})"
    return json.loads(line)


def wait_until(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def no_clients_left(group: shardio.ShardGroup) -> bool:
    return group._attach_server.clients == 0 and all(
        group.submit(shard, client_links).result(timeout=30) == {} for shard in range(group.shards)
    )


# ---------------------------------------------------------------- attaching


def test_an_unrelated_process_attaches_and_calls_sync_and_async(socket_path, backend, leak_check):
    with shardio.ShardGroup(2, backend=backend, listen=socket_path) as group:
        assert os.stat(socket_path).st_mode & 0o777 == 0o600
        seen = run_client("calls", socket_path)
        assert seen["sync_ok"] and seen["async_ok"], seen
        assert seen["shards"] == 2 and seen["number"] > group.shards
        assert wait_until(lambda: no_clients_left(group))
        assert group.submit(0, ef.add, 1, 2).result(timeout=30) == 3
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize("what", ["protocol", "build"])
def test_a_client_of_another_version_is_refused(socket_path, what, leak_check):
    with shardio.ShardGroup(1, listen=socket_path) as group:
        seen = run_client("mismatch", socket_path, what)
        assert seen["error"] == "ProtocolMismatch", seen
        assert ("attach protocol" if what == "protocol" else "both must match") in seen["message"]
        assert group._attach_server.attached_total == 0
        assert group._attach_server.refused_total == 1


def test_nothing_listening_is_a_clear_error(socket_path):
    with pytest.raises(shardio.AttachError, match="no shard group listens"):
        shardio.connect(socket_path)


# ---------------------------------------------------------------- the boundary


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701])
def test_the_socket_directory_must_be_private(tmp_path, mode):
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(shardio.InsecureSocketPath, match="chmod 0700"):
        shardio.ShardGroup(1, listen=str(directory / "shards.sock"))


def test_the_socket_directory_is_checked_again_at_start(socket_path, leak_check):
    group = shardio.ShardGroup(1, listen=socket_path)
    os.chmod(os.path.dirname(socket_path), 0o777)
    with pytest.raises(shardio.InsecureSocketPath):
        group.start()
    assert not group.running


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_directory_of_another_user_is_refused(socket_path):
    os.chown(os.path.dirname(socket_path), 65534, 65534)
    with pytest.raises(shardio.InsecureSocketPath, match="belongs to uid 65534"):
        shardio.ShardGroup(1, listen=socket_path)


def test_symlinks_abstract_names_and_missing_directories_are_refused(tmp_path, socket_path):
    link = tmp_path / "link"
    link.symlink_to(os.path.dirname(socket_path))
    with pytest.raises(shardio.InsecureSocketPath, match="symlink"):
        shardio.ShardGroup(1, listen=str(link / "shards.sock"))
    for abstract in ("\0shards", "@shards"):
        with pytest.raises(shardio.InsecureSocketPath, match="abstract"):
            shardio.ShardGroup(1, listen=abstract)
    with pytest.raises(shardio.InsecureSocketPath, match="does not exist"):
        shardio.ShardGroup(1, listen=str(tmp_path / "nowhere" / "shards.sock"))


def test_peers_are_checked_by_their_credentials(socket_path, leak_check):
    with shardio.ShardGroup(1, listen=socket_path, listen_allow_uids=[12345]) as group:
        seen = run_client("refused", socket_path)
        assert seen["error"] == "AttachRefused", seen
        assert f"uid {os.geteuid()} may not attach" in seen["message"]
        assert group._attach_server.attached_total == 0
    with shardio.ShardGroup(
        1, listen=socket_path, listen_allow_uids=[12345, os.geteuid()]
    ) as group:
        assert run_client("calls", socket_path)["sync_ok"]


def test_client_memory_cannot_be_resized_or_resealed(socket_path, leak_check):
    with shardio.ShardGroup(2, listen=socket_path) as group:
        seen = run_client("truncate", socket_path)
        assert (seen["shrink"], seen["grow"], seen["seal"]) == ("EPERM", "EPERM", "EPERM"), seen
        # The shards still serve (a truncated mapping would have killed them with SIGBUS).
        assert run_client("calls", socket_path)["sync_ok"]
        assert all(group.is_alive(shard) for shard in range(2))


@pytest.mark.parametrize("how", ["length", "indexes", "unaligned", "oversize"])
def test_a_corrupt_ring_drops_that_client_never_the_shard(socket_path, how, leak_check):
    with shardio.ShardGroup(2, listen=socket_path, max_message_bytes=256 << 10) as group:
        honest = start_client("stream", socket_path, socket_path + ".stop", "honest")
        first_line(honest)
        seen = run_client("corrupt", socket_path, how)
        assert seen["notice"] is not None, seen
        assert "dropped this client's link" in seen["notice"]
        assert group.is_alive(0)
        assert group.submit(0, ef.add, 2, 3).result(timeout=30) == 5
        Path(socket_path + ".stop").touch()
        streamed = json.loads(honest.communicate(timeout=60)[0].splitlines()[-1])
        assert streamed["sent"] == streamed["received"] > 0 and streamed["wrong"] == 0
        assert wait_until(lambda: no_clients_left(group))


def test_a_client_that_floods_and_never_reads_is_held_to_its_bounds(socket_path, leak_check):
    bound = 256 << 10
    with shardio.ShardGroup(
        2,
        listen=socket_path,
        ring_bytes=64 << 10,
        max_calls_per_peer=64,
        max_queued_bytes_per_peer=bound,
    ) as group:
        flooder = start_client("flood", socket_path, 16384, 2.0)
        flooded = first_line(flooder)
        try:
            state = group.submit(0, client_links).result(timeout=30)[flooded["number"]]
            # Replies wait for ring space up to the bound (plus the one that crossed it);
            # the rest of the requests stay unread in the client's own ring.
            assert state["backlog_bytes"] <= bound + 16384 + 64, state
            assert state["held"] > 0 and state["received"] < flooded["sent"], (state, flooded)
            seen = run_client("calls", socket_path)  # everyone else is served meanwhile
            assert seen["sync_ok"] and seen["async_ok"]
        finally:
            flooder.communicate("\n", timeout=60)
        assert wait_until(lambda: no_clients_left(group))


def test_a_stopped_client_holds_up_nobody(socket_path, leak_check):
    with shardio.ShardGroup(2, listen=socket_path, ring_bytes=64 << 10) as group:
        stopped = start_client("pipelined", socket_path, 2000, 16384)
        number = first_line(stopped)["ready"]
        assert wait_until(lambda: group.submit(0, client_links).result()[number]["received"] > 10)
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            assert wait_until(
                lambda: group.submit(0, client_links).result()[number]["backlog_bytes"] > 0
            )
            seen = run_client("calls", socket_path)
            assert seen["sync_ok"] and seen["async_ok"]
            assert [group.submit(0, ef.add, i).result(timeout=30) for i in range(100)] == list(
                range(100)
            )
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        assert json.loads(stopped.communicate(timeout=120)[0].splitlines()[-1])["good"] == 2000


# ---------------------------------------------------------------- coming and going


def test_attach_detach_churn_while_another_client_streams(socket_path, leak_check):
    with shardio.ShardGroup(2, listen=socket_path) as group:
        stop = socket_path + ".stop"
        streamer = start_client("stream", socket_path, stop, "streamer")
        first_line(streamer)
        churned = run_client("churn", socket_path, 200)
        Path(stop).touch()
        streamed = json.loads(streamer.communicate(timeout=60)[0].splitlines()[-1])
        assert churned["wrong"] == 0 and churned["cycles"] == 200
        assert churned["numbers"] <= 2  # endpoint numbers are reused, not grown
        assert streamed["wrong"] == 0 and streamed["sent"] == streamed["received"] > 0
        assert wait_until(lambda: no_clients_left(group))


def test_a_client_killed_mid_call_is_reclaimed_and_its_results_go_nowhere(socket_path, leak_check):
    with shardio.ShardGroup(2, listen=socket_path) as group:
        victim = start_client("slow", socket_path, 20)
        number = first_line(victim)["number"]
        victim.kill()
        victim.wait()
        assert wait_until(lambda: no_clients_left(group))
        # The next client gets the same endpoint number and the same request ids while the
        # dead client's calls are still running: their results must not reach it.
        with shardio.connect(socket_path) as client:
            assert client.number == number
            futures = [
                client.submit(i % 2, ef.slow_echo, ("new client", i), 0.2) for i in range(20)
            ]
            assert [f.result(timeout=30) for f in futures] == [("new client", i) for i in range(20)]
            time.sleep(0.5)  # the dead client's calls have all finished by now
            assert client.submit(1, ef.add, 1, 1).result(timeout=30) == 2
            assert client.in_flight() == 0
        assert wait_until(lambda: no_clients_left(group))


def test_stopping_the_group_fails_attached_calls_with_shard_died(socket_path, leak_check):
    group = shardio.ShardGroup(2, listen=socket_path).start()
    client = shardio.connect(socket_path)
    try:
        future = client.submit(1, ef.slow_echo, "never", 30)
        group.stop(timeout=10)
        with pytest.raises(shardio.ShardDied, match="owner"):
            future.result(timeout=1.0)
        with pytest.raises(shardio.ShardDied):
            client.submit(0, ef.add, 1).result(timeout=1.0)
        assert not client.connected
    finally:
        client.close()
        group.stop()


def test_a_dead_owner_fails_attached_calls_within_a_second(socket_path, leak_check):
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        import shardio
        with shardio.ShardGroup(2, listen={socket_path!r}):
            print("ready", flush=True)
            time.sleep(600)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(__file__),
    )
    try:
        assert owner.stdout.readline().strip() == "ready"
        with shardio.connect(socket_path) as client:
            assert client.submit(0, ef.add, 20, 22).result(timeout=30) == 42

            async def pending():
                return await client.call(1, ef.slow_echo, "never", 30)

            import asyncio
            import concurrent.futures

            future = client.submit(0, ef.slow_echo, "never", 30)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                awaited = pool.submit(asyncio.run, pending())
                time.sleep(0.2)
                owner.kill()
                killed = time.monotonic()
                with pytest.raises(shardio.ShardDied):
                    future.result(timeout=5)
                with pytest.raises(shardio.ShardDied):
                    awaited.result(timeout=5)
                assert time.monotonic() - killed < 1.0  # the promise: within a second
    finally:
        owner.kill()
        owner.wait()


def test_a_shard_death_reaches_attached_clients(socket_path, leak_check):
    with shardio.ShardGroup(2, listen=socket_path) as group, shardio.connect(socket_path) as client:
        future = client.submit(1, ef.slow_echo, "never", 30)
        os.kill(group.pids[1], signal.SIGKILL)
        with pytest.raises(shardio.ShardDied, match="SIGKILL"):
            future.result(timeout=10)
        assert client.submit(0, ef.add, 1, 1).result(timeout=30) == 2


@pytest.mark.parametrize("idle_poll_us", [0, 5000])
def test_a_client_rings_a_shard_only_when_it_may_sleep(socket_path, idle_poll_us, leak_check):
    """Each shard mirrors its sleeping flag into every client's segment: with shards that
    sleep after each call (idle_poll_us=0) every call must wake one; with polling shards
    the client rings (eventfd writes) for few of its calls."""
    with (
        shardio.ShardGroup(2, listen=socket_path, idle_poll_us=idle_poll_us) as group,
        shardio.connect(socket_path) as client,
    ):
        for i in range(600):
            assert client.submit(i % 2, ef.add, i, 1).result(timeout=10) == i + 1
        links = client._endpoint.links
        rung = sum(link.doorbells_rung for link in links)
        sent = sum(link.sent_messages for link in links)
        assert sent == 600
        if idle_poll_us:
            assert rung < sent // 2, (rung, sent)
        else:
            assert rung > 0
        assert group.submit(0, ef.add, 1).result(timeout=10) == 1
