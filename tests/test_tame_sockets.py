"""Tame sockets behave like socket.socket, on real loopback sockets, and wait on the loop.

Most tests run one scenario twice, on plain sockets in a thread and on tame
stacks, and compare the outcomes. Servers that must make progress while a
tame stack waits run as coroutines on the same loop: a tame call that blocked
the loop thread would starve them and the test would fail (by a socket
timeout, not a hang).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import os
import resource
import select
import selectors
import socket
import ssl
import threading
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from shardio import tame
from shardio.tame import TameSocket
from shardio.tame.readiness import TamePoll, TameSelector, _registries, tame_select
from shardio.tame.sockets import tame_create_connection, tame_create_server, tame_socketpair
from shardio.tame.tls import TameSSLSocket, tame_context

LOOPS = ["asyncio", "uvloop"]


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop: str = "asyncio") -> Any:
    if loop == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def on_stack(func: Callable[..., Any], *args: Any, loop: str = "asyncio") -> Any:
    async def main() -> Any:
        return await tame.call(func, *args)

    return run(main, loop)


def outcome(func: Callable[[], Any]) -> Any:
    """func's result, or its exception as (type name, errno) for comparison."""
    try:
        return ("ok", func())
    except OSError as exc:
        return (type(exc).__name__, exc.errno)


# -- servers in plain threads (independent of the code under test) -----------------


class ThreadServer:
    """A TCP server on 127.0.0.1 running handler(conn) per connection in threads."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 64) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.address = self.listener.getsockname()
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def thread_server() -> Iterator[Callable[..., ThreadServer]]:
    servers: list[ThreadServer] = []

    def start(handler: Callable[[socket.socket], None], backlog: int = 64) -> ThreadServer:
        servers.append(ThreadServer(handler, backlog))
        return servers[-1]

    _servers_stopped.clear()
    yield start
    _servers_stopped.set()
    for s in servers:
        s.close()


def blob(n: int, seed: bytes = b"") -> bytes:
    """n deterministic pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


def send_blob_and_close(conn: socket.socket) -> None:
    conn.recv(1)
    conn.sendall(blob(1 << 20))


def echo_until_eof(conn: socket.socket) -> None:
    data = bytearray()
    while chunk := conn.recv(65536):
        data += chunk
    conn.sendall(hashlib.sha256(data).digest() + len(data).to_bytes(8, "little"))


_servers_stopped = threading.Event()


def silent(conn: socket.socket) -> None:
    _servers_stopped.wait(60)  # never reads, never answers


# -- makefile() and close() reference counting ---------------------------------------


def makefile_outlives_close(make: Callable[..., socket.socket], address: Any) -> Any:
    sock = make(address)
    sock.sendall(b"x")
    f = sock.makefile("rb")
    sock.close()  # a file made from it is open: the socket stays usable
    data = f.read()
    fd_while_open = sock.fileno() >= 0
    f.close()  # the last reference: now the descriptor is closed
    return hashlib.sha256(data).hexdigest(), fd_while_open, sock.fileno()


def test_makefile_keeps_socket_open_until_the_file_closes(thread_server) -> None:
    server = thread_server(send_blob_and_close)
    plain = makefile_outlives_close(socket.create_connection, server.address)
    tamed = on_stack(makefile_outlives_close, tame_create_connection, server.address)
    assert tamed == plain
    assert plain[1:] == (True, -1)


