"""Builds the ring's C extension; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shardio.fabric._ring",
            sources=["shardio/fabric/_ring.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        )
    ]
)
