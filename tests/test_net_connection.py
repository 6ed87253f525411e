"""The connection core (shardio.net.connection) with a protocol of its own.

A small line protocol, served on loopback by a real loop: ``SLEEP s`` parks
its tame stack, ``ECHO x`` answers at once on the stack, ``NOW x`` answers
without running anything. Replies in request order (``ordered = True``) or
as they complete.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvloop

from shardio import tame
from shardio.net import (
    ConnectionCounters,
    ConnectionLimits,
    Entry,
    TameBatchConnection,
    WaitingRequests,
    listen,
)


class LineService:
    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.stats = ConnectionCounters()
        self.connections: set[Any] = set()
        self.waiting = WaitingRequests()
        self.runs = 0

    def enter(self) -> None:
        self.runs += 1

    def leave(self) -> None:
        pass


class LineConnection(TameBatchConnection):
    ordered = True

    def __init__(self, service: LineService) -> None:
        super().__init__(service)
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.admit(line.decode())

    def charge(self, request: str) -> int:
        return len(request) + 16

    def start(self, entry: Entry) -> None:
        command, _, arg = entry.request.partition(" ")
        if command == "NOW":
            self.complete(entry, [f"now {arg}\n".encode()])
        else:
            self.run_here(entry)

    def execute(self, request: str) -> str:
        command, _, arg = request.partition(" ")
        if command == "SLEEP":
            tame.env().sleep(float(arg))
            return f"slept {arg}"
        if command == "FAIL":
            raise ValueError(arg)
        return f"echo {arg}"

    def finish(self, entry: Entry, result: Any, error: BaseException | None) -> list[bytes]:
        return [f"{'error ' + str(error) if error else result}\n".encode()]

    def details(self, request: str) -> dict[str, Any]:
        return {"line": request}


class UnorderedLineConnection(LineConnection):
    ordered = False


def exchange(port: int, lines: list[str]) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("".join(line + "\n" for line in lines).encode())
        reader = sock.makefile("rb")
        return [reader.readline().decode().rstrip("\n") for _ in lines]


async def serve_and(
    factory: type[LineConnection], client_lines: list[str]
) -> tuple[list[str], Any]:
    service = LineService(ConnectionLimits())
    server, port = await listen(lambda: factory(service), "127.0.0.1", 0, reuse_port=False)
    await server.start_serving()  # type: ignore[attr-defined]
    try:
        replies = await asyncio.get_running_loop().run_in_executor(
            None, exchange, port, client_lines
        )
    finally:
        server.close()
    return replies, service


LINES = ["ECHO a", "SLEEP 0.2", "ECHO b", "NOW c", "FAIL d", "ECHO e"]


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_ordered_replies_wait_for_the_requests_before_them(run: Any) -> None:
    replies, service = run(serve_and(LineConnection, LINES))
    assert replies == ["echo a", "slept 0.2", "echo b", "now c", "error d", "echo e"]
    assert service.stats.connections_accepted == 1 and service.waiting.entries == {}


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_unordered_replies_overtake_a_parked_request(run: Any) -> None:
    replies, _service = run(serve_and(UnorderedLineConnection, LINES))
    assert sorted(replies) == sorted(
        ["echo a", "slept 0.2", "echo b", "now c", "error d", "echo e"]
    )
    assert replies[-1] == "slept 0.2", replies  # the parked one, last
    assert replies.index("now c") < replies.index("slept 0.2")