def test_http_client_reads_a_body_after_the_connection_closed(tmp_path) -> None:
    """The reported bug: http.client closes the socket before the body is read (EBADF)."""
    body = blob(3 << 20)
    (tmp_path / "big.bin").write_bytes(body)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def get() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port)  # the stdlib's default timeout
        conn.request("GET", "/big.bin", headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, hashlib.sha256(response.read()).hexdigest()

    async def main() -> list[tuple[int, str]]:
        with tame.patched(http.client):
            return list(await asyncio.gather(*(tame.call(get) for _ in range(16))))

    try:
        results = run(main)
        plain = [get() for _ in range(16)]
    finally:
        server.shutdown()
        server.server_close()
    assert results == plain == [(200, hashlib.sha256(body).hexdigest())] * 16


# -- timeouts, non-blocking mode ----------------------------------------------------


def timeout_scenario(make: Callable[..., socket.socket], address: Any) -> list[Any]:
    sock = make(address, 0.2)
    out: list[Any] = [sock.gettimeout(), sock.getblocking()]
    out.append(outcome(lambda: sock.recv(10)))
    out.append(outcome(lambda: sock.recv_into(bytearray(10))))
    sock.settimeout(None)
    out += [sock.gettimeout(), sock.getblocking()]
    sock.setblocking(False)
    out += [sock.gettimeout(), sock.getblocking(), sock.timeout]
    out.append(outcome(lambda: sock.recv(10)))
    sock.settimeout(0.0)
    out.append(outcome(lambda: sock.recv(10)))
    with pytest.raises(ValueError):
        sock.settimeout(-1)
    sock.close()
    return out


def test_timeouts_and_non_blocking_mode_match_the_stdlib(thread_server) -> None:
    server = thread_server(silent)
    plain = timeout_scenario(socket.create_connection, server.address)
    tamed = on_stack(timeout_scenario, tame_create_connection, server.address)
    assert tamed == plain
    assert plain[2] == ("TimeoutError", None) and plain[9] == ("BlockingIOError", 11)


def test_create_connection_default_timeout_is_the_stdlib_default(thread_server) -> None:
    server = thread_server(silent)

    def scenario() -> tuple[Any, Any, Any]:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(0.15)
        try:
            with tame_create_connection(server.address) as a:
                default = a.gettimeout()
                timed_out = outcome(lambda: a.recv(1))
        finally:
            socket.setdefaulttimeout(old)
        with tame_create_connection(server.address, None) as b:
            return default, timed_out, b.gettimeout()

    assert on_stack(scenario) == (0.15, ("TimeoutError", None), None)


def test_connect_times_out_like_the_stdlib() -> None:
    """A listener with a full backlog drops SYNs: connect must raise socket.timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())

    def scenario(make: Callable[..., socket.socket]) -> list[Any]:
        out = []
        for _ in range(2):
            out.append(outcome(lambda: make(listener.getsockname(), 0.2)))
            if out[-1][0] == "ok":
                out[-1][1].close()
                out[-1] = "connected"
        sock = socket.socket() if make is socket.create_connection else TameSocket()
        sock.settimeout(0.2)
        out.append(sock.connect_ex(listener.getsockname()))
        sock.close()
        return out

    try:
        plain = scenario(socket.create_connection)
        tamed = on_stack(scenario, tame_create_connection)
    finally:
        filler.close()
        listener.close()
    assert tamed == plain
    assert ("TimeoutError", None) in plain


def slow_reader(conn: socket.socket) -> None:
    while not _servers_stopped.wait(0.01) and conn.recv(65536):
        pass  # a few MB/s: every wait for buffer space is short, the whole call is not


def test_timeout_bounds_the_whole_sendall(thread_server) -> None:
    """Since 3.5 the timeout bounds all of sendall, not each chunk: a slow reader times out."""
    server = thread_server(slow_reader)

    def scenario(make: Callable[..., socket.socket]) -> Any:
        with make(server.address, 0.5) as sock:
            return outcome(lambda: sock.sendall(b"x" * (48 << 20)))

    assert on_stack(scenario, tame_create_connection) == scenario(socket.create_connection)
    assert scenario(socket.create_connection) == ("TimeoutError", None)


# -- shutdown, sendall of large buffers, recv_into -----------------------------------


def shutdown_and_sendall(make: Callable[..., socket.socket], address: Any, n: int) -> Any:
    data = blob(n, seed=str(n).encode())
    with make(address, 20) as sock:  # a generous bound: a hang fails instead
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the server reads to EOF, then answers
        buf = bytearray(64)
        view = memoryview(buf)
        got = 0
        while True:
            k = sock.recv_into(view[got:], 7)  # nbytes: at most 7 at a time
            if not k:
                break
            assert k <= 7
            got += k
    return bytes(buf[:got]), hashlib.sha256(data).digest() + n.to_bytes(8, "little")


@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_sendall_large_and_recv_into_from_many_stacks(thread_server, loop) -> None:
    server = thread_server(echo_until_eof)
    sizes = [(4 << 20) + i * 4099 for i in range(4)] + [i * 1000 for i in range(20)]

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(
                *(
                    tame.call(shutdown_and_sendall, tame_create_connection, server.address, n)
                    for n in sizes
                )
            )
        )

    results = run(main, loop)
    plain = [shutdown_and_sendall(socket.create_connection, server.address, n) for n in sizes]
    assert results == plain
    assert all(got == want for got, want in results)


# -- waiting yields to the loop; fd sharing; fds above FD_SETSIZE ---------------------


def registry_size() -> int:
    rt = tame.current_runtime() or tame.stacks.runtime()
    reg = _registries.get(rt)
    return 0 if reg is None else len(reg)


@pytest.mark.parametrize("loop", LOOPS)
def test_two_readers_and_a_writer_wait_on_one_socket(loop) -> None:
    """The loop keeps one reader per fd: without a waiter registry one stack hangs."""

    async def main() -> Any:
        a, b = tame_socketpair()
        a.settimeout(5)
        big = blob(4 << 20)
        peer_r, peer_w = await asyncio.open_connection(sock=b)
        results: dict[str, Any] = {}

        def reader(name: str) -> None:
            results[name] = a.recv(1)

        def writer() -> None:
            a.sendall(big)  # far more than the socket buffers: must wait for the peer
            results["writer"] = "sent"

        stacks = [
            asyncio.ensure_future(tame.call(reader, "r1")),
            asyncio.ensure_future(tame.call(reader, "r2")),
            asyncio.ensure_future(tame.call(writer)),
        ]
        await asyncio.sleep(0.05)  # all three are parked on a's fd now
        parked = registry_size()
        received = await peer_r.readexactly(len(big))
        peer_w.write(b"12")
        await peer_w.drain()
        await asyncio.gather(*stacks)
        after = registry_size()
        peer_w.close()
        a.close()
        return parked, received == big, sorted(results.items()), after

    parked, ok, results, after = run(main, loop)
    assert (parked, ok, after) == (1, True, 0)
    assert sorted(v for k, v in results if k != "writer") == [b"1", b"2"]
    assert ("writer", "sent") in results


def raise_nofile(n: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {n}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return soft, hard


@pytest.fixture
def high_fds() -> Iterator[None]:
    """Occupy descriptors so that new ones are numbered above 1024 (FD_SETSIZE)."""
    old = raise_nofile(4096)
    fillers = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        fillers.append(fd)
        if fd > 1100:
            break
    yield
    for fd in fillers:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.mark.parametrize("loop", LOOPS)
def test_descriptors_above_fd_setsize_work(high_fds, loop) -> None:
    async def main() -> Any:
        a, b = tame_socketpair()
        assert a.fileno() > 1024 and b.fileno() > 1024
        a.settimeout(5)

        def waits() -> list[Any]:
            out: list[Any] = [a.recv(3)]
            r, _, _ = tame_select([a], [], [], 5)
            out.append(r == [a])
            out.append(a.recv(3))
            p = TamePoll()
            p.register(a, select.POLLIN)
            out.append(p.poll(5000) == [(a.fileno(), select.POLLIN)])
            out.append(a.recv(3))
            with TameSelector() as sel:
                sel.register(a, selectors.EVENT_READ, "data")
                ((key, events),) = sel.select(5)
                out.append((key.fileobj is a, events, key.data))
            out.append(a.recv(3))
            return out

        call = asyncio.ensure_future(tame.call(waits))
        for chunk in (b"one", b"two", b"six", b"ten"):
            await asyncio.sleep(0.02)  # the stack is parked before each chunk arrives
            b.send(chunk)
        result = await asyncio.wait_for(call, 10)
        a.close()
        b.close()
        return result

    assert run(main, loop) == [
        b"one",
        True,
        b"two",
        True,
        b"six",
        (True, selectors.EVENT_READ, "data"),
        b"ten",
    ]


def test_accept_waits_on_the_loop_and_times_out() -> None:
    async def main() -> Any:
        server = tame_create_server(("127.0.0.1", 0))
        server.settimeout(5)

        def accept() -> Any:
            conn, _ = server.accept()
            data = conn.recv(5)
            timeout = conn.gettimeout()
            conn.close()
            server.settimeout(0.05)
            return type(conn), data, timeout, outcome(server.accept)

        call = asyncio.ensure_future(tame.call(accept))
        await asyncio.sleep(0.02)  # the stack is parked in accept: this loop must run
        _, writer = await asyncio.open_connection(*server.getsockname())
        writer.write(b"hello")
        result = await asyncio.wait_for(call, 10)
        writer.close()
        server.close()
        return result

    assert run(main) == (TameSocket, b"hello", None, ("TimeoutError", None))


def test_tame_socket_off_a_stack_waits_in_poll_on_high_fds(high_fds) -> None:
    """Used from a plain thread a TameSocket blocks like socket.socket (poll(2), not select)."""
    a, b = tame_socketpair()
    assert a.fileno() > 1024
    a.settimeout(5)
    threading.Timer(0.05, b.send, (b"late",)).start()
    got = a.recv(4)
    a.settimeout(0.05)
    with pytest.raises(TimeoutError):
        a.recv(4)
    r, w, _ = tame_select([a], [b], [], 0)
    a.close()
    b.close()
    assert (got, r, w) == (b"late", [], [b])


def test_cancelled_wait_leaves_no_registration() -> None:
    async def main() -> Any:
        a, b = tame_socketpair()
        waiting = asyncio.ensure_future(tame.call(a.recv, 1))
        await asyncio.sleep(0.02)
        before = registry_size()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        after = registry_size()
        again = asyncio.ensure_future(tame.call(a.recv, 1))  # a new wait on the same fd
        await asyncio.sleep(0.02)
        b.send(b"z")
        got = await asyncio.wait_for(again, 5)
        a.close()
        b.close()
        return before, after, got, registry_size()

    assert run(main) == (1, 0, b"z", 0)


# -- select, poll and selectors in a patched module -----------------------------------

MULTIPLEX_SOURCE = """
import select
import selectors

def wait_all(sock, timeout):
    out = []
    out.append(select.select([sock], [], [], 0))          # nothing yet
    r, w, x = select.select([sock], [sock], [], timeout)  # writable at once
    out.append((r, w == [sock], x))
    out.append(select.select([sock], [], [], timeout)[0] == [sock])
    out.append(sock.recv(5))
    p = select.poll()
    p.register(sock, select.POLLIN)
    out.append(p.poll(0))
    out.append(p.poll(timeout * 1000) == [(sock.fileno(), select.POLLIN)])
    out.append(sock.recv(5))
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ, "payload")
        out.append(sel.select(0))
        ready = sel.select(timeout)
        out.append([(k.fileobj is sock, ev, k.data) for k, ev in ready])
        out.append(isinstance(sel, selectors.DefaultSelector))
        sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "both")
        out.append(sorted(ev for _k, ev in sel.select(timeout)))
        out.append(sel.get_key(sock).data)
    out.append(sock.recv(5))
    out.append(select.select([], [], [], 0.01))
    return out
