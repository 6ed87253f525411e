"""Per-reactor I/O drivers.

``shardio.io.uring``: file I/O for tame stacks through io_uring (pyuring),
with a thread-pool fallback. The driver of the running loop is
``shardio.tame.stacks.runtime().uring``.
"""
