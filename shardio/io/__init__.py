"""Per-reactor I/O drivers.

``shardio.io.uring``: file I/O for tame stacks through io_uring (the ring is
``shardio.io._uring``, a C extension on the kernel's interface), with a
thread-pool fallback. The driver of the running loop is
``shardio.tame.stacks.runtime().uring``.
"""