"""


def foreign(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, name, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("loop", LOOPS)
def test_patched_select_poll_and_selectors_wait_on_the_loop(loop) -> None:
    mod = foreign("multiplex_user", MULTIPLEX_SOURCE)

    def plain_run() -> list[Any]:
        a, b = socket.socketpair()
        feeder = threading.Timer(0.05, b.send, (b"hello",))
        feeder.start()
        threading.Timer(0.3, b.send, (b"world",)).start()
        threading.Timer(0.6, b.send, (b"again",)).start()
        try:
            return mod.wait_all(a, 5)
        finally:
            a.close()
            b.close()

    async def main() -> list[Any]:
        a, b = tame_socketpair()
        with tame.patched(mod):
            call = asyncio.ensure_future(tame.call(mod.wait_all, a, 5))
            for chunk in (b"hello", b"world", b"again"):
                await asyncio.sleep(0.05)  # sent by this loop: a blocking wait would starve it
                b.send(chunk)
            result = await asyncio.wait_for(call, 10)
        a.close()
        b.close()
        return result

    tamed = run(main, loop)
    plain = plain_run()
    assert tamed == plain
    assert tamed[3] == b"hello" and tamed[6] == b"world" and tamed[-2] == b"again"


def test_patched_module_gets_tame_sockets_only_on_a_stack() -> None:
    mod = foreign(
        "socket_user",
        "import socket, select, selectors, ssl\n"
        "def make():\n"
        "    return (socket.socket(), select.poll(), selectors.DefaultSelector(),\n"
        "            ssl.create_default_context(), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),\n"
        "            socket.socketpair(), socket.create_server(('127.0.0.1', 0)))\n",
    )

    def kinds() -> list[Any]:
        sock, poll, sel, ctx1, ctx2, pair, server = mod.make()
        with server, socket.socket() as other:
            other.connect(server.getsockname())
            conn, _ = server.accept()
            accepted = type(conn)
            conn.close()
        out = [
            type(server),
            accepted,
            type(sock),
            type(poll).__name__,
            type(sel),
            ctx1.sslsocket_class,
            ctx2.sslsocket_class,
            [type(s) for s in pair],
            isinstance(sock, socket.socket),
        ]
        sock.close()
        sel.close()
        for s in pair:
            s.close()
        return out

    with tame.patched(mod):
        off_stack = kinds()
        tamed = on_stack(kinds)
    assert off_stack == [
        socket.socket,
        socket.socket,
        socket.socket,
        "poll",
        selectors.EpollSelector,
        ssl.SSLSocket,
        ssl.SSLSocket,
        [socket.socket] * 2,
        True,
    ]
    assert tamed == [
        TameSocket,
        TameSocket,
        TameSocket,
        "TamePoll",
        TameSelector,
        TameSSLSocket,
        TameSSLSocket,
        [TameSocket] * 2,
        True,
    ]


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[ssl.SSLContext, str]]:
    trustme = pytest.importorskip("trustme", reason="trustme (the test extra) makes the certs")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    with ca.cert_pem.tempfile() as cafile:
        yield server_ctx, cafile


async def tls_echo_server(server_ctx: ssl.SSLContext, chatty: int = 0) -> asyncio.AbstractServer:
    """A TLS server on this loop: reads a length-prefixed message, answers sha256+length
    (or, if chatty, that many bytes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = int.from_bytes(await reader.readexactly(8), "little")
        data = await reader.readexactly(n)
        if chatty:
            writer.write(b"z" * chatty)
        else:
            writer.write(hashlib.sha256(data).digest() + len(data).to_bytes(8, "little"))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)


