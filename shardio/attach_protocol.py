"""The attach protocol: what an owner and a client say over the Unix socket.

The socket is ``AF_UNIX``/``SOCK_SEQPACKET`` (one message per send, file
descriptors travel with ``SCM_RIGHTS``).  Messages are small JSON objects;
nothing received on the socket is ever unpickled.

1. The client sends ``hello``: the protocol version and this build's identity.
2. The owner checks the peer's credentials (``SO_PEERCRED``) and the hello,
   then answers ``welcome`` with the endpoint's layout and, as descriptors,
   the endpoint's sealed memfd, the client's doorbell and one doorbell per
   shard (the client rings shard s on its own eventfd) — or ``refused``
   with a reason (``credentials``, ``protocol``, ``build``, ``hello``).
3. Later the owner may send ``shard_died``; either side closing the socket
   ends the attachment (the owner then detaches the client's rings; the
   client fails its pending calls).

A shard that drops a client's link (a corrupt ring, a message over the
limit) tells the client with a ``REPLY_ERROR`` for request id 0
(:data:`LINK_FAILED_REQUEST`) on its ring to the client.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from functools import cache
from typing import Any

from .fabric._ring import HEADER_BYTES

PROTOCOL_VERSION = 2
"""Bumped whenever a message, the endpoint layout or the record format changes (2:
shards answer clients with compact results, ``RESULT``, as they answer shards)."""

MAGIC = "shardio-attach"
MAX_MESSAGE = 65536
LINK_FAILED_REQUEST = 0
"""The request id of a shard's notice that it dropped the client's link."""

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""Seals every attached client's memfd carries: its size can never change, so no
mapping of it can fault (SIGBUS), and no seal can be added later."""


@cache
def _version() -> str:
    from importlib import metadata  # (scanning the installed distributions: on demand)

    try:
        return metadata.version("shardio")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_identity() -> str:
    """What must match on both sides besides the protocol: shardio's version, the
    Python that unpickles the calls, the ring's header layout."""
    return (
        f"shardio {_version()}; {sys.implementation.cache_tag}; "
        f"ring header {HEADER_BYTES}; pickle {__import__('pickle').HIGHEST_PROTOCOL}"
    )


def hello(protocol: int | None = None, build: str | None = None) -> bytes:
    """The client's first message (this build's version and identity unless given)."""
    return encode(
        {
            "magic": MAGIC,
            "type": "hello",
            "protocol": PROTOCOL_VERSION if protocol is None else protocol,
            "build": build_identity() if build is None else build,
            "pid": os.getpid(),
        }
    )


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A message, or ValueError naming what is wrong with it."""
    try:
        message = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not an attach-protocol message ({error})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("not an attach-protocol message (no type)")
    return message


def check_seals(fd: int, size: int) -> None:
    """Raise ValueError unless memfd ``fd`` is ``size`` bytes and sealed against resizing."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ValueError(f"the client memory is not sealed against resizing (seals {seals:#x})")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise ValueError(f"the client memory is {actual} bytes, expected {size}")
