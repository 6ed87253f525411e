"""RESP2, the Redis protocol: an incremental request parser and reply encoders.

Requests are arrays of bulk strings (``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``), or an
inline command line (``PING\\r\\n``, what ``telnet`` and ``redis-cli`` pipes send).
The parser refuses what Redis refuses, with Redis's own messages, before it
allocates anything large: a bulk longer than ``max_bulk`` or an array longer
than ``max_args`` is a protocol error, which closes the connection.
"""

from __future__ import annotations

__all__ = [
    "NULL",
    "NULL3",
    "OK",
    "PONG",
    "ProtocolError",
    "RequestParser",
    "array",
    "bulk",
    "error",
    "integer",
    "simple",
]

MAX_BULK = 512 << 20  # Redis's proto-max-bulk-len
MAX_ARGS = 1 << 20
MAX_INLINE = 64 << 10  # Redis's PROTO_INLINE_MAX_SIZE


class ProtocolError(Exception):
    """The client sent something that is not RESP: Redis answers with an error and closes."""


class RequestParser:
    """Feed bytes, get complete commands (lists of bytes arguments), in order."""

    def __init__(self, max_bulk: int = MAX_BULK, max_args: int = MAX_ARGS) -> None:
        self.buffer = bytearray()
        self.max_bulk = max_bulk
        self.max_args = max_args

    def feed(self, data: bytes) -> list[list[bytes]]:
        """The commands ``data`` completes; raises ProtocolError on bad input."""
        buf = self.buffer
        buf += data
        commands: list[list[bytes]] = []
        pos = 0
        end = len(buf)
        while pos < end:
            parsed = self._array(buf, pos) if buf[pos] == 0x2A else self._inline(buf, pos)
            if parsed is None:
                break
            command, pos = parsed
            if command:
                commands.append(command)
        del buf[:pos]
        return commands

    def _array(self, buf: bytearray, pos: int) -> tuple[list[bytes], int] | None:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > MAX_INLINE:
                raise ProtocolError("Protocol error: too big mbulk count string")
            return None
        try:
            count = int(buf[pos + 1 : eol])
        except ValueError:
            raise ProtocolError("Protocol error: invalid multibulk length") from None
        if count > self.max_args:
            raise ProtocolError("Protocol error: invalid multibulk length")
        pos = eol + 2
        args: list[bytes] = []
        for _ in range(max(0, count)):
            if pos >= len(buf):
                return None
            if buf[pos] != 0x24:  # b"$"
                raise ProtocolError(f"Protocol error: expected '$', got '{chr(buf[pos])}'")
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > MAX_INLINE:
                    raise ProtocolError("Protocol error: too big bulk count string")
                return None
            try:
                size = int(buf[pos + 1 : eol])
            except ValueError:
                raise ProtocolError("Protocol error: invalid bulk length") from None
            if size < 0 or size > self.max_bulk:
                raise ProtocolError("Protocol error: invalid bulk length")
            start = eol + 2
            stop = start + size
            if stop + 2 > len(buf):
                return None
            if buf[stop : stop + 2] != b"\r\n":
                raise ProtocolError("Protocol error: bulk string not terminated by CRLF")
            args.append(bytes(buf[start:stop]))
            pos = stop + 2
        return args, pos

    def _inline(self, buf: bytearray, pos: int) -> tuple[list[bytes], int] | None:
        eol = buf.find(b"\n", pos)
        if eol < 0:
            if len(buf) - pos > MAX_INLINE:
                raise ProtocolError("Protocol error: too big inline request")
            return None
        return bytes(buf[pos:eol]).split(), eol + 1  # (no quoting: plain words)


def simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def error(text: str) -> bytes:
    return b"-" + text.encode() + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(value: bytes | None) -> bytes:
    if value is None:
        return NULL
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(items: list[bytes] | None) -> bytes:
    """An array of already-encoded replies (None: the null array)."""
    if items is None:
        return b"*-1\r\n"
    return b"*%d\r\n" % len(items) + b"".join(items)


NULL = b"$-1\r\n"
NULL3 = b"_\r\n"  # RESP3's null
OK = simple("OK")
PONG = simple("PONG")
