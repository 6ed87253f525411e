"""Per-shard metrics: scraped over real HTTP while real groups work.

Shards import this module by name to run the functions below; it imports
nothing heavy at the top (no pytest) so that costs them little.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import shard_functions as sf

import shardio
from shardio import metrics

# ---------------------------------------------------------------- helpers


class Scrape:
    """One parsed exposition: ``scrape(name, **labels)`` is the sample with exactly those labels."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in self.families for s in family.samples}

    def __call__(self, name: str, **labels) -> float:
        return self.samples[(name, frozenset((k, str(v)) for k, v in labels.items()))]

    def assert_valid(self) -> None:
        names = [family.name for family in self.families]
        assert len(names) == len(set(names)), "a family's samples were split"
        assert self.text.count("# TYPE ") == len(names)
        assert self.text.count("# HELP ") == len(names)
        for family in self.families:
            assert family.documentation, f"{family.name} has no help text"
            for sample in family.samples:
                assert "shard" in sample.labels, f"{sample} has no shard label"
                assert not sample.name.endswith("_created"), sample


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        result = Scrape(response.read().decode())
    result.assert_valid()
    return result


def assert_refused(url: str) -> None:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.URLError as error:
        assert isinstance(error.reason, ConnectionRefusedError), error
    else:
        raise AssertionError(f"{url} still answers")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def delta(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return after(name, **labels) - before(name, **labels)


# ---------------------------------------------------------------- shard side


def block_for(seconds: float) -> int:
    """On a shard: block its reactor (a plain function runs before the next message)."""
    time.sleep(seconds)
    return shardio.current_reactor().stats.stalls


def declare_custom_series() -> bool:
    """On a shard: custom series through the API, amounts that depend on the shard."""
    from prometheus_client.core import GaugeMetricFamily

    m = metrics.shard_registry()
    me = shardio.this_shard()
    widgets = m.counter("test_widgets", "Widgets made, by kind.", ["kind"])
    assert m.counter("test_widgets_total", "Widgets made, by kind.", ["kind"]) is widgets
    widgets.labels(kind="a").inc(me + 1)
    m.gauge("test_temperature_celsius", "A gauge.").set(20 + me)
    latency = m.histogram("test_latency_seconds", "A histogram.", ["op"]).labels(op="read")
    for seconds in (30e-6, 2e-3, 2e-3):
        latency.observe(seconds)

    def pull() -> list:
        return [GaugeMetricFamily("test_pulled", "Computed at scrape time.", value=100 + me)]

    def broken() -> list:
        raise RuntimeError("a collector that fails must cost only its own series")

    m.register_collector(pull)
    m.register_collector(broken)
    return True


# ---------------------------------------------------------------- tests


def test_counters_follow_the_work_and_the_endpoint_closes_at_stop(backend, leak_check):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    n = 40
    with shardio.ShardGroup(2, backend=backend, metrics_port=port) as group:
        before = scrape(url)
        for i in range(n):  # n calls from outside to shard 0, each one submit_to(1) from there
            assert group.submit(0, sf.hop_to, 1, sf.add, i, 1).result(timeout=10) == i + 1
        after = scrape(url)

        for name in ("shardio_fabric_sent_messages_total",
                     "shardio_fabric_received_messages_total"):
            assert delta(before, after, name, shard=0, peer=1) == n
            assert delta(before, after, name, shard=1, peer=0) == n  # the replies
        # The bytes one side sent are the bytes the other side received.
        for a, b in ((0, 1), (1, 0)):
            assert delta(before, after, "shardio_fabric_sent_bytes_total", shard=a, peer=b) == \
                delta(before, after, "shardio_fabric_received_bytes_total", shard=b, peer=a) > 0
        # The second scrape's own call is one more request on each shard.
        assert delta(before, after, "shardio_reactor_requests_total", shard=0) == n + 1
        assert delta(before, after, "shardio_reactor_requests_total", shard=1) == n + 1
        assert delta(before, after, "shardio_reactor_tasks_started_total", shard=0) == n
        assert delta(before, after, "shardio_fabric_received_messages_total",
                     shard=0, peer="outside") == n + 1
        assert delta(before, after, "shardio_fabric_sent_messages_total",
                     shard="outside", peer=0) == n + 1
        assert delta(before, after, "shardio_external_submissions_total",
                     shard="outside") == n + 2
        for shard in (0, 1):
            received = sum(delta(before, after, "shardio_fabric_received_messages_total",
                                 shard=shard, peer=peer) for peer in (1 - shard, "outside"))
            assert delta(before, after, "shardio_reactor_batch_messages_total",
                         shard=shard) == received
            assert 1 <= delta(before, after, "shardio_reactor_batches_total",
                              shard=shard) <= received
            assert delta(before, after, "shardio_reactor_polls_total", shard=shard) > 0
            assert after("shardio_shard_up", shard=shard) == 1
            assert after("shardio_fabric_peer_up", shard=shard, peer=1 - shard) == 1
            assert after("shardio_fabric_ring_used_bytes", shard=shard, peer="outside") >= 0
            assert after("shardio_fabric_ring_capacity_bytes", shard=shard) == group.ring_bytes
            assert after("shardio_reactor_busy_seconds_total", shard=shard) > 0
            assert after("shardio_reactor_stalls_total", shard=shard) >= 0
        assert after("shardio_external_in_flight", shard="outside") == 0

        # /metrics?name[]=... restricts the output to those families.
        only = scrape(url + "?name[]=shardio_shard_up")
        assert {family.name for family in only.families} == {"shardio_shard_up"}
    assert_refused(url)


def test_scrapes_while_the_group_works(backend, leak_check):
    """Concurrent scrapes during cross-shard load: each valid, every counter monotonic."""
    with shardio.ShardGroup(2, backend=backend) as group, \
            metrics.serve_group_metrics(group, 0, timeout=5) as server:
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                futures = [group.submit(i % 2, sf.hop_to, 1 - i % 2, sf.add, i) for i in range(32)]
                for future in futures:
                    future.result(timeout=10)

        def scraper(out: list) -> None:
            out.extend(scrape(server.url) for _ in range(8))

        loader = threading.Thread(target=load)
        loader.start()
        results: list[list[Scrape]] = [[] for _ in range(3)]
        scrapers = [threading.Thread(target=scraper, args=(out,)) for out in results]
        for thread in scrapers:
            thread.start()
        for thread in scrapers:
            thread.join(timeout=30)
        stop.set()
        loader.join(timeout=30)
    for series in results:
        assert len(series) == 8
        for earlier, later in itertools.pairwise(series):
            for (name, labels), value in earlier.samples.items():
                if name.endswith("_total"):
                    assert later.samples[(name, labels)] >= value, (name, labels)
        assert series[-1]("shardio_fabric_sent_messages_total", shard=0, peer=1) > 0


def test_external_submissions_on_a_shard_and_from_outside(backend):
    with shardio.ShardGroup(2, backend=backend) as group, \
            metrics.serve_group_metrics(group, 0, timeout=5) as server:
        before = scrape(server.url)
        n = 25
        futures = [group.submit(1, sf.add, i) for i in range(n)]
        assert [f.result(timeout=10) for f in futures] == [i for i in range(n)]
        # 2n external_submit calls from a plain thread started on shard 1
        results = group.submit(1, sf.external_submit_from_thread, n,
                               backend == "thread").result(timeout=10)
        assert len(results) == 2 * n
        after = scrape(server.url)
    assert delta(before, after, "shardio_external_submissions_total", shard="outside") == \
        n + 1 + 2
    assert delta(before, after, "shardio_external_submissions_total", shard=1) == 2 * n
    assert delta(before, after, "shardio_reactor_inbox_items_total", shard=1) >= 2 * n
    assert delta(before, after, "shardio_external_submissions_total", shard=0) == 0
    assert after("shardio_reactor_inbox_length", shard=1) >= 0


def test_custom_series_carry_the_right_shard_label(backend, leak_check):
    with shardio.ShardGroup(2, backend=backend) as group, \
            metrics.serve_group_metrics(group, 0, timeout=5) as server:
        assert all(f.result(timeout=10) for f in group.submit_to_all(declare_custom_series))
        got = scrape(server.url)
    for shard in (0, 1):
        assert got("test_widgets_total", shard=shard, kind="a") == shard + 1
        assert got("test_temperature_celsius", shard=shard) == 20 + shard
        assert got("test_pulled", shard=shard) == 100 + shard
        assert got("test_latency_seconds_count", shard=shard, op="read") == 3
        assert got("test_latency_seconds_bucket", shard=shard, op="read", le="2.5e-05") == 0
        assert got("test_latency_seconds_bucket", shard=shard, op="read", le="5e-05") == 1
        assert got("test_latency_seconds_bucket", shard=shard, op="read", le="+Inf") == 3
        assert got("shardio_shard_up", shard=shard) == 1  # the broken collector cost nothing else
    types = {family.name: family.type for family in got.families}
    assert types["test_widgets"] == "counter" and types["test_latency_seconds"] == "histogram"


def test_a_killed_shard_is_down_and_the_scrape_stays_fast(leak_check):
    group = shardio.ShardGroup(2, backend="process").start()
    server = metrics.serve_group_metrics(group, 0)
    try:
        assert scrape(server.url)("shardio_shard_up", shard=1) == 1
        os.kill(group.pids[1], signal.SIGKILL)
        started = time.monotonic()
        got = scrape(server.url)
        assert time.monotonic() - started < 2.0
        assert got("shardio_shard_up", shard=1) == 0
        assert got("shardio_shard_up", shard=0) == 1
        assert ("shardio_reactor_polls_total", frozenset({("shard", "1")})) not in got.samples
        # Once the death is known, shard 0 knows too, and a scrape does not even ask
        # shard 1: with a 5 s timeout it still returns at once.
        deadline = time.monotonic() + 5
        while True:
            got = scrape(server.url)
            if got("shardio_fabric_peer_up", shard=0, peer=1) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got("shardio_shard_up", shard=1) == 0
        assert got("shardio_fabric_peer_up", shard=0, peer=1) == 0
        assert got("shardio_fabric_peer_up", shard="outside", peer=1) == 0
        started = time.monotonic()
        assert metrics.collect(group, timeout=5).up == {0: True, 1: False}
        assert time.monotonic() - started < 4.0  # it did not wait its 5 s on shard 1
    finally:
        group.stop()
        server.close()
    assert_refused(server.url)


def test_a_shard_that_does_not_answer_in_time_shows_down(backend):
    with shardio.ShardGroup(2, backend=backend) as group:
        stall = group.submit(1, block_for, 2.0)  # blocks shard 1's reactor, in order
        snapshot = metrics.collect(group, timeout=0.5)  # queued behind the stall on shard 1
        assert not stall.done()  # it gave up at its timeout, before the stall ended
        assert snapshot.up == {0: True, 1: False}
        assert snapshot.value("shardio_shard_up", shard=1) == 0
        assert snapshot.value("shardio_reactor_polls_total", shard=0) > 0
        assert 'shardio_shard_up{shard="1"} 0.0' in snapshot.text()
        stall.result(timeout=10)
        snapshot = metrics.collect(group)
        assert snapshot.up == {0: True, 1: True}
        assert snapshot.value("shardio_reactor_stalls_total", shard=1) >= 1
        assert snapshot.value("shardio_fabric_sent_messages_total", shard="outside") > 0


def test_declaring_series():
    import pytest

    m = metrics.ShardMetrics(3)
    counter = m.counter("test_ops_total", "Ops.", ["op"])
    assert m.counter("test_ops", "Ops.", ["op"]) is counter
    assert m.histogram("test_seconds", "Latency.") is m.histogram("test_seconds", "Latency.")
    with pytest.raises(metrics.MetricsError, match="already declared"):
        m.gauge("test_ops", "Ops.", ["op"])
    with pytest.raises(metrics.MetricsError, match="already declared"):
        m.counter("test_ops", "Ops.", ["kind"])
    with pytest.raises(metrics.MetricsError, match="already declared"):
        m.histogram("test_seconds", "Latency.", buckets=(1.0, 2.0))
    with pytest.raises(metrics.MetricsError, match="'shard' label"):
        m.counter("test_other", "Other.", ["shard"])
    with pytest.raises(metrics.MetricsError, match="built-in"):
        m.counter("shardio_reactor_polls_total", "Polls.")
    with pytest.raises(shardio.NotInShardError):
        metrics.shard_registry()


async def _read_a_file_on_a_tame_stack(path: str) -> int:
    from shardio import tame

    def read() -> int:
        with tame.env().open(path, "rb") as f:
            return len(f.pread(4096, 0))

    return await tame.call(read)


def test_tame_and_file_io_series(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 8192)
    with shardio.ShardGroup(1, backend="thread", warm_up_tame=True) as group:
        assert group.submit(0, _read_a_file_on_a_tame_stack, str(path)).result(timeout=10) == 4096
        snapshot = shardio.metrics.collect(group)
        assert snapshot.value("shardio_tame_calls_total", shard=0) == 1
        assert snapshot.value("shardio_file_read_cached_total", shard=0) + snapshot.value(
            "shardio_file_read_uring_total", shard=0) == 1
        assert snapshot.value("shardio_file_fallback", shard=0) == 0
