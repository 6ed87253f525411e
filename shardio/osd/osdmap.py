"""The OSD map: where every object lives.

An object ``name`` in pool ``p`` belongs to placement group
``pg = object_hash(name) % pools[p].pg_num``, and each pg is served by one
shard (``pg -> shard`` table per pool). Clients fetch the map (GET_MAP) and
send each request straight to the owning shard's endpoint; a shard that
receives a request for another shard's pg forwards it with ``submit_to``.

``object_hash`` is CRC-32 of the name's bytes (UTF-8 for ``str``): stable
across processes, machines and Python versions, unlike the salted built-in
``hash()``, and cheap (one C call). For sequential names (``obj-000123``) it
spreads pgs more evenly than a random hash would (it is a linear code).

Maps are immutable values: every change makes a new map with ``epoch + 1``,
so a client can tell a stale map from a newer one. ``encode``/``decode`` give
the GET_MAP payload; ``decode`` checks every count and length against the
bytes present before allocating anything, and the whole encoding carries its
own CRC-32.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shardio.errors import ShardioError

__all__ = [
    "MAX_PG_NUM",
    "MAX_POOLS",
    "MAX_SHARDS",
    "MapDecodeError",
    "OSDMap",
    "OSDMapError",
    "Pool",
    "UnknownPool",
    "object_hash",
]

MAX_SHARDS = 4096
MAX_PG_NUM = 65536
MAX_POOLS = 1024
MAX_POOL_NAME = 255
MAX_HOST = 255

_MAGIC = 0x50414D4F  # b"OMAP" little-endian
_VERSION = 1
_HEAD = struct.Struct("<IBxxxQIII")  # magic, version, epoch, shard_count, npools, naddrs
_POOL = struct.Struct("<IIH")  # id, pg_num, name_len
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

_crc32 = zlib.crc32


class OSDMapError(ShardioError, ValueError):
    """An invalid map, or a request the map cannot answer."""


class UnknownPool(OSDMapError, KeyError):
    """The pool id is not in this map."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown pool"


class MapDecodeError(OSDMapError):
    """A GET_MAP payload that is not a valid encoded map (corrupt, truncated, oversized)."""


def object_hash(name: str | bytes) -> int:
    """The stable 32-bit hash that places an object: CRC-32 of its name's bytes."""
    return _crc32(name.encode() if isinstance(name, str) else name)


@dataclass(frozen=True)
class Pool:
    """A pool: a namespace of objects split into ``pg_num`` placement groups."""

    id: int
    name: str
    pg_num: int


