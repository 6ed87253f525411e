"""The RESP server: every shard a Redis Cluster node, and one shared port for the rest.

Each shard listens on its own port, a cluster node owning a range of hash
slots: a key it does not own gets ``-MOVED slot host:port``, so a
cluster-aware client (``redis-cli -c``, redis-py's ``RedisCluster``) sends
every command straight to the owning shard, with no cross-shard hop. Every
shard also listens on one shared port (``SO_REUSEPORT``) for plain clients:
there a command for another shard's key crosses with ``submit_to`` and the
reply comes back in order.

Connections run on the connection core (``shardio.net``), the OSD's too:
every command one socket read delivered is decoded at once, replies leave
in request order in one write per pass, and a client that pipelines without
reading its replies is stopped by the core's limits. The commands
themselves touch only this shard's memory, so they are answered in the loop
as they arrive (the core's ``answer``), not on a tame stack; only a command
for another shard's keys is admitted, sent and completed later.

Safe by default, like Redis's protected mode: it binds loopback, and
refuses another address unless a password is set (``AUTH``/``HELLO ... AUTH``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import shardio
from shardio.net import (
    STAGE_SENT,
    ConnectionCounters,
    ConnectionLimits,
    Entry,
    TameBatchConnection,
    WaitingRequests,
    listen,
)

from . import keyspace as keyspace_module, resp
from .keyspace import keyspace
from .slots import key_slot, shard_of_slot, slot_range

__all__ = ["ProtectedModeError", "RedisConfig", "RedisConnection", "RedisNode"]


class ProtectedModeError(shardio.ShardioError, ValueError):
    """A non-loopback bind without a password (Redis's protected mode refuses it too)."""


@dataclass(frozen=True)
class RedisConfig:
    host: str = "127.0.0.1"
    shared_port: int = 6379
    shard_ports: tuple[int, ...] = ()
    password: str | None = None
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)

    def check(self) -> None:
        if self.password is None and not _is_loopback(self.host):
            raise ProtectedModeError(
                f"refusing to listen on {self.host} without a password: anyone who can reach "
                "it could read and write every key. Set a password (--requirepass), or bind "
                "127.0.0.1."
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RedisNode:
    """One shard's Redis service: its listeners, connections and counters."""

    def __init__(self, config: RedisConfig) -> None:
        reactor = shardio.current_reactor()
        assert reactor is not None
        self.config = config
        self.shard_id = reactor.shard_id
        self.shards = reactor.shard_count
        self.limits = config.limits
        self.stats = ConnectionCounters()
        self.hops = 0  #: commands (or parts) this shard sent to the shard owning their key
        self.connections: set[Any] = set()
        self.waiting = WaitingRequests()
        self.servers: list[asyncio.AbstractServer] = []
        self.node_ids: list[str] = []  # every shard's cluster node id, given by start()
        self.keys = keyspace()  # this shard's keys

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass

    async def start(self, node_ids: list[str]) -> None:
        config = self.config
        self.node_ids = node_ids
        own, _ = await listen(
            lambda: RedisConnection(self, cluster=True),
            config.host,
            config.shard_ports[self.shard_id],
            reuse_port=False,
        )
        shared, _ = await listen(
            lambda: RedisConnection(self, cluster=False),
            config.host,
            config.shared_port,
            reuse_port=True,
        )
        self.servers = [own, shared]
        for server in self.servers:
            await server.start_serving()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.abort()

    def address(self, shard: int) -> bytes:
        return b"%s:%d" % (self.config.host.encode(), self.config.shard_ports[shard])


# -- commands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command's table entry: its arity (negative: at least), flags and key positions
    (COMMAND's format), and how the connection runs it."""

    arity: int
    flags: tuple[str, ...]
    first_key: int
    last_key: int
    step: int
    kind: str  # "key": one key, run where it lives; "multi": keys on several shards; "local"


COMMANDS: dict[bytes, Command] = {
    b"PING": Command(-1, ("fast",), 0, 0, 0, "local"),
    b"ECHO": Command(2, ("fast",), 0, 0, 0, "local"),
    b"QUIT": Command(-1, ("fast",), 0, 0, 0, "local"),
    b"CONFIG": Command(-2, ("admin",), 0, 0, 0, "local"),
    b"SELECT": Command(2, ("fast",), 0, 0, 0, "local"),
    b"AUTH": Command(-2, ("fast", "no-auth"), 0, 0, 0, "local"),
    b"HELLO": Command(-1, ("fast", "no-auth"), 0, 0, 0, "local"),
    b"CLIENT": Command(-2, ("admin",), 0, 0, 0, "local"),
    b"COMMAND": Command(-1, ("loading",), 0, 0, 0, "local"),
    b"INFO": Command(-1, ("loading",), 0, 0, 0, "local"),
    b"CLUSTER": Command(-2, ("admin",), 0, 0, 0, "local"),
    b"DBSIZE": Command(1, ("readonly", "fast"), 0, 0, 0, "all"),
    b"FLUSHALL": Command(-1, ("write",), 0, 0, 0, "all"),
    b"GET": Command(2, ("readonly", "fast"), 1, 1, 1, "key"),
    b"SET": Command(-3, ("write", "denyoom"), 1, 1, 1, "key"),
    b"INCR": Command(2, ("write", "fast"), 1, 1, 1, "key"),
    b"DECR": Command(2, ("write", "fast"), 1, 1, 1, "key"),
    b"INCRBY": Command(3, ("write", "fast"), 1, 1, 1, "key"),
    b"DECRBY": Command(3, ("write", "fast"), 1, 1, 1, "key"),
    b"EXPIRE": Command(3, ("write", "fast"), 1, 1, 1, "key"),
    b"PEXPIRE": Command(3, ("write", "fast"), 1, 1, 1, "key"),
    b"TTL": Command(2, ("readonly", "fast"), 1, 1, 1, "key"),
    b"PTTL": Command(2, ("readonly", "fast"), 1, 1, 1, "key"),
    b"MGET": Command(-2, ("readonly", "fast"), 1, -1, 1, "multi"),
    b"MSET": Command(-3, ("write", "denyoom"), 1, -1, 2, "multi"),
    b"DEL": Command(-2, ("write",), 1, -1, 1, "multi"),
    b"EXISTS": Command(-2, ("readonly", "fast"), 1, -1, 1, "multi"),
}


#: what CONFIG GET reports (exact names, no patterns): this server keeps nothing on disk
CONFIG_PARAMETERS = {b"save": b"", b"appendonly": b"no"}


def key_call(name: bytes, args: list[bytes], null: bytes) -> tuple[str, tuple[Any, ...]]:
    """The KeySpace method and arguments of a one-key command (arity already checked)."""
    key = args[1]
    if name == b"GET":
        return "get", (key, null)
    if name == b"SET":
        return "set", (key, args[2], args[3:], null)
    if name == b"INCR":
        return "incr_by", (key, b"1")
    if name == b"DECR":
        return "incr_by", (key, b"-1")
    if name == b"INCRBY":
        return "incr_by", (key, args[2])
    if name == b"DECRBY":
        try:
            return "incr_by", (key, b"%d" % -int(args[2]))
        except ValueError:
            return "incr_by", (key, b"not an integer")
    if name in (b"EXPIRE", b"PEXPIRE"):
        return "expire", (key, args[2], 1000 if name == b"EXPIRE" else 1)
    return "ttl", (key, 1000 if name == b"TTL" else 1)


class RedisConnection(TameBatchConnection):
    """One client connection: RESP2 in, replies in request order."""

    ordered = True
    inline = True  # every command on this shard's keys is answered in the loop
    service: RedisNode

    def __init__(self, node: RedisNode, *, cluster: bool) -> None:
        super().__init__(node)
        self.cluster = cluster
        self.parser = resp.RequestParser()
        self.authenticated = node.config.password is None
        self.name = b""
        self.null = resp.NULL  # resp.NULL3 once the client said HELLO 3
        self.keys = node.keys
        self.single_shard = node.shards == 1  # (then every key is this shard's)

    # -- the core's hooks ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        try:
            commands = self.parser.feed(data)
        except resp.ProtocolError as exc:
            self.reply_now([resp.error(f"ERR {exc}")])
            self.close_after_replies()
            return
        self.admit_all(commands)

    def charge(self, command: list[bytes]) -> int:
        return 64 + sum(map(len, command))

    def details(self, command: list[bytes]) -> dict[str, Any]:
        return {"command": b" ".join(command[:2]).decode("utf-8", "backslashreplace")}

    def execute(self, command: list[bytes]) -> Any:  # nothing here runs on a tame stack
        raise AssertionError("redis_kv commands never run on a tame stack")

    def finish(self, entry: Entry, result: Any, error: BaseException | None) -> list[bytes]:
        if error is not None:
            return [resp.error(f"ERR {type(error).__name__}: {error}")]
        return [result]

    def answer(self, command: list[bytes]) -> bytes | None:
        """The reply, if this shard can give it now: every command but those whose keys
        live on another shard (plain mode) and DBSIZE/FLUSHALL, which ask every shard."""
        name = command[0].upper()
        spec = COMMANDS.get(name)
        if spec is None:
            args = " ".join(f"'{a.decode(errors='replace')}'" for a in command[1:5])
            return resp.error(
                f"ERR unknown command '{command[0].decode(errors='replace')}', "
                f"with args beginning with: {args}")  # fmt: skip
        if (spec.arity > 0 and len(command) != spec.arity) or len(command) < -spec.arity:
            return resp.error(
                f"ERR wrong number of arguments for '{name.decode().lower()}' command")  # fmt: skip
        if not self.authenticated and "no-auth" not in spec.flags and name != b"QUIT":
            return resp.error("NOAUTH Authentication required.")
        kind = spec.kind
        if kind == "key":
            if self.single_shard:
                method, args = key_call(name, command, self.null)
                return getattr(self.keys, method)(*args)  # type: ignore[no-any-return]
            slot, owner = self._owner(command[1])
            if owner == self.service.shard_id:
                method, args = key_call(name, command, self.null)
                return getattr(self.keys, method)(*args)  # type: ignore[no-any-return]
            return self._moved(slot, owner) if self.cluster else None
        if kind == "local":
            return self._local(name, command)
        if kind == "multi":
            return self._many_keys_here(name, command)
        return None  # "all"

    def start(self, entry: Entry) -> None:
        command: list[bytes] = entry.request
        reply = self.answer(command)
        if reply is not None:
            self.complete(entry, [reply])
            return
        name = command[0].upper()
        kind = COMMANDS[name].kind
        if kind == "key":
            _, owner = self._owner(command[1])
            method, args = key_call(name, command, self.null)
            self._send(entry, owner, lambda f: self._sent_done(entry, f), method, *args)
        elif kind == "multi":
            self._many_keys(entry, name, command)
        else:
            self._every_shard(entry, name)

    # -- where commands run ------------------------------------------------------------

    def _owner(self, key: bytes) -> tuple[int, int]:
        shards = self.service.shards
        if shards == 1:
            return -1, 0  # every slot is this shard's (the slot is needed only for MOVED)
        slot = key_slot(key)
        return slot, shard_of_slot(slot, shards)

    def _moved(self, slot: int, owner: int) -> bytes:
        return b"-MOVED %d %s\r\n" % (slot, self.service.address(owner))

    def _send(
        self,
        entry: Entry,
        shard: int,
        done: Callable[[asyncio.Future[Any]], None],
        method: str,
        *args: Any,
    ) -> None:
        """Run a KeySpace method on the shard that owns the keys; ``done(future)`` after."""
        self.service.hops += 1
        self.wait_for(entry, STAGE_SENT.format(shard=shard))
        future = asyncio.ensure_future(shardio.submit_to(shard, keyspace_module.run, method, *args))
        future.add_done_callback(done)

    def _sent_done(self, entry: Entry, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.complete(entry, [resp.error("ERR the owning shard did not answer")])
        elif future.exception() is not None:
            self.complete(entry, self.finish(entry, None, future.exception()))
        else:
            self.complete(entry, [future.result()])

    def _many_keys_here(self, name: bytes, command: list[bytes]) -> bytes | None:
        """MGET/MSET/DEL/EXISTS when every key is this shard's (or a refusal: CROSSSLOT,
        MOVED); None when some key lives on another shard (plain mode)."""
        if name == b"MSET" and len(command) % 2 == 0:
            return resp.error("ERR wrong number of arguments for 'mset' command")
        keys = command[1::2] if name == b"MSET" else command[1:]
        node = self.service
        if node.shards > 1:
            slots = set()
            owners = set()
            for key in keys:
                slot, owner = self._owner(key)
                slots.add(slot)
                owners.add(owner)
            if self.cluster:
                if len(slots) > 1:
                    return resp.error("CROSSSLOT Keys in request don't hash to the same slot")
                if owner != node.shard_id:
                    return self._moved(slot, owner)
            elif owners != {node.shard_id}:
                return None
        space = node.keys
        if name == b"MGET":
            return resp.array(space.get_many(keys, self.null))
        if name == b"MSET":
            space.set_many(list(zip(command[1::2], command[2::2], strict=True)))
            return resp.OK
        if name == b"DEL":
            return resp.integer(space.delete_many(keys))
        return resp.integer(space.exists_many(keys))

    def _many_keys(self, entry: Entry, name: bytes, command: list[bytes]) -> None:
        """A multi-key command (plain mode) with keys on several shards: each shard's
        part where it lives, put back in key order."""
        step = 2 if name == b"MSET" else 1
        keys = command[1::step]
        owners: dict[int, list[int]] = {}  # shard -> positions of its keys
        for position, key in enumerate(keys):
            owners.setdefault(self._owner(key)[1], []).append(position)
        gather = _Gather(self, entry, name, len(keys), len(owners))
        for owner, positions in owners.items():
            if name == b"MSET":
                args: Any = [(command[1 + 2 * p], command[2 + 2 * p]) for p in positions]
                method = "set_many"
            else:
                args = [keys[p] for p in positions]
                method = {b"MGET": "get_many", b"DEL": "delete_many"}.get(name, "exists_many")
            extra = (self.null,) if name == b"MGET" else ()
            if owner == self.service.shard_id:
                gather.part(positions, getattr(self.service.keys, method)(args, *extra))
            else:
                done = functools.partial(gather.part_done, positions)
                self._send(entry, owner, done, method, args, *extra)

    def _every_shard(self, entry: Entry, name: bytes) -> None:
        method = "size" if name == b"DBSIZE" else "flush"
        future = asyncio.ensure_future(shardio.map_reduce(keyspace_module.run, _add, 0, method))
        self.wait_for(entry, "asking every shard")
        reply = resp.integer if name == b"DBSIZE" else (lambda _n: resp.OK)
        future.add_done_callback(
            lambda f: self.complete(
                entry,
                [reply(f.result())]
                if f.exception() is None
                else self.finish(entry, None, f.exception()),
            )
        )

    # -- connection and server commands --------------------------------------------------

    def _local(self, name: bytes, command: list[bytes]) -> bytes:
        args = command[1:]
        if name == b"PING":
            return resp.PONG if not args else resp.bulk(args[0]) if len(args) == 1 else resp.error(
                "ERR wrong number of arguments for 'ping' command")  # fmt: skip
        if name == b"ECHO":
            return resp.bulk(args[0])
        if name == b"QUIT":
            self.close_after_replies_soon()
            return resp.OK
        if name == b"CONFIG":  # (redis-benchmark asks for "save" and "appendonly")
            if args[0].upper() == b"GET" and len(args) == 2:
                value = CONFIG_PARAMETERS.get(args[1].lower())
                return resp.array([] if value is None else [resp.bulk(args[1]), resp.bulk(value)])
            return resp.error(f"ERR unknown subcommand '{args[0].decode(errors='replace')}'")
        if name == b"SELECT":
            return resp.OK if args[0] == b"0" else resp.error("ERR DB index is out of range")
        if name == b"AUTH":
            return self._auth(args[-1])
        if name == b"HELLO":
            return self._hello(args)
        if name == b"CLIENT":
            sub = args[0].upper()
            if sub == b"SETNAME" and len(args) == 2:
                self.name = args[1]
                return resp.OK
            if sub == b"GETNAME":
                return resp.bulk(self.name) if self.name else self.null
            if sub in (b"SETINFO", b"SETLIB"):
                return resp.OK
            if sub == b"ID":
                return resp.integer(id(self) & 0x7FFFFFFF)
            return resp.error(f"ERR unknown subcommand '{sub.decode(errors='replace')}'")
        if name == b"COMMAND":
            return self._command(args)
        if name == b"INFO":
            return resp.bulk(self._info().encode())
        return self._cluster(args)

    def close_after_replies_soon(self) -> None:
        assert self.loop is not None
        self.loop.call_soon(self.close_after_replies)

    def _auth(self, password: bytes) -> bytes:
        expected = self.service.config.password
        if expected is None:
            return resp.error(
                "ERR AUTH <password> called without any password configured for the default "
                "user. Are you sure your configuration is correct?"
            )
        if hmac.compare_digest(password, expected.encode()):
            self.authenticated = True
            return resp.OK
        return resp.error("WRONGPASS invalid username-password pair or user is disabled.")

    def _hello(self, args: list[bytes]) -> bytes:
        """HELLO [2|3] [AUTH user pass] [SETNAME name]. RESP3 costs nothing here: every
        reply this server sends is also valid RESP3, so only HELLO's own reply (a map)
        differs."""
        if args and args[0] not in (b"2", b"3"):
            return resp.error("NOPROTO unsupported protocol version")
        protocol = int(args[0]) if args else 2
        i = 1
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args):
                reply = self._auth(args[i + 2])
                if reply != resp.OK:
                    return reply
                i += 3
            elif option == b"SETNAME" and i + 1 < len(args):
                self.name = args[i + 1]
                i += 2
            else:
                return resp.error("ERR Syntax error in HELLO option")
        if not self.authenticated:
            return resp.error("NOAUTH HELLO must be called with the client already authenticated")
        fields = [
            (b"server", resp.bulk(b"redis")), (b"version", resp.bulk(b"7.0.0")),
            (b"proto", resp.integer(protocol)), (b"id", resp.integer(id(self) & 0x7FFFFFFF)),
            (b"mode", resp.bulk(b"cluster" if self.cluster else b"standalone")),
            (b"role", resp.bulk(b"master")), (b"modules", resp.array([])),
        ]  # fmt: skip
        parts = [part for key, value in fields for part in (resp.bulk(key), value)]
        self.null = resp.NULL3 if protocol == 3 else resp.NULL
        if protocol == 3:
            return b"%%%d\r\n" % len(fields) + b"".join(parts)
        return resp.array(parts)

    def _command(self, args: list[bytes]) -> bytes:
        sub = args[0].upper() if args else None
        if sub == b"COUNT":
            return resp.integer(len(COMMANDS))
        if sub == b"DOCS":
            return resp.array([])
        if sub == b"INFO":
            names = [a.upper() for a in args[1:]]
        elif sub is None:
            names = list(COMMANDS)
        else:
            return resp.error(f"ERR unknown subcommand '{sub.decode(errors='replace')}'")
        out = []
        for n in names:
            spec = COMMANDS.get(n)
            if spec is None:
                out.append(self.null)
                continue
            out.append(resp.array([
                resp.bulk(n.lower()), resp.integer(spec.arity),
                resp.array([resp.simple(f) for f in spec.flags]),
                resp.integer(spec.first_key), resp.integer(spec.last_key),
                resp.integer(spec.step),
            ]))  # fmt: skip
        return resp.array(out)

    def _info(self) -> str:
        node = self.service
        space = keyspace()
        lines = [
            "# Server", "redis_version:7.0.0", "redis_mode:cluster", f"process_id:{os.getpid()}",
            f"tcp_port:{node.config.shard_ports[node.shard_id]}", "",
            "# Clients", f"connected_clients:{node.stats.connections_open}", "",
            "# Stats", f"total_connections_received:{node.stats.connections_accepted}",
            f"total_commands_processed:{space.commands}", "",
            "# Cluster", "cluster_enabled:1", "",
            "# Keyspace", f"db0:keys={len(space.data)},expires={len(space.deadlines)},avg_ttl=0",
        ]  # fmt: skip
        return "\r\n".join(lines) + "\r\n"

    def _cluster(self, args: list[bytes]) -> bytes:
        node = self.service
        sub = args[0].upper()
        host = node.config.host.encode()
        if sub == b"KEYSLOT" and len(args) == 2:
            return resp.integer(key_slot(args[1]))
        if sub == b"MYID":
            return resp.bulk(node.node_ids[node.shard_id].encode())
        if sub == b"SLOTS":
            return resp.array([
                resp.array([
                    resp.integer(first), resp.integer(last),
                    resp.array([resp.bulk(host), resp.integer(node.config.shard_ports[s]),
                                resp.bulk(node.node_ids[s].encode())]),
                ])
                for s in range(node.shards)
                for first, last in [slot_range(s, node.shards)]
            ])  # fmt: skip
        if sub == b"SHARDS":
            return resp.array([
                resp.array([
                    resp.bulk(b"slots"),
                    resp.array([resp.integer(x) for x in slot_range(s, node.shards)]),
                    resp.bulk(b"nodes"),
                    resp.array([resp.array([
                        resp.bulk(b"id"), resp.bulk(node.node_ids[s].encode()),
                        resp.bulk(b"port"), resp.integer(node.config.shard_ports[s]),
                        resp.bulk(b"ip"), resp.bulk(host), resp.bulk(b"endpoint"),
                        resp.bulk(host), resp.bulk(b"role"), resp.bulk(b"master"),
                        resp.bulk(b"replication-offset"), resp.integer(0),
                        resp.bulk(b"health"), resp.bulk(b"online"),
                    ])]),
                ])
                for s in range(node.shards)
            ])  # fmt: skip
        if sub == b"NODES":
            lines = []
            for s in range(node.shards):
                first, last = slot_range(s, node.shards)
                port = node.config.shard_ports[s]
                me = ",myself" if s == node.shard_id else ""
                lines.append(
                    f"{node.node_ids[s]} {node.config.host}:{port}@{port + 10000} master{me} - "
                    f"0 0 {s + 1} connected {first}-{last}"
                )
            return resp.bulk(("\n".join(lines) + "\n").encode())
        if sub == b"INFO":
            text = (
                "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n"
                f"cluster_known_nodes:{node.shards}\r\ncluster_size:{node.shards}\r\n"
            )
            return resp.bulk(text.encode())
        return resp.error(f"ERR unknown subcommand '{sub.decode(errors='replace')}'")


class _Gather:
    """The parts of a multi-key command, from several shards, put back in key order."""

    def __init__(
        self, conn: RedisConnection, entry: Entry, name: bytes, keys: int, parts: int
    ) -> None:
        self.conn = conn
        self.entry = entry
        self.name = name
        self.values: list[bytes] = [b""] * keys
        self.count = 0
        self.missing = parts
        self.failed: BaseException | None = None

    def part(self, positions: list[int], result: Any) -> None:
        if self.name == b"MGET":
            for p, value in zip(positions, result, strict=True):
                self.values[p] = value
        elif self.name != b"MSET":
            self.count += result
        self.missing -= 1
        if not self.missing:
            self._done()

    def part_done(self, positions: list[int], future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed = future.exception() or asyncio.CancelledError()
            self.missing -= 1
            if not self.missing:
                self._done()
            return
        self.part(positions, future.result())

    def _done(self) -> None:
        if self.failed is not None:
            reply = self.conn.finish(self.entry, None, self.failed)
        elif self.name == b"MGET":
            reply = [resp.array(self.values)]
        elif self.name == b"MSET":
            reply = [resp.OK]
        else:
            reply = [resp.integer(self.count)]
        self.conn.complete(self.entry, reply)


def _add(a: int, b: int) -> int:
    return a + b


# -- shard-side entry points ----------------------------------------------------------

_NODE_KEY = "redis_kv.node"


async def start_shard(config: RedisConfig, node_ids: list[str]) -> int:
    """On every shard: start its Redis node (it stops with the shard)."""
    reactor = shardio.current_reactor()
    assert reactor is not None
    node = RedisNode(config)
    await node.start(node_ids)
    reactor.services[_NODE_KEY] = node
    return node.shard_id


def shard_counters() -> dict[str, int]:
    """This shard's counters: commands its keyspace ran, hops it sent, keys it holds."""
    node = shardio.current_reactor().services[_NODE_KEY]  # type: ignore[union-attr]
    return {"commands": keyspace().commands, "hops": node.hops, "keys": len(keyspace().data)}