def tls_exchange(ctx: ssl.SSLContext, port: int, n: int) -> Any:
    data = blob(n, seed=b"tls%d" % n)
    raw = tame_create_connection(("127.0.0.1", port), 5)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        kind = type(s)
        s.sendall(n.to_bytes(8, "little"))
        s.sendall(data)
        f = s.makefile("rb")
        s.close()  # the file keeps the TLS socket open
        answer = f.read()
        f.close()
    return kind, answer == hashlib.sha256(data).digest() + n.to_bytes(8, "little")


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_handshake_read_write_yield_from_many_stacks(tls, loop) -> None:
    server_ctx, cafile = tls

    async def main() -> list[Any]:
        server = await tls_echo_server(server_ctx)
        port = server.sockets[0].getsockname()[1]
        ctx = tame_context(ssl.create_default_context(cafile=cafile))
        try:
            return list(
                await asyncio.gather(
                    *(
                        tame.call(tls_exchange, ctx, port, n)
                        for n in [1, 1000, 1 << 20, 3 << 20] + [50_000] * 20
                    )
                )
            )
        finally:
            server.close()

    assert run(main, loop) == [(TameSSLSocket, True)] * 24


def test_tls_read_timeout_and_non_blocking_want_read(tls) -> None:
    server_ctx, cafile = tls

    async def main() -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # silent: never answers
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        ctx = tame_context(ssl.create_default_context(cafile=cafile))

        def scenario() -> Any:
            with tame_create_connection(("127.0.0.1", port), 5) as raw:
                s = ctx.wrap_socket(raw, server_hostname="localhost")
                s.settimeout(0.2)
                timed_out = outcome(lambda: s.recv(10))
                s.setblocking(False)
                try:
                    s.recv(10)
                    want = None
                except ssl.SSLWantReadError:
                    want = "want-read"
                s.close()
                return timed_out, want

        try:
            return await tame.call(scenario)
        finally:
            server.close()

    assert run(main) == (("TimeoutError", None), "want-read")


