"""Sleep means asleep: a shard busy serving sockets is not rung for each message,
and its sleep and busy time agree with the CPU time it used."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import fabric_functions as ff

import shardio


@contextlib.contextmanager
def socket_load(port: int, connections: int = 1, cpus: set[int] | None = None):
    """Closed-loop clients on threads of this process, one line at a time each
    (pinned to ``cpus`` if given)."""
    stop = threading.Event()
    served = [0] * connections

    def client(index: int) -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            reader = sock.makefile("rb")
            while not stop.is_set():
                sock.sendall(b"ping\n")
                assert reader.readline() == b"ping\n"
                served[index] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    try:
        yield served
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def test_a_shard_busy_with_sockets_is_rung_only_while_it_truly_sleeps(leak_check):
    """Shard 1 serves a CPU-heavy socket load with idle_poll_us=0 while shard 0 sends
    it 300 paced calls.  A call rings the doorbell only if shard 1 is asleep when it
    arrives, so the share of calls that ring stays near the share of time shard 1
    was blocked.  Before the wake hook every call rang (the flag stayed set while the
    loop ran socket callbacks): about 1 per call, with shard 1 blocked ~2% of the time.

    The socket client runs on shard 1's CPU (when shard 1 is pinned to one).  On
    shard 0's, it could not send its next line while shard 0 runs, so shard 1 would
    sleep exactly when the calls leave: on a 2-CPU machine 0.4 doorbells per call
    against 10% of the time asleep, a true sleep each time but not the busy peer
    this test is about.
    """
    calls = 300
    with shardio.ShardGroup(2, backend="process", idle_poll_us=0) as group:
        receiver_cpus = group.submit(1, os.sched_getaffinity, 0).result(timeout=30)
        port = group.submit(1, ff.start_echo_server, 1000).result(timeout=30)
        with socket_load(port, cpus=receiver_cpus if len(receiver_cpus) == 1 else None) as served:
            before = group.submit(1, ff.sleep_accounting).result(timeout=30)
            report = group.submit(0, ff.paced_calls, 1, calls, 0.001).result(timeout=120)
            after = group.submit(1, ff.sleep_accounting).result(timeout=30)
        group.submit(1, ff.stop_echo_server).result(timeout=30)
    assert sum(served) > calls / 2  # the load really ran during the calls
    asleep = (after["sleep"] - before["sleep"]) / (after["wall"] - before["wall"])
    per_call = report["doorbells"] / calls
    assert per_call <= asleep + 0.3, (per_call, asleep, report)


def test_sleep_and_busy_time_agree_with_cpu_time(leak_check):
    """Across a socket load, busy time (wall minus sleep) is at least the CPU time the
    reactor thread used, and sleep is at most the wall time it did not use."""
    with shardio.ShardGroup(2, backend="process", idle_poll_us=0) as group:
        port = group.submit(1, ff.start_echo_server, 500).result(timeout=30)
        before = group.submit(1, ff.sleep_accounting).result(timeout=30)
        with socket_load(port) as served:
            group.submit(0, ff.paced_calls, 1, 200, 0.002).result(timeout=120)
        after = group.submit(1, ff.sleep_accounting).result(timeout=30)
        group.submit(1, ff.stop_echo_server).result(timeout=30)
    assert sum(served) > 100
    wall, sleep, cpu = (after[key] - before[key] for key in ("wall", "sleep", "cpu"))
    busy = wall - sleep
    assert cpu > 0.05, (before, after)  # the load made the shard work
    assert busy >= cpu * 0.95, (wall, sleep, cpu)
    assert sleep <= wall - cpu * 0.95, (wall, sleep, cpu)
    assert after["sleeps"] > before["sleeps"]  # it did sleep between requests
