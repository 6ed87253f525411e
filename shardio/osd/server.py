"""The OSD: on every shard an object store and a messenger; one controller outside.

``OSDServer`` (in the process that owns the shard group) starts the shards,
has each one open its object store on a tame stack (``DIR/shard-S``, the
store for the placement groups that shard owns) and bind its listeners,
builds the OSD map with every shard's endpoint, installs it everywhere and
only then starts serving::

    with OSDServer("/srv/osd", shards=2, port=6800) as osd:
        print(osd.address, osd.osdmap.addrs)
        ...

On each shard a ``ShardNode`` is the OSD service: its connections
(``messenger``) run the requests for the pgs it owns on tame stacks, each a
call of ``operations.apply_op`` on the shard's store (the store's blocking
code yields to the reactor, its file I/O goes through io_uring); it forwards
the others to their owner (``forward``: ``submit_to``, the cross-shard hop),
runs those that other shards forward to it (``run_op``) and counts
everything in ``OSDStats``.

Data directory: ``DIR/osd.json`` records the shard count and ``pg_num`` the
directory was created with (placement depends on both, so a restart with
another shard count is refused rather than silently losing objects), and
``DIR/shard-S/`` holds shard S's log-structured store. Writes are
acknowledged only once fsynced (``sync=True``, the default; see
``objectstore``), so an acknowledged write survives a crash of its shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from shardio import tame
from shardio.calls import submit_to
from shardio.errors import SchedulingError, ShardDied, ShardioError
from shardio.group import ShardGroup
from shardio.net import WaitingRequests, listen
from shardio.reactor import require_reactor
from shardio.scheduling import SchedulingGroup, set_default_shares
from shardio.scheduling.groups import check_shares

from .dirlock import DirectoryLock
from .messenger import Limits, OSDConnection
from .objectstore import ObjectStore, StoreError
from .operations import Result, apply_op
from .osdmap import OSDMap, object_hash
from .protocol import Op, Status
from .stats import OSDStats, merge, prometheus_families

__all__ = [
    "OSDConfig",
    "OSDConfigError",
    "OSDServer",
    "OSDStartError",
    "ShardNode",
    "node",
    "running_osd",
]

log = logging.getLogger("shardio.osd.server")

_NODE_KEY = ("shardio.osd", "node")
_META = "osd.json"
#: Imported by each shard before its reactor starts, so that the imports do
#: not stall a running reactor.
_PRELOAD = ("shardio.osd.server", "shardio.io.uring", "shardio.metrics", "prometheus_client")
_META_FORMAT = 1



class OSDConfigError(ShardioError, ValueError):
    """The OSD cannot start with these settings (see the message for the fix)."""


class OSDStartError(ShardioError):
    """A shard failed to open its store or bind its ports."""


@dataclass(frozen=True)
class OSDConfig:
    """What every shard needs to run its part of the OSD (pickled to the shards)."""

    data_dir: str
    host: str = "127.0.0.1"
    pg_num: int = 64
    sync: bool = True
    limits: Limits = field(default_factory=Limits)
    stop_grace: float = 5.0  #: seconds a stopping shard waits for requests in flight
    #: a request waiting longer than this is slow: counted, logged (Ceph's osd_op_complaint_time)
    complaint_seconds: float = 5.0
    #: seconds between checks for a compaction (None: no background compaction)
    compaction_interval: float | None = 5.0
    #: compact segments at least this much garbage, once the store is that much garbage
    compaction_min_garbage: float = 0.5
    segment_size: int = 256 * 1024 * 1024  #: bytes per store segment file
    #: shares of client requests (the shard's default group) and of compaction (the
    #: "background" scheduling group): docs/scheduling.md
    foreground_shares: float = 1000.0
    background_shares: float = 100.0

    def store_dir(self, shard: int) -> str:
        return os.path.join(self.data_dir, f"shard-{shard}")


class _PgOf:
    """name -> pg for the store's per-pg listing (the OSD map's placement)."""

    __slots__ = ("pg_num",)

    def __init__(self, pg_num: int) -> None:
        self.pg_num = pg_num

    def __call__(self, key: bytes) -> int:
        return object_hash(key) % self.pg_num


# ---------------------------------------------------------------------------
# the per-shard service
# ---------------------------------------------------------------------------


class ShardNode:
    """One shard's OSD service: its store, its listeners, its connections, its counters."""

    def __init__(self, config: OSDConfig, shard_id: int) -> None:
        self.config = config
        self.shard_id = shard_id
        self.limits = config.limits
        self.stats = OSDStats()
        self.connections: set[OSDConnection] = set()
        self.store: ObjectStore | None = None
        self.osdmap: OSDMap = OSDMap.build(require_reactor().shard_count, pg_num=config.pg_num)
        self.map_payload = self.osdmap.encode()
        self.servers: list[asyncio.AbstractServer] = []
        self.port = 0
        self.shared_port = 0
        self.active = 0  # store operations running now (requests from any shard)
        self.waiting = WaitingRequests()
        self._idle: asyncio.Event | None = None  # while stop() waits for ``active`` to drop
        self._stopped = False
        self._complaints: asyncio.TimerHandle | None = None
        self._compactor: asyncio.Task[None] | None = None
        self.background = SchedulingGroup(BACKGROUND_GROUP, config.background_shares)

    # -- lifecycle (driven by OSDServer through the group) -------------------------

    async def open(self, port: int) -> int:
        """Open the store (on a tame stack) and bind this shard's own port; return it."""
        cfg = self.config
        set_default_shares(cfg.foreground_shares)  # client requests run in the default group
        self.store = await tame.call(
            ObjectStore,
            cfg.store_dir(self.shard_id),
            pg_of=_PgOf(cfg.pg_num),
            sync=cfg.sync,
            max_read=cfg.limits.max_read,
            segment_size=cfg.segment_size,
        )
        server, self.port = await listen(
            self._connection, cfg.host, port, reuse_port=False, backlog=cfg.limits.listen_backlog
        )
        self.servers.append(server)
        self._register_metrics()
        return self.port

    def _connection(self) -> OSDConnection:
        return OSDConnection(self)

    def _register_metrics(self) -> None:
        """Expose the counters through the shard's metrics registry (read at scrape time)."""
        try:
            from shardio.metrics import shard_registry
        except ImportError:  # no metrics layer: snapshot() still has everything
            return
        shard_registry().register_collector(self._metric_families)

    def _metric_families(self) -> list[Any]:
        snap = self.snapshot()
        return prometheus_families(snap) + _compaction_families(snap.get("store"))

    async def bind_shared(self, port: int) -> int:
        """Join the SO_REUSEPORT group on ``port`` (0: pick one); return the port."""
        server, self.shared_port = await listen(
            self._connection,
            self.config.host,
            port,
            reuse_port=True,
            backlog=self.config.limits.listen_backlog,
        )
        self.servers.append(server)
        return self.shared_port

    async def start(self, osdmap: OSDMap) -> None:
        """Install the map (with every shard's endpoint) and start accepting."""
        self.osdmap = osdmap
        self.map_payload = osdmap.encode()
        for server in self.servers:
            await server.start_serving()  # type: ignore[attr-defined]
        self._complain_later()
        if self.config.compaction_interval is not None and self._compactor is None:
            self._compactor = asyncio.ensure_future(self._compact_in_background())

    def _complain_later(self) -> None:
        period = max(0.1, self.config.complaint_seconds / 2)
        self._complaints = asyncio.get_running_loop().call_later(period, self._complain)

    def _complain(self) -> None:
        """Log the requests that have waited longer than the complaint time (Ceph's
        "slow requests"), then look again later."""
        if self._stopped:
            return
        slow = self.waiting.dump(self.config.complaint_seconds)
        if slow:
            oldest = slow[0]
            log.warning(
                "shard %d: %d slow requests; the oldest has waited %.1f s: %s %r (%s)",
                self.shard_id, len(slow), oldest["age_seconds"], oldest["op"],
                oldest["object"], oldest["stage"],
            )  # fmt: skip
        self._complain_later()

    def dump_ops_in_flight(self, threshold: float = 0.0) -> list[dict[str, Any]]:
        """The requests of this shard waiting longer than ``threshold`` seconds, oldest first."""
        return self.waiting.dump(threshold)

    async def _compact_in_background(self) -> None:
        """Compact this shard's store when enough of it is garbage (on a tame stack: it yields)."""
        cfg = self.config
        assert cfg.compaction_interval is not None
        while True:
            await asyncio.sleep(cfg.compaction_interval)
            store = self.store
            if store is None:
                return
            if store.stats.segments > 1 and store.garbage_ratio() >= cfg.compaction_min_garbage:
                try:
                    await self.background.call(store.compact, cfg.compaction_min_garbage)
                except StoreError as exc:
                    log.warning("shard %d: compaction stopped: %s", self.shard_id, exc)

    async def stop(self) -> None:
        """Stop accepting, drop connections, let store ops finish (bounded), close the store."""
        if self._stopped:
            return
        self._stopped = True
        if self._complaints is not None:
            self._complaints.cancel()
        try:
            from shardio.metrics import shard_registry

            shard_registry().unregister_collector(self._metric_families)
        except ImportError:
            pass
        compactor, self._compactor = self._compactor, None
        if compactor is not None:
            compactor.cancel()  # cancel-safe: at worst a segment is compacted again later
            with contextlib.suppress(asyncio.CancelledError):
                await compactor
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.abort()
        if self.active:
            self._idle = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.config.stop_grace)
            self._idle = None
        store, self.store = self.store, None
        if store is not None:
            try:
                await tame.call(store.close)
            except Exception:
                log.exception("closing the object store of shard %d failed", self.shard_id)

    # -- requests --------------------------------------------------------------------

    def enter(self) -> None:
        """A run of store operations starts (``stop`` waits for every run to leave)."""
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    def run_op(
        self, op: int, name: bytes, offset: int, length: int, payload: bytes
    ) -> Result:
        """Run one request on this shard's store; called on a tame stack, inside
        ``enter``/``leave``. The store is the unmodified blocking ``ObjectStore``:
        its file I/O yields to the reactor through the TameEnv."""
        store = self.store
        if store is None:
            return Status.ESHUTDOWN, b"", 0, 0
        # (the bytes READ returns and PUT/WRITE store: the store's own counters)
        return apply_op(store, op, name, offset, length, payload, self.limits.max_list)

    def run_op_on_stack(
        self, op: int, name: bytes, offset: int, length: int, payload: bytes
    ) -> Result:
        """``run_op`` inside ``enter``/``leave``, for ``tame.start``/``tame.call``."""
        self.enter()
        try:
            return self.run_op(op, name, offset, length, payload)
        finally:
            self.leave()

    def forward(
        self,
        shard: int,
        op: int,
        name: bytes,
        offset: int,
        length: int,
        payload: bytes,
        pool: int,
    ) -> asyncio.Future[Result]:
        """Send a request to the shard that owns its pg (the cross-shard hop)."""
        self.stats.hops_out += 1
        try:
            return submit_to(
                shard, _remote_execute, self.shard_id, op, name, offset, length, payload, pool
            )
        except Exception as exc:  # a dead link, an oversized message: fail this request only
            fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut

    # -- observation -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This shard's counters: OSD, object store, tame runtime and file I/O driver."""
        snap = self.stats.snapshot()
        if self.store is not None:
            snap["read_bytes"] = self.store.stats.read_bytes
            snap["written_bytes"] = self.store.stats.write_bytes
        snap["shard"] = self.shard_id
        snap["connections_open"] = len(self.connections)
        snap["ops_waiting"] = len(self.waiting.entries)
        snap["slow_ops"] = self.waiting.slow(self.config.complaint_seconds)
        snap["reactor_stalls"] = require_reactor().stats.stalls
        if self.store is not None:
            snap["store"] = asdict(self.store.stats)
        try:
            from shardio.tame.stacks import runtime

            rt = runtime()
            snap["tame"] = rt.stats.as_dict()
            snap["io"] = rt.uring.stats()
            snap["io"]["driver"] = rt.uring.kind
        except Exception as exc:  # stats must never fail a caller
            snap["io_error"] = repr(exc)
        return snap


