"""Tame sockets and name resolution: socket calls that yield to the reactor on a tame stack."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from . import stacks
from .stacks import Parked, current_runtime


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
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[Any]:  # noqa: A002
    """socket.getaddrinfo; on a tame stack the lookup runs off the reactor (loop.getaddrinfo)."""
    rt = current_runtime()
    if rt is None or host is None or _is_ip_literal(host):
        return socket.getaddrinfo(host, port, family, type, proto, flags)
    return stacks.wait(
        rt.loop.getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
    )  # type: ignore[no-any-return]


_SENTINEL: Any = object()


class TameSocket:
    """A socket whose blocking calls yield to the reactor on a tame stack.

    Wraps a non-blocking ``socket.socket``; recv/recv_into/recvfrom/send/
    sendall/sendto/connect/accept wait with ``loop.add_reader``/``add_writer``
    on a tame stack and with ``select`` elsewhere, honouring settimeout().
    Every other attribute is the wrapped socket's. One socket should be read
    (or written) by one stack at a time: the loop keeps one reader and one
    writer callback per fd.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timeout: float | None = sock.gettimeout()
        sock.setblocking(False)

    @classmethod
    def create(
        cls,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
        fileno: int | None = None,
    ) -> TameSocket:  # noqa: A002
        return cls(socket.socket(family, type, proto, fileno))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def _wait(self, write: bool) -> None:
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "Bad file descriptor")
        rt = current_runtime()
        if rt is None:
            r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], self._timeout)
            if not (r or w):
                raise TimeoutError("timed out")
            return
        loop = rt.loop
        p = Parked()
        if write:
            loop.add_writer(fd, p.wake, True)
        else:
            loop.add_reader(fd, p.wake, True)
        timer = None if self._timeout is None else loop.call_later(self._timeout, p.wake, False)
        try:
            ok = p.park()
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
        if not ok:
            raise TimeoutError("timed out")

    def _io(self, write: bool, fn: Callable[..., Any], *args: Any) -> Any:
        while True:
            try:
                return fn(*args)
            except (BlockingIOError, InterruptedError):
                if self._timeout == 0.0:
                    raise
            self._wait(write)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self._io(False, self._sock.recv, bufsize, flags)  # type: ignore[no-any-return]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self._io(False, self._sock.recv_into, buffer, nbytes, flags)  # type: ignore[no-any-return]

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        return self._io(False, self._sock.recvfrom, bufsize, flags)  # type: ignore[no-any-return]

    def send(self, data: Any, flags: int = 0) -> int:
        return self._io(True, self._sock.send, data, flags)  # type: ignore[no-any-return]

    def sendto(self, data: Any, *args: Any) -> int:
        return self._io(True, self._sock.sendto, data, *args)  # type: ignore[no-any-return]

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = self.send(view, flags)
            view = view[sent:]

    def connect(self, address: Any) -> None:
        err = self.connect_ex(address)
        if err:
            raise OSError(err, os.strerror(err))

    def connect_ex(self, address: Any) -> int:
        if (
            isinstance(address, tuple)
            and self._sock.family in (socket.AF_INET, socket.AF_INET6)
            and not _is_ip_literal(address[0])
        ):
            infos = tame_getaddrinfo(address[0], address[1], self._sock.family, self._sock.type)
            address = infos[0][4]
        err = self._sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            if self._timeout == 0.0:
                return err
            self._wait(True)
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return err

    def accept(self) -> tuple[TameSocket, Any]:
        conn, addr = self._io(False, self._sock.accept)
        tconn = TameSocket(conn)
        tconn._timeout = self._timeout if self._timeout != 0.0 else None
        return tconn, addr

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """socket.makefile over this tame socket (e.g. for http.client)."""
        import io as _io

        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing, reading, binary = "w" in mode, "r" in mode or "w" not in mode, "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = _io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = _io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = _io.BufferedReader(raw, buffering)
        else:
            buffer = _io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = _io.TextIOWrapper(buffer, encoding, errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:  # called by socket.SocketIO.close
        pass

    def close(self) -> None:
        self._sock.close()

    def detach(self) -> int:
        return self._sock.detach()

    def __enter__(self) -> TameSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TameSocket {self._sock!r}>"


def tame_create_connection(
    address: tuple[str, int],
    timeout: Any = _SENTINEL,
    source_address: Any = None,
    *,
    all_errors: bool = False,
) -> TameSocket:
    """socket.create_connection returning a TameSocket (yields on a tame stack)."""
    host, port = address[0], address[1]
    errors: list[OSError] = []
    for family, type_, proto, _canon, sa in tame_getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = None
        try:
            sock = TameSocket.create(family, type_, proto)
            if timeout is not _SENTINEL:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sa)
            return sock
        except OSError as exc:
            errors.append(exc)
            if sock is not None:
                sock.close()
    if not errors:
        raise OSError(f"getaddrinfo returned an empty list for {host!r}")
    if all_errors:
        raise ExceptionGroup("create_connection failed", errors)
    raise errors[0]
