"""Starting shards: one spawned process each (default) or one thread each.

Processes are started with multiprocessing's *spawn* method, which execs a
fresh interpreter: safe from a parent that already runs threads and an
asyncio loop, and it re-imports the caller's ``__main__`` so its functions
can be submitted.  The child inherits exactly the fabric's descriptors (the
memfd, the doorbells) and a *lifeline*: the read end of a pipe whose write
end only the parent holds.  When the parent dies, for any reason, the pipe
reports end-of-file and the shard exits at once.
"""

from __future__ import annotations

import importlib
import io
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from .fabric.handles import FdHandle
from .fabric.link import DEFAULT_MAX_BYTES, DEFAULT_MAX_CALLS
from .fabric.mesh import Mesh
from .reactor import Reactor, home_reactor, set_process_reactor

EXIT_PARENT_DIED = 70


@dataclass
class ShardOptions:
    """Settings every shard of a group shares."""

    shard_count: int
    idle_poll_us: float
    loop: Any = "auto"  # a name, or a picklable loop factory
    max_message_bytes: int = 256 << 20
    cpus: list[int] | None = None
    log_level: int = logging.WARNING
    stall_threshold_ms: float | None = 25.0
    warm_up_tame: bool = False
    tame_quota_ms: float | None = 0.5  # shardio.tame.DEFAULT_QUOTA; None: no preemption
    preload: tuple[str, ...] = ()
    max_calls_per_peer: int = DEFAULT_MAX_CALLS
    max_queued_bytes_per_peer: int = DEFAULT_MAX_BYTES
    extras: dict[str, Any] = field(default_factory=dict)


def make_reactor(shard: int, mesh: Mesh, options: ShardOptions) -> Reactor:
    # Imports before the reactor (and its stall detector) exist: nothing to stall.
    for module in options.preload:
        importlib.import_module(module)
    reactor = Reactor(shard, options.shard_count, mesh, idle_poll_us=options.idle_poll_us,
                      loop=options.loop, max_message_bytes=options.max_message_bytes,
                      stall_threshold_ms=options.stall_threshold_ms,
                      max_calls_per_peer=options.max_calls_per_peer,
                      max_queued_bytes_per_peer=options.max_queued_bytes_per_peer)
    from .tame.shard_hook import start_hook  # tame hooks into the reactor, not the reverse

    quota = None if options.tame_quota_ms is None else options.tame_quota_ms / 1000.0
    reactor.add_start_hook(start_hook(quota=quota, warm=options.warm_up_tame))
    return reactor


# ---------------------------------------------------------------- processes


def start_process(shard: int, mesh: Mesh, options: ShardOptions
                  ) -> tuple[Any, int, socket.socket]:
    """Spawn shard ``shard``; returns the process, the parent's lifeline fd and the
    parent's end of the control socket (descriptors for added endpoints go there)."""
    lifeline_read, lifeline_write = os.pipe2(os.O_CLOEXEC)
    control, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=shard_process_main,
        args=(shard, mesh.handle(), FdHandle(lifeline_read), options,
              FdHandle(control_child.fileno())),
        name=f"shardio-shard-{shard}",
        daemon=True,
    )
    try:
        process.start()
    except BaseException:
        control.close()
        raise
    finally:
        os.close(lifeline_read)
        control_child.close()
    return process, lifeline_write, control


def shard_process_main(shard: int, mesh_handle: tuple, lifeline: FdHandle,
                       options: ShardOptions, control: FdHandle | None = None) -> None:
    """The body of a shard process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when shards stop
    _watch_lifeline(lifeline.detach())
    _name_process(f"shardio-shard-{shard}")
    if options.cpus:
        try:
            os.sched_setaffinity(0, {options.cpus[shard % len(options.cpus)]})
        except OSError:
            pass
    sys.stdout = ShardStream(sys.stdout, shard)
    sys.stderr = ShardStream(sys.stderr, shard)
    configure_logging(options.log_level)
    mesh = Mesh.attach(mesh_handle)
    reactor = make_reactor(shard, mesh, options)
    if control is not None:
        reactor.control_socket = socket.socket(fileno=control.detach())
        reactor.control_socket.setblocking(False)
    set_process_reactor(reactor)
    try:
        reactor.run()
    finally:
        set_process_reactor(None)
        reactor.close()
        mesh.close()
        sys.stdout.flush()
        sys.stderr.flush()


def _watch_lifeline(fd: int) -> None:
    def watch() -> None:
        while True:
            try:
                if os.read(fd, 1) == b"":
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os._exit(EXIT_PARENT_DIED)

    threading.Thread(target=watch, name="shardio-lifeline", daemon=True).start()


def _name_process(name: str) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


class ShardStream(io.TextIOBase):
    """A text stream that starts each line with ``[shard N]``."""

    def __init__(self, inner: Any, shard: int) -> None:
        self._inner = inner
        self._prefix = f"[shard {shard}] "
        self._at_line_start = True
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            out = []
            for piece in text.splitlines(keepends=True):
                if self._at_line_start:
                    out.append(self._prefix)
                out.append(piece)
                self._at_line_start = piece.endswith("\n")
            self._inner.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def isatty(self) -> bool:
        return self._inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding

    def writable(self) -> bool:
        return True


_factory_installed = False


def install_log_record_factory() -> None:
    """Give every log record a ``shard`` attribute (the shard number, or '-')."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        reactor = home_reactor()
        record.shard = reactor.shard_id if reactor is not None else "-"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def configure_logging(level: int) -> None:
    """In a shard process: records go to stderr and name their shard."""
    install_log_record_factory()
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s shard %(shard)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------- threads


def start_thread(shard: int, mesh: Mesh, options: ShardOptions,
                 on_crash: Any) -> tuple[threading.Thread, Reactor]:
    """Start shard ``shard`` as a thread of this process."""
    install_log_record_factory()
    reactor = make_reactor(shard, mesh, options)

    def body() -> None:
        try:
            reactor.run()
        except BaseException as error:
            logging.getLogger("shardio.group").exception("shard %d crashed", shard)
            on_crash(shard, f"its reactor thread crashed: {error!r}")
        finally:
            reactor.close()

    thread = threading.Thread(target=body, name=f"shardio-shard-{shard}", daemon=True)
    thread.start()
    return thread, reactor
