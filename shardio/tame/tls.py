"""TLS over tame sockets: an ssl.SSLSocket whose handshake, reads and writes yield.

``ssl`` documents ``SSLContext.sslsocket_class`` as the class that
``wrap_socket`` returns, overridable per context. ``tame_context(ctx)`` sets
it to ``TameSSLSocket``, an ``ssl.SSLSocket`` subclass over a ``TameSocket``:
the descriptor is non-blocking in the kernel, so OpenSSL reports
``SSLWantReadError``/``SSLWantWriteError`` instead of blocking in poll(2), and
each such report waits for readiness (parking the tame stack on its loop)
and retries, within the socket's timeout (``TimeoutError`` with the stdlib's
messages on expiry). With timeout 0 the want-errors reach the caller, as for
any non-blocking SSLSocket.

A patched module's ``ssl.SSLContext(...)`` and ``ssl.create_default_context(...)``
return tame contexts when called on a tame stack. A context created elsewhere
(at import time, by an unpatched module) wraps sockets into plain SSLSockets
that block the reactor thread: pass it through ``tame_context`` first.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from .sockets import TameSocket
from .stacks import checkpoint

__all__ = ["TameSSLSocket", "tame_context", "tame_create_default_context", "tame_ssl_context"]


class TameSSLSocket(ssl.SSLSocket, TameSocket):
    """An SSLSocket (from ``wrap_socket`` of a tame context) whose waits yield on a tame stack.

    Method resolution puts ``TameSocket`` under ``ssl.SSLSocket``: the plain
    socket calls SSLSocket makes (connect, accept, recv before the handshake)
    are TameSocket's, and the SSL calls are retried here on want-read/write.
    """

    def _retry(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            result = fn(*args)
        except ssl.SSLWantReadError:
            if self.gettimeout() == 0.0:
                raise
            write = False
        except ssl.SSLWantWriteError:
            if self.gettimeout() == 0.0:
                raise
            write = True
        else:
            checkpoint()
            return result
        deadline = self._deadline()
        while True:
            try:
                self._wait(write, deadline)
            except TimeoutError:
                raise TimeoutError(f"The {what} operation timed out") from None
            try:
                return fn(*args)
            except ssl.SSLWantReadError:
                write = False
            except ssl.SSLWantWriteError:
                write = True

    def do_handshake(self, block: bool = False) -> None:
        if block and self.gettimeout() == 0.0:
            self.settimeout(None)
            try:
                self._retry("handshake", super().do_handshake)
            finally:
                self.settimeout(0.0)
        else:
            self._retry("handshake", super().do_handshake)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002
        return self._retry("read", super().read, len, buffer)

    def write(self, data: Any) -> int:
        return self._retry("write", super().write, data)  # type: ignore[no-any-return]

    def send(self, data: Any, flags: int = 0) -> int:
        return self._retry("write", super().send, data, flags)  # type: ignore[no-any-return]

    def unwrap(self) -> Any:
        return self._retry("shutdown", super().unwrap)


def tame_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make context.wrap_socket return TameSSLSockets (sets the documented sslsocket_class)."""
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"tame_context expects an ssl.SSLContext, got {context!r}")
    context.sslsocket_class = TameSSLSocket
    return context


def tame_ssl_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
    """ssl.SSLContext(...) with tame sockets (the patched module's SSLContext on a tame stack)."""
    return tame_context(ssl.SSLContext(*args, **kwargs))


def tame_create_default_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
    """ssl.create_default_context(...) with tame sockets."""
    return tame_context(ssl.create_default_context(*args, **kwargs))