# -- the quota: calls that complete at once still yield once the quota is spent ------

QUOTA_OPS = ["recv", "recv_into", "send", "sendall", "select", "poll", "selector", "tls"]


@pytest.mark.parametrize("op", QUOTA_OPS)
def test_calls_that_complete_at_once_yield_after_the_quota(op, tls) -> None:
    """20,000 ready calls take far more than the 0.5 ms quota: the stack must yield
    (the runtime counts quota yields, and a coroutine gets to run meanwhile)."""
    n = 20_000
    server_ctx, cafile = tls

    async def main() -> Any:
        tame.configure(quota=0.0005)
        a, b = tame_socketpair()
        b.sendall(b"x" * n)
        if op == "tls":
            server = await tls_echo_server(server_ctx, chatty=n)
            port = server.sockets[0].getsockname()[1]
            ctx = tame_context(ssl.create_default_context(cafile=cafile))
        ticks = 0
        done = False

        async def heartbeat() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        def work() -> tuple[int, int]:
            """Ticks of the heartbeat and quota yields during n calls that need no wait."""
            if op == "tls":
                s = ctx.wrap_socket(
                    tame_create_connection(("127.0.0.1", port), 5), server_hostname="localhost"
                )
                s.sendall(b"\0" * 8)
                s.recv(1)  # waits for the first record; the rest of it is buffered by OpenSSL
                start = ticks, tame.stats()["quota_yields"]
                reads = 0
                while s.pending():
                    s.recv(1)
                    reads += 1
                end = ticks, tame.stats()["quota_yields"]
                s.close()
                assert reads > 10_000
                return end[0] - start[0], end[1] - start[1]
            sel = TameSelector()
            sel.register(a, selectors.EVENT_READ)
            poller = TamePoll()
            poller.register(a, select.POLLIN)
            buf = bytearray(1)
            start = ticks, tame.stats()["quota_yields"]
            for _ in range(n):
                if op == "recv":
                    a.recv(1)
                elif op == "recv_into":
                    a.recv_into(buf)
                elif op == "send":
                    a.send(b"y")
                    b.recv(1)
                elif op == "sendall":
                    a.sendall(b"y")
                    b.recv(1)
                elif op == "select":
                    tame_select([a], [], [], 1)
                elif op == "poll":
                    poller.poll(1000)
                elif op == "selector":
                    sel.select(1)
            end = ticks, tame.stats()["quota_yields"]
            sel.close()
            return end[0] - start[0], end[1] - start[1]

        beat = asyncio.ensure_future(heartbeat())
        await asyncio.sleep(0)
        ticks_seen, yields = await tame.call(work)
        done = True
        await beat
        if op == "tls":
            server.close()
        a.close()
        b.close()
        return ticks_seen, yields

    ticks_seen, yields = run(main)
    assert ticks_seen >= 3 and yields >= 3


