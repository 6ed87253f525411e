"""``python -m shardio.osd``: run, load, query and benchmark the OSD.

    python -m shardio.osd demo                       # start, load, verify, measure, stop
    python -m shardio.osd serve --shards 2 --data /srv/osd --port 6800
    python -m shardio.osd load  --addr 127.0.0.1:6800 --objects 10000 --size 4096
    python -m shardio.osd get   --addr 127.0.0.1:6800 obj-00000042 > obj.bin
    python -m shardio.osd bench --addr 127.0.0.1:6800 --objects 10000 --seconds 10
    python -m shardio.osd bench --addr 127.0.0.1:6800 --objects 10000 --rate 5000
    python -m shardio.osd compact --data /srv/osd     # reclaim space now (OSD stopped)

``serve --port P`` listens on the shared port P (SO_REUSEPORT, every
shard) and on P+1+S for shard S (``--shard-base-port`` to move them), on
127.0.0.1 unless ``--host ADDRESS`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

DEFAULT_PORT = 6800


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a host:port address: {text!r}") from None
    if not 0 < p < 65536:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host.strip("[]") or "127.0.0.1", p


def _number(kind: type, *, zero: bool = False) -> Any:
    """An argparse type: a finite number of ``kind``, > 0 (or >= 0 with ``zero``)."""
    want = "a finite number >= 0" if zero else "a finite number > 0"

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (v >= 0 if zero else v > 0) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {want}: {text!r}")
        return v

    return parse


def _run(coro: Any) -> Any:
    from .demo import run_in_new_loop

    return run_in_new_loop(coro)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- commands ---------------------------------------------------------------------------


def _print_ops_in_flight(per_shard: list[Any]) -> None:
    """What ``kill -USR1`` asks a serving OSD for: every waiting request, as JSON lines."""
    for shard, ops in enumerate(per_shard):
        if ops is None:
            print(json.dumps({"shard": shard, "error": "no answer"}), flush=True)
            continue
        print(json.dumps({"shard": shard, "ops_in_flight": len(ops)}), flush=True)
        for op in ops:
            print(json.dumps({"shard": shard, **op}), flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from .messenger import Limits
    from .server import OSDServer

    limits = Limits(max_inflight=args.max_inflight, max_connections=args.max_connections)
    osd = OSDServer(
        args.data,
        shards=args.shards,
        host=args.host,
        port=args.port,
        shard_base_port=args.shard_base_port,
        backend=args.backend,
        pg_num=args.pg_num,
        sync=not args.no_sync,
        limits=limits,
        metrics_port=args.metrics_port,
        log_level=getattr(logging, args.log_level),
        idle_poll_us=args.idle_poll_us,
        stall_threshold_ms=args.stall_threshold_ms or None,
        tame_quota_ms=args.tame_quota_ms or None,
        foreground_shares=args.foreground_shares,
        background_shares=args.background_shares,
    )
    stop = False
    dump_wanted = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop, dump_wanted
        if signum == signal.SIGUSR1:
            dump_wanted = True
        else:
            stop = True

    old = {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    }
    try:
        osd.start()
        assert osd.address is not None and osd.osdmap is not None
        shards = ", ".join(f"{h}:{p}" for h, p in osd.osdmap.addrs)
        print(
            f"shardio OSD serving {args.data}: shared port {osd.address[0]}:{osd.address[1]}, "
            f"shard ports {shards}; {osd.pg_num} pgs, {args.backend} backend"
            + (f"; metrics on :{args.metrics_port}/metrics" if args.metrics_port else ""),
            flush=True,
        )
        print(
            f"Ctrl-C (or SIGTERM) stops it; kill -USR1 {os.getpid()} dumps the requests in flight.",
            flush=True,
        )
        down: set[int] = set()
        while not stop:
            time.sleep(0.2)
            if dump_wanted:
                dump_wanted = False
                _print_ops_in_flight(osd.dump_ops_in_flight())
            for s in range(args.shards):
                if s not in down and not osd.is_alive(s):
                    down.add(s)
                    print(
                        f"shard {s} died: its pgs answer ESHUTDOWN through the other shards; "
                        "restart the OSD to bring it back",
                        file=sys.stderr,
                        flush=True,
                    )
            if len(down) == args.shards:
                print("every shard died; stopping", file=sys.stderr)
                return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        osd.stop()
    print("stopped", flush=True)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from .client import AsyncClient
    from .loadgen import load, object_names, verify

    async def body() -> int:
        names = object_names(args.objects, args.prefix)
        async with await AsyncClient.connect(*args.addr, timeout=args.timeout) as c:
            r = await load(c, names, args.size, concurrency=args.concurrency)
            print(
                f"loaded {r.objects} objects of {args.size} B ({r.bytes / 2**20:.1f} MiB) in "
                f"{r.seconds:.2f} s: {r.rate:.0f} PUT/s"
            )
            if args.verify:
                v = await verify(c, names, args.size, concurrency=args.concurrency)
                print(f"verified {v.objects - len(v.mismatches) + v.errors}/{len(names)} objects")
                if v.mismatches:
                    print(f"MISMATCH on {len(v.mismatches)} objects, e.g. {v.mismatches[:5]}")
                    return 1
        return 0

    return int(_run(body()))


def cmd_get(args: argparse.Namespace) -> int:
    from .client import Client

    with Client(*args.addr, timeout=args.timeout) as c:
        if args.offset or args.length:
            data = c.read(args.name, args.offset, args.length)
        else:
            data = c.get(args.name)
    if args.output and args.output != "-":
        with open(args.output, "wb") as f:
            f.write(data)
        print(f"{len(data)} bytes written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    from .client import Client

    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(args.file, "rb") as f:
            data = f.read()
    with Client(*args.addr, timeout=args.timeout) as c:
        size = c.put(args.name, data)
    print(f"{args.name}: {size} bytes stored")
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    from .client import Client

    with Client(*args.addr, timeout=args.timeout) as c:
        st = c.stat(args.name)
        assert c.osdmap is not None
        pg, shard = c.osdmap.locate(args.name)
    print(f"{args.name}: size {st.size}, version {st.version}, pg {pg}, shard {shard}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .client import Client

    with Client(*args.addr, timeout=args.timeout) as c:
        names = c.list_pg(args.pg) if args.pg is not None else c.list()
    text = "".join(n.decode(errors="backslashreplace") + "\n" for n in names)
    _write_like_a_filter(text.encode())
    return 0


def _write_like_a_filter(data: bytes) -> None:
    """Write data to stdout; if the reader has gone (``ls | head``), die of SIGPIPE.

    That is what a Unix tool does: no traceback, and the shell sees the
    signal (status 141). Python ignores SIGPIPE (and would raise
    BrokenPipeError), so the default is restored for this write only, once
    the sockets to the OSD are closed.
    """
    sys.stdout.flush()
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        out = sys.stdout.buffer
        out.write(data)
        out.flush()
    finally:
        signal.signal(signal.SIGPIPE, previous)


def cmd_bench(args: argparse.Namespace) -> int:
    from .client import AsyncClient
    from .loadgen import BenchResult, closed_loop, format_table, object_names, open_loop

    names = object_names(args.objects, args.prefix)

    async def body() -> list[BenchResult]:
        async with await AsyncClient.connect(
            *args.addr, route=args.route, timeout=args.timeout
        ) as c:
            results = []
            if args.rate is None or args.closed:
                results.append(
                    await closed_loop(
                        c,
                        names,
                        seconds=args.seconds,
                        concurrency=args.concurrency,
                        length=args.length,
                        label=f"{args.route}, closed loop ({args.concurrency})",
                    )
                )
            if args.rate is not None:
                results.append(
                    await open_loop(
                        c,
                        names,
                        seconds=args.seconds,
                        rate=args.rate,
                        length=args.length,
                        label=f"{args.route}, open loop at {args.rate:.0f}/s",
                    )
                )
            return results

    results = _run(body())
    print(
        f"{args.length} B reads of random objects among {args.objects} "
        f"({args.prefix}00000000..), {args.seconds} s per run"
    )
    print(format_table(results))
    for r in results:
        if r.service:
            svc = sorted(r.service)
            print(
                f"{r.label}: latency measured from the intended send time; from the actual "
                f"send p50 {svc[len(svc) // 2] * 1e3:.2f} ms"
            )
        if r.errors:
            print(f"{r.label}: {r.errors} errors, first: {r.first_error}")
    return 1 if any(r.errors for r in results) else 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Compact the stores of a stopped OSD (or one store directory) now."""
    from shardio.tame import posix_env

    from .dirlock import DirectoryLock
    from .objectstore import ObjectStore

    data = os.path.abspath(args.data)
    if not os.path.isdir(data):
        print(f"error: {data!r} is not a directory", file=sys.stderr)
        return 1
    shards = sorted(
        n
        for n in os.listdir(data)
        if n.startswith("shard-") and os.path.isdir(os.path.join(data, n))
    )
    lock = DirectoryLock(posix_env, data, "OSD data directory") if shards else None
    try:
        stores = [os.path.join(data, n) for n in shards] or [data]
        print(f"{'store':<40} {'segments':>9} {'log MiB':>9} {'live MiB':>9} {'reclaimed MiB':>14}")
        for d in stores:
            with ObjectStore(d, posix_env) as store:
                before = store.stats.log_bytes
                result = store.compact(min_garbage=args.min_garbage)
                st = store.stats
                print(
                    f"{os.path.relpath(d, data) if shards else d:<40} "
                    f"{st.segments:>9} {st.log_bytes / 2**20:>9.2f} {st.live_bytes / 2**20:>9.2f} "
                    f"{result.bytes_reclaimed / 2**20:>14.2f}"
                    + (f" (was {before / 2**20:.2f} MiB)" if result.bytes_reclaimed else "")
                )
    finally:
        if lock is not None:
            lock.release()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    def out(line: str) -> None:
        print(line, flush=True)

    return run_demo(
        shards=args.shards,
        objects=args.objects,
        seconds=args.seconds,
        size=args.size,
        backend=args.backend,
        data_dir=args.data,
        concurrency=args.concurrency,
        out=out,
    )


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shardio.osd",
        description="The shardio OSD: a sharded object storage daemon prototype.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def client_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--addr",
            type=_addr,
            default=("127.0.0.1", DEFAULT_PORT),
            help=f"the OSD's address, host:port (default 127.0.0.1:{DEFAULT_PORT})",
        )
        sp.add_argument(
            "--timeout",
            type=_number(float),
            default=10.0,
            help="per-request timeout in seconds (default 10)",
        )

    s = sub.add_parser("serve", help="run an OSD until Ctrl-C")
    s.add_argument(
        "--shards",
        type=_number(int),
        default=len(os.sched_getaffinity(0)),
        help="shards (default: one per CPU)",
    )
    s.add_argument("--data", required=True, help="data directory (created if missing)")
    s.add_argument(
        "--host",
        "--bind",
        dest="host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only). The OSD has no "
        "authentication: bind another address, or 0.0.0.0 for every interface, only on a "
        "network you trust",
    )
    s.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"shared SO_REUSEPORT port (default {DEFAULT_PORT}; 0 picks one)",
    )
    s.add_argument(
        "--shard-base-port",
        type=int,
        default=None,
        help="shard S listens on this + S (default: port + 1)",
    )
    s.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    s.add_argument("--backend", choices=("process", "thread"), default="process")
    s.add_argument(
        "--pg-num",
        type=_number(int),
        default=64,
        help="placement groups of a new data dir (default 64)",
    )
    s.add_argument(
        "--no-sync",
        action="store_true",
        help="acknowledge writes before fsync (faster bulk loads; not crash-safe)",
    )
    s.add_argument(
        "--max-inflight",
        type=_number(int),
        default=64,
        help="requests in flight per connection (default 64)",
    )
    s.add_argument(
        "--idle-poll-us",
        type=float,
        default=None,
        help="how long an idle shard polls before it sleeps (default: the group's, 200 us;"
        " 0 when the shards share their CPUs with other busy processes)",
    )
    s.add_argument(
        "--tame-quota-ms",
        type=_number(float, zero=True),
        default=0.5,
        help="how long the tame stacks may run before the loop gets a turn (default 0.5;"
        " 0 turns preemption off; docs/tame.md)",
    )
    s.add_argument(
        "--stall-threshold-ms",
        type=_number(float, zero=True),
        default=25.0,
        help="report a shard whose loop does not come back for this long (default 25;"
        " 0 turns the stall detector off)",
    )
    s.add_argument(
        "--max-connections",
        type=_number(int),
        default=1024,
        help="connections per shard (default 1024)",
    )
    s.add_argument(
        "--foreground-shares",
        type=_number(float),
        default=1000.0,
        help="scheduling shares of client requests (default 1000; docs/scheduling.md)",
    )
    s.add_argument(
        "--background-shares",
        type=_number(float),
        default=100.0,
        help="scheduling shares of compaction (default 100)",
    )
    s.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("load", help="PUT generated, verifiable objects")
    client_opts(s)
    s.add_argument("--objects", type=_number(int), default=10000)
    s.add_argument("--size", type=_number(int), default=4096, help="bytes per object")
    s.add_argument("--prefix", default="obj-", help="object name prefix (default obj-)")
    s.add_argument("--concurrency", type=_number(int), default=64)
    s.add_argument("--verify", action="store_true", help="read everything back and compare")
    s.set_defaults(func=cmd_load)

    s = sub.add_parser("get", help="read an object to stdout (or -o FILE)")
    client_opts(s)
    s.add_argument("name")
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--length", type=int, default=0, help="bytes (default: to the end)")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")
    s.set_defaults(func=cmd_get)

    s = sub.add_parser("put", help="store a file (or stdin) as an object")
    client_opts(s)
    s.add_argument("name")
    s.add_argument("file", nargs="?", default="-", help="file to store (default: stdin)")
    s.set_defaults(func=cmd_put)

    s = sub.add_parser("stat", help="size, version and placement of an object")
    client_opts(s)
    s.add_argument("name")
    s.set_defaults(func=cmd_stat)

    s = sub.add_parser("ls", help="list object names (all, or one pg)")
    client_opts(s)
    s.add_argument("--pg", type=int, default=None)
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("bench", help="read benchmark over objects made by `load`")
    client_opts(s)
    s.add_argument(
        "--objects",
        type=_number(int),
        default=10000,
        help="working set: names obj-00000000.. as `load` made them",
    )
    s.add_argument("--prefix", default="obj-")
    s.add_argument("--seconds", type=_number(float), default=10.0)
    s.add_argument("--length", type=_number(int), default=4096, help="bytes per read")
    s.add_argument(
        "--concurrency",
        type=_number(int),
        default=16,
        help="closed loop: reads in flight (default 16)",
    )
    s.add_argument(
        "--rate",
        type=_number(float),
        default=None,
        help="open loop at this many reads/s (latency from intended send time)",
    )
    s.add_argument("--closed", action="store_true", help="with --rate: run the closed loop too")
    s.add_argument(
        "--route",
        choices=("direct", "shared"),
        default="direct",
        help="direct: to the owning shard; shared: via the shared port (hops)",
    )
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser(
        "compact", help="reclaim the space of overwritten and deleted objects (OSD stopped)"
    )
    s.add_argument("--data", required=True, help="the OSD data directory (or one store's)")
    s.add_argument(
        "--min-garbage",
        type=float,
        default=0.0,
        help="compact segments at least this share garbage (default 0: every sealed segment)",
    )
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("demo", help="start an OSD, load, verify, measure, stop (< 1 min)")
    s.add_argument("--shards", type=_number(int), default=2)
    s.add_argument("--objects", type=_number(int), default=3000)
    s.add_argument(
        "--seconds",
        type=_number(float),
        default=6.0,
        help="total length of the latency runs (default 6)",
    )
    s.add_argument("--size", type=_number(int), default=4096, help="bytes per object")
    s.add_argument("--concurrency", type=_number(int), default=16)
    s.add_argument("--backend", choices=("process", "thread"), default="process")
    s.add_argument(
        "--data", default=None, help="use (and keep) this data directory instead of a temporary one"
    )
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m shardio.osd`` and the ``shardio-osd`` script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.func is not cmd_serve:  # serve handles SIGTERM itself; the others clean up as on ^C
        signal.signal(signal.SIGTERM, _interrupt)
    from shardio.errors import ShardioError

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ShardioError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
