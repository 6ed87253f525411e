"""Tame sockets and name resolution: socket.socket calls that yield to the reactor on a tame stack.

``TameSocket`` is a ``socket.socket`` subclass, so everything client
libraries rely on comes from the stdlib itself: ``makefile()`` and the
reference counting of ``close()`` (a socket closed while a file made from it
is open stays usable until that file closes), ``dup``, ``shutdown``, socket
options, ``isinstance(sock, socket.socket)``, and ``ssl`` wrapping. What it
changes is how it waits: the descriptor is always non-blocking in the kernel,
and the timeout set with ``settimeout``/``setblocking`` is kept here; a call
that would block waits for readiness through ``readiness`` (parking the tame
stack on its loop, or in poll(2) on any other thread) and raises
``TimeoutError`` ("timed out", i.e. ``socket.timeout``) when the timeout
expires, as the stdlib does. With timeout 0 (non-blocking mode) it raises
``BlockingIOError`` like any non-blocking socket.
"""

from __future__ import annotations

import errno
import inspect
import io
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from . import stacks
from .readiness import deadline_after, wait_fd
from .stacks import checkpoint

__all__ = [
    "TameSocket",
    "tame_create_connection",
    "tame_create_server",
    "tame_fromfd",
    "tame_getaddrinfo",
    "tame_socketpair",
]


# The stdlib's "no timeout given" marker (what http.client and others pass on), taken
# from create_connection's public signature.
_DEFAULT_TIMEOUT: Any = inspect.signature(socket.create_connection).parameters["timeout"].default


def _is_ip_literal(host: Any) -> bool:
    if not isinstance(host, str):
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
            return True
        except (OSError, ValueError):
            pass
    return False


def tame_getaddrinfo(
    host: Any,
    port: Any,
    family: int = 0,
    type: int = 0,  # noqa: A002
    proto: int = 0,
    flags: int = 0,
) -> list[Any]:
    """socket.getaddrinfo; on a tame stack the lookup runs off the reactor (loop.getaddrinfo)."""
    rt = stacks.current_runtime()
    if rt is None or host is None or _is_ip_literal(host):
        return socket.getaddrinfo(host, port, family, type, proto, flags)
    return stacks.wait(
        rt.loop.getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
    )  # type: ignore[no-any-return]


# The kernel calls of socket.socket, without TameSocket's waiting.
_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send = socket.socket.send