STAGE_RUNNING_FOR_PEER = "running here for shard {shard}: parked on its tame stack"
def _compaction_families(store: dict[str, Any] | None) -> list[Any]:
    """The store's compaction progress and totals as metric families."""
    if not store:
        return []
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    return [
        GaugeMetricFamily(
            "shardio_osd_store_compaction_running",
            "1 while a compaction of this shard's store runs.",
            value=store["compaction_running"],
        ),
        GaugeMetricFamily(
            "shardio_osd_store_compaction_segments_planned",
            "Segments picked by the running (or last) compaction.",
            value=store["compaction_segments_planned"],
        ),
        GaugeMetricFamily(
            "shardio_osd_store_compaction_segments_done",
            "Of those, segments compacted so far.",
            value=store["compaction_segments_done"],
        ),
        CounterMetricFamily(
            "shardio_osd_store_compaction_reclaimed_bytes",
            "Segment bytes removed by compaction.",
            value=store["compaction_bytes_reclaimed"],
        ),
        CounterMetricFamily(
            "shardio_osd_store_compaction_copied_bytes",
            "Live object bytes rewritten by compaction.",
            value=store["compaction_bytes_copied"],
        ),
        CounterMetricFamily(
            "shardio_osd_store_compaction_runs",
            "Compactions started.",
            value=store["compaction_runs"],
        ),
    ]