def test_tls_server_side_accept_and_handshake_yield() -> None:
    """A TLS server on a tame stack (SSLSocket.accept over TameSocket.accept), a client
    coroutine on the same loop: the accept, the handshake and the read must all yield."""
    trustme = pytest.importorskip("trustme", reason="trustme (the test extra) makes the certs")
    ca = trustme.CA()
    server_ctx = tame_context(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main() -> Any:
        listener = server_ctx.wrap_socket(tame_create_server(("127.0.0.1", 0)), server_side=True)
        listener.settimeout(5)

        def serve() -> Any:
            conn, _ = listener.accept()
            data = b""
            while len(data) < 100_000:
                data += conn.recv(65536)
            conn.sendall(hashlib.sha256(data).digest())
            kind = type(conn)
            conn.close()
            return kind

        server = asyncio.ensure_future(tame.call(serve))
        await asyncio.sleep(0.02)  # the stack is parked in accept
        reader, writer = await asyncio.open_connection(
            *listener.getsockname(), ssl=client_ctx, server_hostname="localhost"
        )
        payload = blob(100_000)
        writer.write(payload)
        answer = await reader.readexactly(32)
        kind = await asyncio.wait_for(server, 10)
        writer.close()
        listener.close()
        return kind, answer == hashlib.sha256(payload).digest()

    assert run(main) == (TameSSLSocket, True)
