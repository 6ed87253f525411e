"""Unmodified client libraries, tamed with tame.patched, against real servers on loopback.

Each test starts its server as a subprocess on 127.0.0.1 (``.ci/services``
installs the Debian binaries: redis-server, PostgreSQL), runs one workload
untamed in this thread, then the same workload from dozens of tame stacks at
once, and compares the results. It also checks that the stacks really parked
(``blocked_calls``) on tame sockets, so an untamed library cannot pass by
blocking the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import glob
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardio import tame

STACKS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


@contextlib.contextmanager
def server_process(
    argv: list[str], port: int, what: str, stop: signal.Signals = signal.SIGTERM, **kwargs: Any
) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    try:
        wait_for_port(port, proc, what)
        yield
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def run_tamed(work: Callable[[int], Any], modules: list[types.ModuleType]) -> tuple[list[Any], int]:
    """work(i) for i < STACKS on tame stacks at once; the results and how many calls parked."""

    async def main() -> tuple[list[Any], int]:
        with tame.patched(*modules):
            results = await asyncio.gather(*(tame.call(work, i) for i in range(STACKS)))
            return list(results), tame.stats()["blocked_calls"]

    return asyncio.run(main())


def run_plain(
    work: Callable[[int], Any], modules: list[types.ModuleType], threads: int = 1
) -> list[Any]:
    """The same workload untamed (the patched modules behave as before off a stack), on
    ``threads`` plain threads (a client whose requests wait out delayed ACKs one by one
    takes seconds sequentially)."""
    with tame.patched(*modules):
        if threads == 1:
            return [work(i) for i in range(STACKS)]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, range(STACKS)))


def blob(n: int, seed: str) -> bytes:
    """n bytes that depend on seed only (a str seed is hashed the same in every process)."""
    return random.Random(seed).randbytes(n)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- HTTP and HTTPS: urllib3 ---------------------------------------------------------

HTTP_SERVER = r"""
import hashlib, http.server, random, ssl, sys

