"""Builds the C extensions (the fabric's ring, the io_uring driver's ring, the OSD's frame
codec, the tame stacks' parking); all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shardio.fabric._ring",
            sources=["shardio/fabric/_ring.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
        Extension(
            "shardio.osd._codec",
            sources=["shardio/osd/_codec.c"],
            # the runtime zlib, not the development package's libz.so: see _codec.c
            extra_link_args=["-l:libz.so.1"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
        Extension(
            "shardio.io._uring",
            sources=["shardio/io/_uring.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
        Extension(
            "shardio.tame._parking",
            sources=["shardio/tame/_parking.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
    ]
)
