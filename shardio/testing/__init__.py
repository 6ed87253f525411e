"""Testing support: one virtual clock across shards, message interception, a pytest plugin.

* :mod:`shardio.testing.clock` -- :class:`Clock` (pause, advance, settle,
  resume) over the :class:`VirtualTime` that :func:`virtual_group` shards run on;
* :mod:`shardio.testing.intercept` -- ``with intercept(group) as net:`` to drop,
  delay, expect and inject the calls shards make to each other;
* :mod:`shardio.testing.crash_env` -- :class:`CrashSimulatingEnv`, an Env over the
  real one whose simulated crash keeps only what fsync covered, for crash tests
  of storage code (the object store's, or your own);
* :mod:`shardio.testing.plugin` -- the pytest plugin: fixtures ``shard_group``,
  ``shardio_run``, ``shardio_clock``, with leak checks.
"""

from .clock import Clock, ClockError, VirtualTime, VirtualTimeLoop, virtual_group
from .crash_env import CrashSimulatingEnv, SimulatedCrash
from .intercept import Match, Message, Net, NoMatchingMessage, intercept

__all__ = [
    "Clock",
    "ClockError",
    "CrashSimulatingEnv",
    "Match",
    "Message",
    "Net",
    "NoMatchingMessage",
    "SimulatedCrash",
    "VirtualTime",
    "VirtualTimeLoop",
    "intercept",
    "virtual_group",
]