class OSDMap:
    """An immutable placement map: pools, their pg -> shard tables, endpoints, an epoch."""

    __slots__ = ("_fast", "addrs", "epoch", "pg_shards", "pools", "shard_count")

    epoch: int
    shard_count: int
    pools: Mapping[int, Pool]
    pg_shards: Mapping[int, tuple[int, ...]]
    addrs: tuple[tuple[str, int], ...]

    def __init__(
        self,
        epoch: int,
        shard_count: int,
        pools: Iterable[Pool],
        pg_shards: Mapping[int, Sequence[int]],
        addrs: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Build and validate a map. ``addrs[s]`` is shard s's (host, port), or empty."""
        if not 1 <= shard_count <= MAX_SHARDS:
            raise OSDMapError(f"shard_count {shard_count} out of range 1..{MAX_SHARDS}")
        if not 0 <= epoch < 1 << 64:
            raise OSDMapError(f"epoch {epoch} out of range")
        pool_list = list(pools)
        if len(pool_list) > MAX_POOLS:
            raise OSDMapError(f"{len(pool_list)} pools exceed the limit of {MAX_POOLS}")
        by_id: dict[int, Pool] = {}
        tables: dict[int, tuple[int, ...]] = {}
        for pool in pool_list:
            if pool.id in by_id:
                raise OSDMapError(f"duplicate pool id {pool.id}")
            if not 0 <= pool.id < 1 << 32:
                raise OSDMapError(f"pool id {pool.id} out of range")
            if not 1 <= pool.pg_num <= MAX_PG_NUM:
                raise OSDMapError(
                    f"pool {pool.id}: pg_num {pool.pg_num} out of range 1..{MAX_PG_NUM}"
                )
            if len(pool.name.encode()) > MAX_POOL_NAME:
                raise OSDMapError(f"pool {pool.id}: name longer than {MAX_POOL_NAME} bytes")
            table = tuple(pg_shards.get(pool.id, ()))
            if len(table) != pool.pg_num:
                raise OSDMapError(
                    f"pool {pool.id}: pg table has {len(table)} entries, pg_num is {pool.pg_num}"
                )
            for pg, shard in enumerate(table):
                if not 0 <= shard < shard_count:
                    raise OSDMapError(
                        f"pool {pool.id} pg {pg}: shard {shard} out of range 0..{shard_count - 1}"
                    )
            by_id[pool.id] = pool
            tables[pool.id] = table
        addr_list = tuple((str(h), int(port)) for h, port in addrs)
        if addr_list and len(addr_list) != shard_count:
            raise OSDMapError(f"{len(addr_list)} addresses for {shard_count} shards")
        for host, port in addr_list:
            if not 0 <= port < 65536 or len(host.encode()) > MAX_HOST:
                raise OSDMapError(f"bad shard address {(host, port)!r}")
        self.epoch = epoch
        self.shard_count = shard_count
        self.pools = by_id
        self.pg_shards = tables
        self.addrs = addr_list
        # pool id -> (pg_num, table): one dict lookup on the hot path
        self._fast = {pid: (by_id[pid].pg_num, tables[pid]) for pid in by_id}

    # -- construction ------------------------------------------------------

    @classmethod
    def build(
        cls,
        shard_count: int,
        *,
        pg_num: int = 64,
        pools: Iterable[Pool] | None = None,
        addrs: Sequence[tuple[str, int]] = (),
        epoch: int = 1,
    ) -> OSDMap:
        """A map with the pgs of each pool spread round-robin over the shards.

        Without ``pools``, one pool: id 0, "data", ``pg_num`` pgs.
        """
        if not 1 <= shard_count <= MAX_SHARDS:
            raise OSDMapError(f"shard_count {shard_count} out of range 1..{MAX_SHARDS}")
        pool_list = list(pools) if pools is not None else [Pool(0, "data", pg_num)]
        tables = {p.id: [(pg + p.id) % shard_count for pg in range(p.pg_num)] for p in pool_list}
        return cls(epoch, shard_count, pool_list, tables, addrs)

    def with_pg_shard(self, pool: int, pg: int, shard: int) -> OSDMap:
        """A new map (epoch + 1) in which ``pg`` of ``pool`` lives on ``shard``."""
        table = list(self._table(pool))
        if not 0 <= pg < len(table):
            raise OSDMapError(f"pool {pool}: pg {pg} out of range 0..{len(table) - 1}")
        table[pg] = shard
        tables: dict[int, Sequence[int]] = dict(self.pg_shards)
        tables[pool] = table
        return OSDMap(self.epoch + 1, self.shard_count, self.pools.values(), tables, self.addrs)

    def with_addrs(self, addrs: Sequence[tuple[str, int]]) -> OSDMap:
        """A new map (epoch + 1) with the shards' endpoints set."""
        return OSDMap(self.epoch + 1, self.shard_count, self.pools.values(), self.pg_shards, addrs)

    # -- placement (hot path) ------------------------------------------------

    def _table(self, pool: int) -> tuple[int, ...]:
        try:
            return self.pg_shards[pool]
        except KeyError:
            raise UnknownPool(f"pool {pool} is not in the osdmap (epoch {self.epoch})") from None

    def pg_for(self, name: str | bytes, pool: int = 0) -> int:
        """The placement group of an object."""
        try:
            pg_num = self._fast[pool][0]
        except KeyError:
            raise UnknownPool(f"pool {pool} is not in the osdmap (epoch {self.epoch})") from None
        return _crc32(name.encode() if isinstance(name, str) else name) % pg_num

    def shard_for(self, name: str | bytes, pool: int = 0) -> int:
        """The shard that serves an object."""
        try:
            pg_num, table = self._fast[pool]
        except KeyError:
            raise UnknownPool(f"pool {pool} is not in the osdmap (epoch {self.epoch})") from None
        return table[_crc32(name.encode() if isinstance(name, str) else name) % pg_num]

    def locate(self, name: str | bytes, pool: int = 0) -> tuple[int, int]:
        """(pg, shard) of an object."""
        try:
            pg_num, table = self._fast[pool]
        except KeyError:
            raise UnknownPool(f"pool {pool} is not in the osdmap (epoch {self.epoch})") from None
        pg = _crc32(name.encode() if isinstance(name, str) else name) % pg_num
        return pg, table[pg]

    def shard_of_pg(self, pg: int, pool: int = 0) -> int:
        """The shard that serves a placement group."""
        table = self._table(pool)
        if not 0 <= pg < len(table):
            raise OSDMapError(f"pool {pool}: pg {pg} out of range 0..{len(table) - 1}")
        return table[pg]

    def pgs_of_shard(self, shard: int, pool: int = 0) -> list[int]:
        """The placement groups of ``pool`` that ``shard`` serves."""
        return [pg for pg, s in enumerate(self._table(pool)) if s == shard]

    def addr_of(self, shard: int) -> tuple[str, int]:
        """Shard's (host, port) endpoint; OSDMapError if the map carries no addresses."""
        if not self.addrs:
            raise OSDMapError(f"osdmap epoch {self.epoch} carries no shard addresses")
        return self.addrs[shard]

    # -- encoding ----------------------------------------------------------

    def encode(self) -> bytes:
        """The GET_MAP payload: a self-checking binary encoding of the map."""
        parts = [
            _HEAD.pack(
                _MAGIC, _VERSION, self.epoch, self.shard_count, len(self.pools), len(self.addrs)
            )
        ]
        for pid in sorted(self.pools):
            pool = self.pools[pid]
            name = pool.name.encode()
            parts.append(_POOL.pack(pool.id, pool.pg_num, len(name)))
            parts.append(name)
            parts.append(struct.pack(f"<{pool.pg_num}H", *self.pg_shards[pid]))
        for host, port in self.addrs:
            h = host.encode()
            parts.append(_U16.pack(len(h)))
            parts.append(h)
            parts.append(_U16.pack(port))
        body = b"".join(parts)
        return body + _U32.pack(_crc32(body))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> OSDMap:
        """Parse ``encode()``'s output; MapDecodeError on anything else."""
        mv = memoryview(data).cast("B")
        end = len(mv) - 4
        if end < _HEAD.size:
            raise MapDecodeError(f"osdmap payload of {len(mv)} bytes is too short")
        if _crc32(mv[:end]) != _U32.unpack_from(mv, end)[0]:
            raise MapDecodeError("osdmap checksum mismatch")
        magic, version, epoch, shard_count, npools, naddrs = _HEAD.unpack_from(mv, 0)
        if magic != _MAGIC:
            raise MapDecodeError("not an osdmap (bad magic)")
        if version != _VERSION:
            raise MapDecodeError(f"osdmap encoding version {version} is not supported")
        if not 1 <= shard_count <= MAX_SHARDS or npools > MAX_POOLS or naddrs > MAX_SHARDS:
            raise MapDecodeError(
                f"osdmap counts out of range: {shard_count} shards, {npools} pools, "
                f"{naddrs} addresses"
            )
        pos = _HEAD.size

        def need(n: int, what: str) -> None:
            if pos + n > end:
                raise MapDecodeError(f"osdmap truncated in {what}")

        pools: list[Pool] = []
        tables: dict[int, tuple[int, ...]] = {}
        for _ in range(npools):
            need(_POOL.size, "a pool header")
            pid, pg_num, nlen = _POOL.unpack_from(mv, pos)
            pos += _POOL.size
            if not 1 <= pg_num <= MAX_PG_NUM or nlen > MAX_POOL_NAME:
                raise MapDecodeError(f"pool {pid}: pg_num {pg_num} or name length {nlen} invalid")
            need(nlen + 2 * pg_num, f"pool {pid}")
            try:
                name = bytes(mv[pos : pos + nlen]).decode()
            except UnicodeDecodeError:
                raise MapDecodeError(f"pool {pid}: name is not UTF-8") from None
            pos += nlen
            tables[pid] = struct.unpack_from(f"<{pg_num}H", mv, pos)
            pos += 2 * pg_num
            pools.append(Pool(pid, name, pg_num))
        addrs: list[tuple[str, int]] = []
        for _ in range(naddrs):
            need(2, "an address")
            (hlen,) = _U16.unpack_from(mv, pos)
            pos += 2
            need(hlen + 2, "an address")
            try:
                host = bytes(mv[pos : pos + hlen]).decode()
            except UnicodeDecodeError:
                raise MapDecodeError("shard address host is not UTF-8") from None
            pos += hlen
            (port,) = _U16.unpack_from(mv, pos)
            pos += 2
            addrs.append((host, port))
        if pos != end:
            raise MapDecodeError(f"osdmap has {end - pos} trailing bytes")
        try:
            return cls(epoch, shard_count, pools, tables, addrs)
        except MapDecodeError:
            raise
        except OSDMapError as exc:
            raise MapDecodeError(f"invalid osdmap: {exc}") from None

    # -- value semantics ------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OSDMap):
            return NotImplemented
        return (
            self.epoch == other.epoch
            and self.shard_count == other.shard_count
            and self.pools == other.pools
            and self.pg_shards == other.pg_shards
            and self.addrs == other.addrs
        )

    def __hash__(self) -> int:
        return hash((self.epoch, self.shard_count, tuple(sorted(self.pg_shards.items()))))

    def __reduce__(self) -> tuple[object, ...]:
        return (
            OSDMap,
            (self.epoch, self.shard_count, tuple(self.pools.values()), self.pg_shards, self.addrs),
        )

    def __repr__(self) -> str:
        pools = ", ".join(f"{p.id}:{p.name}/{p.pg_num}" for p in self.pools.values())
        return f"<OSDMap epoch={self.epoch} shards={self.shard_count} pools=[{pools}]>"