def _remote_execute(
    origin: int,
    op: int, name: bytes, offset: int, length: int, payload: bytes, pool: int
) -> Result | asyncio.Future[Result] | Awaitable[Result]:
    """The owning shard's side of a hop: the result at once if the op did not block.

    Returning a plain value (not a coroutine) spares the reactor a Task per
    hop; an op that blocks hands back a future the reactor replies from.
    """
    n = node()
    n.stats.hops_in += 1
    outcome: list[Any] = []
    fut: asyncio.Future[Result] | None = None

    def run() -> None:
        try:
            result = n.run_op_on_stack(op, name, offset, length, payload)
        except Exception as exc:  # every outcome goes to the hop's caller
            if fut is None:
                outcome.append(exc)
            elif not fut.done():
                fut.set_exception(exc)
            return
        if fut is None:
            outcome.append(result)
        elif not fut.done():
            fut.set_result(result)

    finished = tame.start(run)
    if finished is None:  # every stack is busy: wait for one in line
        return tame.call(n.run_op_on_stack, op, name, offset, length, payload)
    if finished:
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]
    fut = asyncio.get_running_loop().create_future()
    key = id(fut)
    n.waiting.track(
        key,
        STAGE_RUNNING_FOR_PEER.format(shard=origin),
        time.perf_counter(),
        {"op": Op(op).name, "object": name.decode("utf-8", "backslashreplace"), "pool": pool},
    )
    fut.add_done_callback(lambda _f: n.waiting.untrack(key))
    return fut


