"""The OSD's operations: what each request op does to an object store.

``apply_op`` is the one place that maps a request (op, name, offset, length,
payload) to calls of the unmodified blocking ``ObjectStore`` and its result
to a reply (status, payload, length field, flags). It is plain blocking
code: shards call it on tame stacks, the benchmark peers in threads and
greenlets.
"""

from __future__ import annotations

import errno
import logging

from .objectstore import ObjectStore, StoreError
from .protocol import (
    FLAG_MORE,
    OP_DELETE as _DELETE,
    OP_LIST as _LIST,
    OP_PUT as _PUT,
    OP_READ as _READ,
    OP_STAT as _STAT,
    OP_WRITE as _WRITE,
    Op,
    Status,
    pack_names,
    pack_stat,
)

__all__ = ["Result", "apply_op"]

log = logging.getLogger("shardio.osd.operations")

#: What an executed request gives back: (status, payload, reply length field, reply flags).
Result = tuple[int, bytes, int, int]


def apply_op(
    store: ObjectStore,
    op: int,
    name: bytes,
    offset: int,
    length: int,
    payload: bytes,
    max_list: int,
) -> Result:
    """One request against a store, as plain blocking code; failures become errno statuses.

    Shards run it on a tame stack (the messenger's ``OSDConnection.run``, and
    ``ShardNode.run_op`` for requests from other shards); the thread-pool and
    gevent baselines in ``bench/peers`` run the very same function.
    """
    try:
        if op == _READ:
            return 0, store.read(name, offset, length if length else -1), 0, 0
        if op == _STAT:
            st = store.stat(name)
            return 0, pack_stat(st.size, st.version), 0, 0
        if op == _PUT:
            return 0, b"", store.put(name, payload).size, 0
        if op == _WRITE:
            return 0, b"", store.write(name, payload, offset).size, 0
        if op == _DELETE:
            store.delete(name)
            return 0, b"", 0, 0
        if op == _LIST:
            limit = length if 0 < length < max_list else max_list
            names = store.list(offset, start_after=payload or None, limit=limit + 1)
            more = len(names) > limit
            del names[limit:]
            return 0, pack_names(names), 0, FLAG_MORE if more else 0
        return Status.EOPNOTSUPP, b"", 0, 0
    except StoreError as exc:
        return exc.errno, b"", 0, 0
    except OSError as exc:
        log.error("%s of %r failed: %s", Op(op).name, name, exc)
        return exc.errno or errno.EIO, b"", 0, 0
    except Exception:  # a bug must cost one request, not the shard
        log.exception("%s of %r failed", Op(op).name, name)
        return Status.EIO, b"", 0, 0