class TameSocket(socket.socket):
    """A socket.socket whose blocking calls yield to the reactor on a tame stack.

    See the module docstring. Any number of stacks may wait on one TameSocket
    at once (e.g. one reading while another writes).
    """

    def __init__(
        self,
        family: int = -1,
        type: int = -1,  # noqa: A002
        proto: int = -1,
        fileno: int | None = None,
    ) -> None:
        super().__init__(family, type, proto, fileno)
        self._tame_timeout: float | None = super().gettimeout()
        super().setblocking(False)

    @classmethod
    def create(
        cls,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,  # noqa: A002
        proto: int = 0,
        fileno: int | None = None,
    ) -> TameSocket:
        """A new TameSocket (the ``socket.socket(...)`` of patched modules)."""
        return cls(family, type, proto, fileno)

    @classmethod
    def from_socket(cls, sock: socket.socket) -> TameSocket:
        """Take over sock's descriptor (sock is detached) and its timeout."""
        if isinstance(sock, TameSocket):
            return sock
        timeout = sock.gettimeout()
        tame = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        tame._tame_timeout = timeout
        return tame

    # -- timeouts: kept here, the kernel descriptor stays non-blocking ---------------

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None:
            timeout = float(timeout)
            if timeout < 0.0:
                raise ValueError("Timeout value out of range")
        self._tame_timeout = timeout

    def gettimeout(self) -> float | None:
        return self._tame_timeout

    def setblocking(self, flag: bool) -> None:
        self._tame_timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._tame_timeout != 0.0

    @property
    def timeout(self) -> float | None:  # type: ignore[override]
        return self._tame_timeout

    def _deadline(self) -> float | None:
        return deadline_after(self._tame_timeout)

    def _wait(self, write: bool, deadline: float | None) -> None:
        fd = self.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if not wait_fd(fd, write, deadline):
            raise TimeoutError("timed out")

    def _call(self, write: bool, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the non-blocking descriptor, waiting as a blocking socket would."""
        try:
            result = fn(*args)
        except (BlockingIOError, InterruptedError):
            if self._tame_timeout == 0.0:
                raise
        else:
            checkpoint()
            return result
        deadline = self._deadline()
        while True:
            self._wait(write, deadline)
            try:
                return fn(*args)
            except (BlockingIOError, InterruptedError):
                pass

    # -- I/O -------------------------------------------------------------------------

    # recv, recv_into and send are the hot calls: their fast path is inlined.
    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            data = _recv(self, bufsize, flags)
        except (BlockingIOError, InterruptedError):
            return self._call(False, _recv, self, bufsize, flags)  # type: ignore[no-any-return]
        checkpoint()
        return data  # type: ignore[no-any-return]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            n = _recv_into(self, buffer, nbytes, flags)
        except (BlockingIOError, InterruptedError):
            return self._call(False, _recv_into, self, buffer, nbytes, flags)  # type: ignore[no-any-return]
        checkpoint()
        return n  # type: ignore[no-any-return]

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        return self._call(False, super().recvfrom, bufsize, flags)  # type: ignore[no-any-return]

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        return self._call(False, super().recvfrom_into, buffer, nbytes, flags)  # type: ignore[no-any-return]

    def recvmsg(self, *args: Any) -> Any:
        return self._call(False, super().recvmsg, *args)

    def recvmsg_into(self, *args: Any) -> Any:
        return self._call(False, super().recvmsg_into, *args)

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            n = _send(self, data, flags)
        except (BlockingIOError, InterruptedError):
            return self._call(True, _send, self, data, flags)  # type: ignore[no-any-return]
        checkpoint()
        return n  # type: ignore[no-any-return]

    def sendto(self, data: Any, *args: Any) -> int:
        return self._call(True, super().sendto, data, *args)  # type: ignore[no-any-return]

    def sendmsg(self, *args: Any) -> int:
        return self._call(True, super().sendmsg, *args)  # type: ignore[no-any-return]

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Send all of data; the timeout bounds the whole call, as in the stdlib."""
        send = super().send
        with memoryview(data) as view, view.cast("B") as remaining:
            try:
                sent = send(remaining, flags)
            except (BlockingIOError, InterruptedError):
                if self._tame_timeout == 0.0:
                    raise
                sent = 0
            if sent == len(remaining):
                checkpoint()
                return
            deadline = self._deadline()
            while sent < len(remaining):
                self._wait(True, deadline)
                try:
                    sent += send(remaining[sent:], flags)
                except (BlockingIOError, InterruptedError):
                    pass

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """socket.sendfile: os.sendfile for regular files, read-and-send otherwise."""
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if not self.type & socket.SOCK_STREAM:
            raise ValueError("only SOCK_STREAM type sockets are supported")
        if count is not None and (not isinstance(count, int) or count <= 0):
            raise ValueError(f"count must be a positive integer (got {count!r})")
        if self._tame_timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported")
        try:
            file_fd = file.fileno()
            regular = stat.S_ISREG(os.fstat(file_fd).st_mode)
        except (AttributeError, OSError, io.UnsupportedOperation):
            regular = False
        total = 0
        try:
            if regular:
                deadline = self._deadline()
                while count is None or total < count:
                    want = (count - total) if count is not None else 2**30
                    try:
                        sent = os.sendfile(self.fileno(), file_fd, offset + total, want)
                    except BlockingIOError:
                        self._wait(True, deadline)
                        continue
                    if sent == 0:
                        break
                    total += sent
                return total
            if offset:
                file.seek(offset)
            while count is None or total < count:
                block = 8192 if count is None else min(8192, count - total)
                data = file.read(block)
                if not data:
                    break
                self.sendall(data)
                total += len(data)
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)

    # -- connections -----------------------------------------------------------------

    def _resolve(self, address: Any) -> Any:
        """Resolve a host name in address off the reactor (connect would block in C)."""
        if (
            isinstance(address, tuple)
            and self.family in (socket.AF_INET, socket.AF_INET6)
            and isinstance(address[0], str)
            and not _is_ip_literal(address[0])
        ):
            infos = tame_getaddrinfo(address[0], address[1], self.family, self.type)
            return infos[0][4]
        return address

    def connect(self, address: Any) -> None:
        address = self._resolve(address)
        try:
            super().connect(address)
        except (BlockingIOError, InterruptedError) as exc:
            if self._tame_timeout == 0.0:
                raise
            if exc.errno not in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
                raise
        else:
            checkpoint()
            return
        self._wait(True, self._deadline())
        err = self.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    def connect_ex(self, address: Any) -> int:
        try:
            self.connect(address)
        except TimeoutError:
            return errno.EWOULDBLOCK
        except (socket.gaierror, socket.herror):
            raise
        except OSError as exc:
            if exc.errno is None:
                raise
            return exc.errno
        return 0

    def accept(self) -> tuple[TameSocket, Any]:
        conn, addr = self._call(False, super().accept)
        return TameSocket.from_socket(conn), addr


def tame_socketpair(
    family: int | None = None,
    type: int = socket.SOCK_STREAM,  # noqa: A002
    proto: int = 0,
) -> tuple[TameSocket, TameSocket]:
    """socket.socketpair returning two TameSockets."""
    if family is None:
        family = socket.AF_UNIX
    a, b = socket.socketpair(family, type, proto)
    return TameSocket.from_socket(a), TameSocket.from_socket(b)


def tame_create_server(
    address: Any,
    *,
    family: int = socket.AF_INET,
    backlog: int | None = None,
    reuse_port: bool = False,
    dualstack_ipv6: bool = False,
) -> TameSocket:
    """socket.create_server returning a TameSocket (its accept() yields)."""
    return TameSocket.from_socket(
        socket.create_server(
            address,
            family=family,
            backlog=backlog,
            reuse_port=reuse_port,
            dualstack_ipv6=dualstack_ipv6,
        )
    )


def tame_fromfd(fd: int, family: int, type: int, proto: int = 0) -> TameSocket:  # noqa: A002
    """socket.fromfd (a dup of fd) returning a TameSocket."""
    return TameSocket.from_socket(socket.fromfd(fd, family, type, proto))


def tame_create_connection(
    address: tuple[str, int],
    timeout: Any = _DEFAULT_TIMEOUT,
    source_address: Any = None,
    *,
    all_errors: bool = False,
) -> TameSocket:
    """socket.create_connection returning a TameSocket (same arguments and errors)."""
    host, port = address
    exceptions: list[OSError] = []
    for family, type_, proto, _canon, sa in tame_getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = None
        try:
            sock = TameSocket(family, type_, proto)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sa)
            exceptions.clear()
            return sock
        except OSError as exc:
            if not all_errors:
                exceptions.clear()  # like the stdlib: raise only the last error
            exceptions.append(exc)
            if sock is not None:
                sock.close()
    if exceptions:
        try:
            if not all_errors:
                raise exceptions[0]
            raise ExceptionGroup("create_connection failed", exceptions)
        finally:
            exceptions.clear()
    raise OSError("getaddrinfo returns an empty list")
