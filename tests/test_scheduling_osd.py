"""The OSD runs compaction in a low-share "background" group and client requests in the
shard's default group, with the shares its options (and `osd serve`'s) set."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import shardio
from shardio.osd.server import OSDConfigError


def _scheduler_samples(group: shardio.ShardGroup) -> dict[tuple[str, str, str], float]:
    snapshot = shardio.metrics.collect(group)
    return {
        (s.name, s.labels["shard"], s.labels["group"]): s.value
        for f in snapshot.families
        if f.name.startswith("shardio_scheduler")
        for s in f.samples
    }


def test_compaction_runs_in_the_background_group(tmp_path: Any) -> None:
    from shardio.osd.client import Client
    from shardio.osd.server import OSDServer

    osd = OSDServer(
        str(tmp_path / "osd"),
        shards=1,
        backend="process",
        compaction_interval=None,
        segment_size=256 * 1024,
        foreground_shares=800,
        background_shares=40,
    )
    with osd:
        assert osd.address is not None
        with Client(*osd.address) as c:
            for gen in range(8):
                for i in range(64):
                    c.put(f"o{i}", bytes([gen]) * 4000)
            result = osd.compact()
            assert result[0]["bytes_reclaimed"] > 0, result
            for i in range(64):
                assert c.get(f"o{i}") == bytes([7]) * 4000
        assert osd.group is not None
        samples = _scheduler_samples(osd.group)
    assert samples[("shardio_scheduler_shares", "0", "background")] == 40
    assert samples[("shardio_scheduler_shares", "0", "default")] == 800
    assert samples[("shardio_scheduler_runtime_ms_total", "0", "background")] > 0
    assert samples[("shardio_scheduler_tasks_processed_total", "0", "background")] > 0


def test_bad_shares_are_refused(tmp_path: Any) -> None:
    from shardio.osd.server import OSDServer

    with pytest.raises(OSDConfigError, match="background_shares: shares must be a number"):
        OSDServer(str(tmp_path / "osd"), background_shares=0)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardio.osd",
            "serve",
            "--data",
            str(tmp_path / "x"),
            "--foreground-shares",
            "-5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--foreground-shares" in out.stderr, out.stderr
