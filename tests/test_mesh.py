"""The mesh: no diagonal ring, ring size chosen from the shard count, large groups start."""

from __future__ import annotations

import fabric_functions as ff

import shardio
from shardio.fabric.mesh import MeshLayout


def test_thirty_two_process_shards_start_answer_and_stop_within_256_mib_of_rings(leak_check):
    shards = 32
    with shardio.ShardGroup(shards, backend="process", idle_poll_us=0, start_timeout=240) as group:
        layout = MeshLayout(shards + 1, group.ring_bytes)
        assert layout.size <= 256 << 20, layout.size
        assert group.submit(shards - 1, ff.sum_over_shards).result(timeout=120) == sum(
            range(shards)
        )
        answers = [f.result(timeout=120) for f in group.submit_to_all(shardio.this_shard)]
        assert answers == list(range(shards))


def test_endpoints_are_added_and_removed_while_the_group_runs(backend, leak_check):
    import pytest

    with shardio.ShardGroup(3, backend=backend) as group:
        first = group.add_endpoint()
        second = group.add_endpoint()
        assert first.number != second.number
        futures = [
            endpoint.submit(shard, ff.add, shard, 10)
            for endpoint in (first, second)
            for shard in range(3)
            for _ in range(50)
        ]
        assert [f.result(timeout=30) for f in futures] == [
            shard + 10 for _ in range(2) for shard in range(3) for _ in range(50)
        ]
        for shard in range(3):  # the calls crossed the endpoint's own rings
            assert group.submit(shard, ff.endpoint_traffic, first.number).result() == 50
        first.close()
        assert group.endpoints == [second]
        with pytest.raises(shardio.GroupStateError, match="endpoint was closed"):
            first.submit(0, ff.add, 1)
        for shard in range(3):
            assert group.submit(shard, ff.endpoint_traffic, first.number).result() is None
        with pytest.raises(shardio.GroupStateError, match="already removed"):
            group.remove_endpoint(first)
        with group.add_endpoint() as third:  # removed on the way out
            assert third.submit(2, ff.add, 1, 2).result(timeout=30) == 3
        assert group.endpoints == [second]
        assert second.submit(1, ff.add, 4, 4).result(timeout=30) == 8
    # stop() removed `second`
    assert group.endpoints == []
