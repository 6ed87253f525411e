"""Tame stacks: run unmodified blocking code inside a shard's reactor.

The "tame reactor" of the ceph-devel thread (shared/seeds/), with greenlets
as the user-space stacks and io_uring for file I/O::

    from shardio import tame

    result = await tame.call(func, *args, **kwargs)   # func runs on a pooled greenlet stack
    value = tame.wait(awaitable)                      # on a tame stack: wait without blocking
    tame.on_tame_stack()                              # -> bool
    env = tame.env()                                  # TameEnv on a tame stack, PosixEnv elsewhere
    with tame.patched(module): ...                    # scoped taming of an unmodified module
    tame.patch(module); tame.unpatch(module)
    result = await tame.alien(func, *args)            # blocking-in-C code on alien threads

How it works. ``tame.call`` switches into a pooled greenlet of the running
loop (bounded pool, ``tame.configure(max_stacks=N)``, FIFO when exhausted).
Every blocking call the code makes through the tame Env parks that greenlet
and switches back to the loop; the completion (a timer, an io_uring CQE, a
socket becoming ready, a lock handed over) switches back in. An exception
reaches the awaiting caller with its traceback; cancelling the caller raises
``asyncio.CancelledError`` inside the blocking call, so ``finally`` blocks
run, and the stack returns to the pool only once it has unwound
(``shardio.tame.stacks``).

The Env (``shardio.tame.env``) is the interface storage code is written
against: files (pread/pwrite/read/write/fsync, O_DIRECT), filesystem
helpers, sleep/monotonic, Lock/RLock/Condition/Event/Semaphore/Queue,
start_thread, sockets. ``PosixEnv`` implements it with plain blocking calls,
``TameEnv`` by yielding to the reactor; the same code runs on both.

Which blocking calls yield, and which do not
--------------------------------------------

Yield to the reactor (on a tame stack):

* every ``TameEnv`` operation (``tame.env()`` on a tame stack): file reads
  (preadv2 RWF_NOWAIT first, io_uring when not cached), writes and fsync
  (io_uring), sleep (loop timer), waits on its locks/conditions/events/
  semaphores/queues, thread joins, socket connect/accept/recv/send, and
  getaddrinfo (loop.getaddrinfo);
* ``tame.wait(awaitable)``;
* in a module patched with ``tame.patch``/``tame.patched``, that module's
  own references to: ``open`` and ``io.open`` (regular files), ``os.read``,
  ``os.write``, ``os.pread``, ``os.pwrite``, ``os.fsync``, ``os.fdatasync``,
  ``time.sleep``, ``threading.Lock/RLock/Condition/Event/Semaphore/
  BoundedSemaphore/Thread``, ``queue.Queue``, ``socket.socket``,
  ``socket.create_connection``, ``socket.getaddrinfo``, ``select.select``
  (see ``shardio.tame.patch`` for exactly what is rewritten). Patching is
  per module namespace and scoped; the same names still resolve to the
  originals when the module runs anywhere other than a tame stack.

The quota: once the loop turn has spent ``tame.DEFAULT_QUOTA`` (0.5 ms;
``tame.configure(quota=...)``, ``ShardGroup(tame_quota_ms=...)``) on tame
work, a stack also yields at its next file, lock, event, semaphore, queue,
thread-join or ``tame.wait`` call that could complete at once
(``tame.checkpoint()``); docs/tame.md lists them. ``tame.dump_stacks()``
shows what every stack of the loop waits on.

Do NOT yield (they block the whole reactor thread while they wait):

* a real ``threading.Lock`` (or Condition, Event, ``queue.Queue``...)
  created off a tame stack, e.g. at import time, or in an unpatched module:
  if another tame stack of the same reactor holds it, this is a deadlock,
  since the holder cannot run until the reactor does;
* ``time.sleep``, ``os.read``, ``open(...).read()`` and the like called from
  modules that were not patched;
* ``threading.local`` (shared by all stacks of a reactor thread),
  ``queue.LifoQueue/PriorityQueue/SimpleQueue``, ``select.epoll``,
  ``os.readv/preadv/writev``, subprocess;
* anything blocking inside C code (sqlite3, lmdb): run it with
  ``tame.alien``.

Tame synchronization objects belong to the reactor whose stack created them:
used from another thread they raise ``WrongThreadError``; a blocking wait
from outside a tame stack of that reactor (e.g. the reactor's own
coroutines) raises ``NotOnTameStack`` instead of freezing the loop.
Blocking that is not intercepted shows up as a reactor stall, reported by
the stall detector with the reactor thread's Python stack.
"""

from __future__ import annotations

from . import servers
from .alien import AlienPool, alien
from .env import DIRECT_ALIGN, Env, EnvFile, ThreadHandle
from .files import TameFile, tame_open
from .patch import is_patched, patch, patched, unpatch
from .posix_env import PosixEnv, posix_env
from .sockets import TameSocket
from .stack_dump import StackDump, dump_stacks, format_dumps
from .stacks import (
    DEFAULT_MAX_STACKS,
    DEFAULT_QUOTA,
    NotOnTameStack,
    StackKilled,
    TameConfigError,
    TameError,
    call,
    checkpoint,
    configure,
    current_runtime,
    on_tame_stack,
    reset_accounting,
    start,
    stats,
    turn_spent,
    wait,
    warm_up,
)
from .tame_env import TameEnv

__all__ = [
    "DEFAULT_MAX_STACKS",
    "DEFAULT_QUOTA",
    "DIRECT_ALIGN",
    "AlienPool",
    "Env",
    "EnvFile",
    "NotOnTameStack",
    "PosixEnv",
    "StackDump",
    "StackKilled",
    "TameConfigError",
    "TameEnv",
    "TameError",
    "TameFile",
    "TameSocket",
    "ThreadHandle",
    "alien",
    "call",
    "checkpoint",
    "configure",
    "dump_stacks",
    "env",
    "format_dumps",
    "is_patched",
    "on_tame_stack",
    "patch",
    "patched",
    "posix_env",
    "reset_accounting",
    "servers",
    "start",
    "stats",
    "tame_open",
    "turn_spent",
    "unpatch",
    "wait",
    "warm_up",
]


def env() -> Env:
    """The Env for the caller: the TameEnv of its reactor on a tame stack, PosixEnv elsewhere."""
    rt = current_runtime()
    return posix_env if rt is None else rt.env  # type: ignore[no-any-return]