def blob(n, seed):
    return random.Random(seed).randbytes(n)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        n = int(self.path.rsplit("/", 1)[1])
        body = blob(n, self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        body = hashlib.sha256(data).hexdigest().encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

port, certfile = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
if certfile:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def certs() -> Iterator[tuple[str, str]]:
    trustme = pytest.importorskip("trustme", reason="trustme (the test extra) makes the certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    with tempfile.TemporaryDirectory() as d:
        cafile, certfile = os.path.join(d, "ca.pem"), os.path.join(d, "server.pem")
        ca.cert_pem.write_to_path(cafile)
        cert.private_key_and_cert_chain_pem.write_to_path(certfile)
        yield cafile, certfile


def urllib3_modules() -> list[types.ModuleType]:
    pytest.importorskip("urllib3", reason="urllib3 is in the test extra")
    for name in ("urllib3.util.connection", "urllib3.util.ssl_", "urllib3.util.wait"):
        __import__(name)
    return [
        sys.modules["urllib3.util.connection"],
        sys.modules["urllib3.util.ssl_"],
        sys.modules["urllib3.util.wait"],
    ]


def urllib3_workload(base: str, http: Any) -> Callable[[int], Any]:
    def work(i: int) -> Any:
        out = []
        for n in (0, 1000 + i, 100_000 + 7 * i, 1_000_000 if i % 8 == 0 else 64):
            r = http.request("GET", f"{base}/{i}/{n}")
            out.append((r.status, len(r.data), digest(r.data)))
        payload = blob(200_000 + i, f"post{i}")
        r = http.request("POST", f"{base}/upload", body=payload)
        out.append((r.status, r.data.decode() == digest(payload)))
        # a streamed body, read in pieces after the pool got the connection back
        r = http.request("GET", f"{base}/{i}/123457", preload_content=False)
        sock = r.connection.sock if r.connection is not None else None
        chunks = list(r.stream(10_000))
        r.release_conn()
        out.append((digest(b"".join(chunks)), type(sock).__name__))
        return out

    return work


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_urllib3_against_a_local_http_server(scheme, certs) -> None:
    modules = urllib3_modules()
    import urllib3

    cafile, certfile = certs
    port = free_port()
    argv = [sys.executable, "-c", HTTP_SERVER, str(port)] + (
        [certfile] if scheme == "https" else []
    )
    with server_process(argv, port, "the HTTP server"):
        base = f"{scheme}://localhost:{port}"

        def pool() -> Any:
            return urllib3.PoolManager(maxsize=8, ca_certs=cafile, retries=False, timeout=30)

        plain = run_plain(urllib3_workload(base, pool()), modules, threads=8)
        tamed, parked = run_tamed(urllib3_workload(base, pool()), modules)
    want = "TameSSLSocket" if scheme == "https" else "TameSocket"
    assert [r[:-1] for r in tamed] == [r[:-1] for r in plain]
    assert [r[-1][0] for r in tamed] == [r[-1][0] for r in plain]
    assert {r[-1][1] for r in plain} == {"SSLSocket" if scheme == "https" else "socket"}
    assert {r[-1][1] for r in tamed} == {want}
    assert parked >= STACKS // 2


# -- redis-py against redis-server ----------------------------------------------------


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (bash .ci/services installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            d,
        ]
        with server_process(argv, port, "redis-server"):
            yield port


def redis_workload(client: Any, tag: str) -> Callable[[int], Any]:
    def work(i: int) -> Any:
        key = f"{tag}:{i}"
        out = [client.set(key, blob(200_000 + i, f"value{i}")), digest(client.get(key))]
        for _ in range(10):
            client.incr(f"{tag}:counter")
        pipe = client.pipeline()
        for j in range(50):
            pipe.rpush(f"{key}:list", f"item{j}")
        pipe.lrange(f"{key}:list", 0, -1)
        out.append(pipe.execute()[-1][-3:])
        out.append(client.hset(f"{key}:hash", mapping={"a": i, "b": "x" * i}))
        out.append(sorted(client.hgetall(f"{key}:hash").items()))
        out.append(client.delete(key, f"{key}:list", f"{key}:hash"))
        return out

    return work


def test_redis_py_against_redis_server(redis_port) -> None:
    redis = pytest.importorskip("redis", reason="redis-py is in the test extra")
    __import__("redis.connection")
    modules = [sys.modules["redis.connection"]]
    plain_client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=30)
    plain = run_plain(redis_workload(plain_client, "plain"), modules)
    plain_total = int(plain_client.get("plain:counter"))
    plain_client.close()
    tame_client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=30)
    tamed, parked = run_tamed(redis_workload(tame_client, "tame"), modules)
    pooled = open_sockets_to(redis_port)  # the client's pooled connections, still open
    tame_total = int(tame_client.get("tame:counter"))
    tame_client.close()
    assert tamed == plain
    assert tame_total == plain_total == 10 * STACKS
    assert parked >= STACKS // 2
    assert pooled and set(pooled) == {"TameSocket"}


def open_sockets_to(port: int) -> list[str]:
    """Type names of this process's open sockets connected to 127.0.0.1:port."""
    kinds = []
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket) and obj.fileno() >= 0:
            try:
                peer = obj.getpeername()
            except OSError:
                continue
            if peer == ("127.0.0.1", port):
                kinds.append(type(obj).__name__)
    return kinds


# -- pg8000 against PostgreSQL ----------------------------------------------------------


def postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return os.path.dirname(found[-1])
    binary = shutil.which("postgres")
    return os.path.dirname(binary) if binary else None


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (bash .ci/services installs it)")
    run_as: dict[str, Any] = {}
    datadir = tempfile.mkdtemp(prefix="shardio-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the package's user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL")
        os.chown(datadir, user.pw_uid, user.pw_gid)
        # (set in the child itself, not through runuser: signals reach postgres)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    try:
        subprocess.run(
            [
                os.path.join(bindir, "initdb"),
                "-D",
                datadir,
                "-U",
                "shardio",
                "-A",
                "trust",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **run_as,
        )
        port = free_port()
        argv = [
            os.path.join(bindir, "postgres"),
            "-D",
            datadir,
            "-p",
            str(port),
            "-k",
            datadir,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=100",
        ]
        # SIGINT: PostgreSQL's fast shutdown (SIGTERM's smart one waits out a checkpoint)
        with server_process(argv, port, "postgres", signal.SIGINT, **run_as):
            yield port
    finally:
        shutil.rmtree(datadir, ignore_errors=True)


def pg_workload(port: int, tag: str) -> Callable[[int], Any]:
    import pg8000.dbapi

    def work(i: int) -> Any:
        conn = pg8000.dbapi.connect(
            user="shardio", host="127.0.0.1", port=port, database="postgres", timeout=30
        )
        try:
            cur = conn.cursor()
            table = f"t_{tag}_{i}"
            cur.execute(f"CREATE TABLE {table} (k int primary key, v text, b bytea)")
            rows = [(k, f"value {k} of {i}", blob(1000 + k, f"{i}/{k}")) for k in range(40)]
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s)", rows)
            conn.commit()
            cur.execute(f"SELECT count(*), sum(k), md5(string_agg(v, ',' ORDER BY k)) FROM {table}")
            summary = cur.fetchone()
            cur.execute(f"SELECT b FROM {table} ORDER BY k")
            blobs = digest(b"".join(bytes(r[0]) for r in cur.fetchall()))
            cur.execute("SELECT repeat('x', 1000000)")  # a 1 MB row through makefile()
            big = len(cur.fetchone()[0])
            cur.execute(f"DROP TABLE {table}")
            conn.commit()
            kinds = sorted(set(open_sockets_to(port))) if i == 0 else None
            return summary, blobs, big, kinds
        finally:
            conn.close()

    return work


def test_pg8000_against_postgresql(postgres_port) -> None:
    pytest.importorskip("pg8000", reason="pg8000 is in the test extra")
    __import__("pg8000.core")
    modules = [sys.modules["pg8000.core"]]
    plain = run_plain(pg_workload(postgres_port, "plain"), modules, threads=8)
    tamed, parked = run_tamed(pg_workload(postgres_port, "tame"), modules)
    assert [r[:3] for r in tamed] == [r[:3] for r in plain]
    assert all(r[2] == 1_000_000 for r in tamed)
    assert (plain[0][3], tamed[0][3]) == (["socket"], ["TameSocket"])
    assert parked >= STACKS // 2


# -- ftplib against pyftpdlib -----------------------------------------------------------

FTP_SERVER = r"""
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

port, root = int(sys.argv[1]), sys.argv[2]
authorizer = DummyAuthorizer()
authorizer.add_user("shardio", "secret", root, perm="elradfmwMT")
handler = FTPHandler
handler.authorizer = authorizer
server = FTPServer(("127.0.0.1", port), handler)
server.serve_forever()
"""


def ftp_workload(port: int, tag: str) -> Callable[[int], Any]:
    import ftplib

    def work(i: int) -> Any:
        name = f"{tag}-{i}.bin"
        data = blob(300_000 + 13 * i, name)
        with ftplib.FTP(timeout=30) as ftp:
            ftp.connect("127.0.0.1", port)
            ftp.login("shardio", "secret")
            ftp.storbinary(f"STOR {name}", io.BytesIO(data))
            got = bytearray()
            ftp.retrbinary(f"RETR {name}", got.extend, blocksize=8192)
            size = ftp.size(name)
            lines: list[str] = []
            ftp.retrlines(f"NLST {name}", lines.append)
            ftp.delete(name)
            return digest(bytes(got)) == digest(data), size, lines, type(ftp.sock).__name__

    return work


def test_ftplib_against_pyftpdlib(tmp_path) -> None:
    pytest.importorskip("pyftpdlib", reason="pyftpdlib is in the test extra")
    import ftplib

    port = free_port()
    argv = [sys.executable, "-c", FTP_SERVER, str(port), str(tmp_path)]
    with server_process(argv, port, "the pyftpdlib server"):
        plain = run_plain(ftp_workload(port, "f"), [ftplib])
        tamed, parked = run_tamed(ftp_workload(port, "f"), [ftplib])
    assert [r[:3] for r in tamed] == [r[:3] for r in plain]
    assert all(r[0] for r in tamed)
    assert {r[3] for r in plain} == {"socket"} and {r[3] for r in tamed} == {"TameSocket"}
    assert parked >= STACKS // 2
