"""The fabric's guarantees around the rings: interning cannot be poisoned, the
outbox toward a peer is bounded, nested calls do not deadlock against the bound."""

from __future__ import annotations

import fabric_functions as ff
import pytest

import shardio


def test_a_first_call_whose_arguments_fail_to_unpickle_does_not_poison_the_function(
    backend, leak_check
):
    with shardio.ShardGroup(2, backend=backend) as group:
        first, second = group.submit(0, ff.poison_then_call, 1).result(timeout=30)
        assert "refuses to be unpickled" in first
        assert second == 5


def test_a_flood_of_calls_keeps_the_sender_bounded_correct_and_in_order(leak_check):
    """10,000 concurrent calls sharing one 20 KiB payload: pickled all at once they
    would take 200 MB in the sender; under the bound (1024 calls, 4 MiB queued by
    default) the sender's peak RSS grows by far less, every result is right and
    the receiver sees the calls in submission order."""
    calls, payload_bytes = 10_000, 20 << 10
    with shardio.ShardGroup(2, backend="process") as group:
        report = group.submit(0, ff.flood, 1, calls, payload_bytes).result(timeout=120)
        assert report["correct"]
        assert group.submit(1, ff.arrivals, 0).result(timeout=30) == list(range(calls))
        assert report["growth_kib"] < 64 << 10, report  # unbounded: ~200,000 KiB


def test_owner_submissions_beyond_the_bound_wait_in_order(leak_check):
    calls = 3_000
    with shardio.ShardGroup(
        1, backend="process", max_calls_per_peer=8, max_queued_bytes_per_peer=64 << 10
    ) as group:
        payload = b"y" * 1000
        futures = [group.submit(0, ff.record, 1, sequence, payload) for sequence in range(calls)]
        assert [f.result(timeout=60) for f in futures] == [s + 1000 for s in range(calls)]
        assert group.submit(0, ff.arrivals, 1).result(timeout=30) == list(range(calls))


@pytest.mark.parametrize("plain", [False, True], ids=["coroutine", "plain"])
def test_nested_calls_from_handlers_do_not_deadlock_against_the_bound(backend, plain,
                                                                      leak_check):
    """With room for 2 calls per peer, 200 calls whose handlers call back and forth
    three levels deep all finish: nested calls are not held back by the bound.  Plain
    handlers are run inside Ring.dispatch (C), which must give them the serving context."""
    with shardio.ShardGroup(2, backend=backend, max_calls_per_peer=2) as group:
        results = group.submit(0, ff.nested_storm, 1, 200, 3, plain).result(timeout=60)
        assert results == [0] * 200


def test_bounds_must_be_positive_integers():
    import pytest

    with pytest.raises(ValueError, match="max_calls_per_peer"):
        shardio.ShardGroup(1, max_calls_per_peer=0)
    with pytest.raises(ValueError, match="max_queued_bytes_per_peer"):
        shardio.ShardGroup(1, max_queued_bytes_per_peer=-5)


def test_waiting_callers_and_calls_in_flight_show_in_the_metrics(leak_check):
    from shardio.metrics import collect

    with shardio.ShardGroup(2, backend="process", max_calls_per_peer=3) as group:
        group.submit(0, ff.start_held_calls, 1, 20).result(timeout=30)
        snapshot = collect(group)
        labels = {"shard": "0", "peer": "1"}
        assert snapshot.value("shardio_fabric_pending_calls", **labels) == 3
        assert snapshot.value("shardio_fabric_waiting_calls", **labels) == 17
        assert snapshot.value("shardio_fabric_bound_waits_total", **labels) == 17
        group.submit(1, ff.release).result(timeout=30)
        assert group.submit(0, ff.background_results).result(timeout=30) == [1] * 20
        snapshot = collect(group)
        assert snapshot.value("shardio_fabric_waiting_calls", **labels) == 0
        assert snapshot.value("shardio_fabric_backlog_bytes", **labels) == 0


def test_root_calls_stay_bounded_after_the_shard_served_nested_work(leak_check):
    """Serving another shard's call (here: one that sleeps, so the reactor sleeps and
    is woken by that call's timer) must not make the reactor's later root calls
    look nested: calls from the owner's work on shard 1 are still held back."""
    from shardio.metrics import collect

    # Shard 1 sleeps during the nap (after 50 ms of idle polling), its timer wakes it,
    # and it polls for 50 ms more: the owner's next call arrives in that window.
    with shardio.ShardGroup(
        2, backend="process", max_calls_per_peer=2, idle_poll_us=50_000
    ) as group:
        group.submit(0, ff.call_nap, 1, 0.3).result(timeout=30)
        group.submit(1, ff.start_held_calls, 0, 20).result(timeout=30)
        snapshot = collect(group)
        labels = {"shard": "1", "peer": "0"}
        assert snapshot.value("shardio_fabric_pending_calls", **labels) == 2
        assert snapshot.value("shardio_fabric_waiting_calls", **labels) == 18
        group.submit(0, ff.release).result(timeout=30)
        assert group.submit(1, ff.background_results).result(timeout=30) == [0] * 20