def node() -> ShardNode:
    """This shard's OSD service; raises OSDStartError if the OSD does not run here."""
    try:
        return require_reactor().services[_NODE_KEY]  # type: ignore[no-any-return]
    except KeyError:
        raise OSDStartError(
            f"no OSD runs on shard {require_reactor().shard_id}; start it with OSDServer"
        ) from None


# shard-side steps, submitted by OSDServer ---------------------------------------------


async def _shard_open(config: OSDConfig, port: int) -> int:
    reactor = require_reactor()
    n = ShardNode(config, reactor.shard_id)
    try:
        bound = await n.open(port)
    except BaseException:
        await n.stop()
        raise
    reactor.services[_NODE_KEY] = n  # stopped with the group's services
    return bound


async def _shard_bind_shared(port: int) -> int:
    return await node().bind_shared(port)


async def _shard_start(osdmap: OSDMap) -> None:
    await node().start(osdmap)


def _shard_snapshot() -> dict[str, Any]:
    return node().snapshot()


def _shard_dump_ops_in_flight(threshold: float) -> list[dict[str, Any]]:
    return node().dump_ops_in_flight(threshold)
async def _shard_compact(min_garbage: float) -> dict[str, int]:
    store = node().store
    if store is None:
        raise OSDStartError("this shard has no open store")
    return asdict(await node().background.call(store.compact, min_garbage))


def _shard_pid() -> int:
    return os.getpid()


# ---------------------------------------------------------------------------
# the controller
# ---------------------------------------------------------------------------


def _check_meta(data_dir: str, shards: int, pg_num: int) -> int:
    """Create or check DIR/osd.json; return the pg_num to use."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, _META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        meta = None
    except (OSError, ValueError) as exc:
        raise OSDConfigError(f"{path} is unreadable ({exc}); is {data_dir!r} an OSD data dir?")
    if meta is None:
        if any(name.startswith("shard-") for name in os.listdir(data_dir)):
            raise OSDConfigError(
                f"{data_dir!r} holds shard directories but no {_META}: refusing to guess its "
                "shard count and pg_num"
            )
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"format": _META_FORMAT, "shards": shards, "pg_num": pg_num}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return pg_num
    if meta.get("format") != _META_FORMAT:
        raise OSDConfigError(f"{path}: unsupported format {meta.get('format')!r}")
    if meta.get("shards") != shards:
        raise OSDConfigError(
            f"{data_dir!r} was created with {meta.get('shards')} shards; objects are placed by "
            f"shard count, so start it with --shards {meta.get('shards')} (not {shards})"
        )
    return int(meta["pg_num"])


#: The scheduling group of compaction on every shard.
BACKGROUND_GROUP = "background"


class OSDServer:
    """Start, observe and stop an OSD: a ShardGroup whose shards each run a ``ShardNode``.

    ``port`` is the shared (SO_REUSEPORT) port every shard listens on; shard
    S also listens on ``shard_base_port + S`` (default ``port + 1 + S``).
    Port 0 picks free ports (the shared one, and one per shard). The
    bound addresses are ``address`` and ``osdmap.addrs`` once started.
    A request that waits longer than ``complaint_seconds`` is slow: counted
    (``slow_ops``), logged, and listed by ``dump_ops_in_flight``.

    The data directory is locked while the OSD runs (``DirectoryLocked`` for
    a second one). Each shard compacts its store in the background: every
    ``compaction_interval`` seconds (None: never) it checks whether half of
    its segments' bytes are garbage and, if so, compacts on a tame stack of the
    "background" scheduling group (``background_shares``, default 100), while
    client requests run in the shard's default group (``foreground_shares``,
    default 1000): compaction then gets about 1/11 of a busy shard's time.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        shards: int = 2,
        host: str = "127.0.0.1",
        port: int = 0,
        shard_base_port: int | None = None,
        backend: Literal["process", "thread"] = "process",
        pg_num: int = 64,
        sync: bool = True,
        limits: Limits | None = None,
        metrics_port: int | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        log_level: int = logging.WARNING,
        stall_threshold_ms: float | None = 25.0,
        idle_poll_us: float | None = None,
        tame_quota_ms: float | None = 0.5,
        complaint_seconds: float = 5.0,
        compaction_interval: float | None = 5.0,
        segment_size: int = 256 * 1024 * 1024,
        foreground_shares: float = 1000.0,
        background_shares: float = 100.0,
    ) -> None:
        if shards < 1:
            raise OSDConfigError(f"shards must be >= 1, got {shards}")
        if not 0 <= port < 65536:
            raise OSDConfigError(f"port {port} out of range")
        if shard_base_port is None:
            shard_base_port = port + 1 if port else 0
        if shard_base_port and shard_base_port + shards > 65536:
            raise OSDConfigError(f"shard ports {shard_base_port}+{shards} exceed 65535")
        if shard_base_port and port and port in range(shard_base_port, shard_base_port + shards):
            raise OSDConfigError(f"the shared port {port} collides with the shard ports")
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.shards = shards
        self.host = host
        self.port = port
        self.shard_base_port = shard_base_port
        self.backend = backend
        self.pg_num = pg_num
        self.sync = sync
        self.limits = limits or Limits()
        if complaint_seconds <= 0:
            raise OSDConfigError(f"complaint_seconds must be > 0, got {complaint_seconds}")
        self.complaint_seconds = complaint_seconds
        self.metrics_port = metrics_port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.stall_threshold_ms = stall_threshold_ms
        self.idle_poll_us = idle_poll_us
        self.tame_quota_ms = tame_quota_ms
        self.compaction_interval = compaction_interval
        self.segment_size = segment_size
        try:
            self.foreground_shares = check_shares(foreground_shares, "foreground_shares")
            self.background_shares = check_shares(background_shares, "background_shares")
        except SchedulingError as exc:
            raise OSDConfigError(str(exc)) from None
        self.group: ShardGroup | None = None
        self.osdmap: OSDMap | None = None
        self.address: tuple[str, int] | None = None
        self.shard_pids: list[int] = []
        self._dirlock: DirectoryLock | None = None

    def start(self) -> OSDServer:
        """Start the shards, open the stores, bind, install the map, serve (call once)."""
        if self.group is not None:
            raise OSDConfigError("this OSDServer was already started")
        os.makedirs(self.data_dir, exist_ok=True)
        self._dirlock = DirectoryLock(tame.posix_env, self.data_dir, "OSD data directory")
        try:
            return self._start()
        except BaseException:
            self._dirlock.release()
            raise

    def _start(self) -> OSDServer:
        pg_num = _check_meta(self.data_dir, self.shards, self.pg_num)
        self.pg_num = pg_num
        config = OSDConfig(
            self.data_dir,
            self.host,
            pg_num,
            self.sync,
            self.limits,
            complaint_seconds=self.complaint_seconds,
            compaction_interval=self.compaction_interval,
            segment_size=self.segment_size,
            foreground_shares=self.foreground_shares,
            background_shares=self.background_shares,
        )
        group = ShardGroup(
            self.shards,
            backend=self.backend,
            metrics_port=self.metrics_port,
            start_timeout=self.start_timeout,
            stop_timeout=self.stop_timeout,
            log_level=self.log_level,
            stall_threshold_ms=self.stall_threshold_ms,
            idle_poll_us=self.idle_poll_us,
            tame_quota_ms=self.tame_quota_ms,
            preload=_PRELOAD,
            warm_up_tame=True,
        )
        self.group = group
        try:
            group.start()
            deadline = time.monotonic() + self.start_timeout
            ports = self._all(
                [
                    group.submit(s, _shard_open, config, self._shard_port(s))
                    for s in range(self.shards)
                ],
                deadline,
                "open its store and bind its port",
            )
            shared = self._all(
                [group.submit(0, _shard_bind_shared, self.port)], deadline, "bind the shared port"
            )[0]
            self._all(
                [group.submit(s, _shard_bind_shared, shared) for s in range(1, self.shards)],
                deadline,
                "bind the shared port",
            )
            osdmap = OSDMap.build(self.shards, pg_num=pg_num, addrs=[(self.host, p) for p in ports])
            self._all(
                [group.submit(s, _shard_start, osdmap) for s in range(self.shards)],
                deadline,
                "start serving",
            )
            self.shard_pids = self._all(
                [group.submit(s, _shard_pid) for s in range(self.shards)], deadline, "answer"
            )
        except BaseException:
            self.group = None
            group.stop(timeout=5.0)
            raise
        self.osdmap = osdmap
        self.address = (self.host, shared)
        return self

    def _shard_port(self, shard: int) -> int:
        return self.shard_base_port + shard if self.shard_base_port else 0

    @staticmethod
    def _all(futures: list[Any], deadline: float, what: str) -> list[Any]:
        out = []
        for shard, fut in enumerate(futures):
            try:
                out.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                raise OSDStartError(f"a shard did not {what} in time") from None
            except OSError as exc:
                raise OSDStartError(f"shard {shard} could not {what}: {exc}") from exc
            except ShardDied as exc:
                raise OSDStartError(f"shard {shard} died while trying to {what}: {exc}") from exc
        return out

    def stats(self, timeout: float = 5.0) -> list[dict[str, Any] | None]:
        """Each shard's counters (None for a shard that is down or does not answer)."""
        group = self._running()
        futures = [
            group.submit(s, _shard_snapshot) if group.is_alive(s) else None
            for s in range(self.shards)
        ]
        return self._gather(futures, timeout)

    @staticmethod
    def _gather(futures: list[Any], timeout: float) -> list[Any]:
        """Each future's result within ``timeout`` in all, None for a missing or failed one."""
        deadline = time.monotonic() + timeout
        out: list[Any] = []
        for fut in futures:
            if fut is None:
                out.append(None)
                continue
            try:
                out.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
            except Exception:
                out.append(None)
        return out

    def dump_ops_in_flight(
        self, threshold: float = 0.0, timeout: float = 5.0
    ) -> list[list[dict[str, Any]] | None]:
        """Per shard, its requests waiting longer than ``threshold`` seconds, oldest
        first, with the stage each waits in (None for a shard that does not answer)."""
        group = self._running()
        futures = [
            group.submit(s, _shard_dump_ops_in_flight, threshold) if group.is_alive(s) else None
            for s in range(self.shards)
        ]
        return self._gather(futures, timeout)
    def compact(self, min_garbage: float = 0.5, timeout: float = 600.0) -> list[dict[str, int]]:
        """Compact every shard's store now (on its tame stacks, while it serves); their results."""
        group = self._running()
        futures = [group.submit(s, _shard_compact, min_garbage) for s in range(self.shards)]
        return self._all(futures, time.monotonic() + timeout, "compact its store")

    def total_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The counters of all live shards, summed."""
        return merge(s for s in self.stats(timeout) if s is not None)

    def kill_shard(self, shard: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a shard process (fault injection; process backend only)."""
        if self.backend != "process":
            raise OSDConfigError("kill_shard needs the process backend")
        os.kill(self.shard_pids[shard], sig)

    def is_alive(self, shard: int) -> bool:
        return self.group is not None and self.group.is_alive(shard)

    def _running(self) -> ShardGroup:
        if self.group is None:
            raise OSDConfigError("the OSD is not running; call start() first")
        return self.group

    def stop(self, timeout: float | None = None) -> None:
        """Stop serving, close the stores (everything acknowledged is durable), stop the shards."""
        group, self.group = self.group, None
        if group is not None:
            group.stop(timeout)
        if self._dirlock is not None:
            self._dirlock.release()

    def __enter__(self) -> OSDServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.group is not None else "stopped"
        return f"<OSDServer {self.data_dir!r} shards={self.shards} {state} at {self.address}>"


@contextlib.contextmanager
def running_osd(data_dir: str | os.PathLike[str], **kwargs: Any) -> Iterator[OSDServer]:
    """``with running_osd(dir, shards=2) as osd:`` -- an OSDServer started and stopped."""
    osd = OSDServer(data_dir, **kwargs).start()
    try:
        yield osd
    finally:
        osd.stop()
