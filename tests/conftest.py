"""Shared test fixtures: leak checks on real processes, fds and shared memory.

The leak check is the one the pytest plugin gives users
(``shardio.testing.plugin``); the project's tests use it through the
``leak_check`` fixture below as well as through the plugin's fixtures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from shardio.testing.plugin import LeakCheck, create_process_singletons


@pytest.fixture(scope="session", autouse=True)
def _process_wide_singletons():
    """Create the once-per-process things before any leak baseline, so that they are
    not counted as left behind: multiprocessing's resource tracker (spawned processes
    start it: one helper per parent, gone with the parent) and libuv's signal pipe."""
    create_process_singletons("process")


@pytest.fixture
def leak_check():
    check = LeakCheck()
    yield check
    check.assert_clean()


@pytest.fixture(params=["process", "thread"])
def backend(request) -> str:
    return request.param


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]:
    """``run(main)``: run an async main on a fresh loop of each kind (asyncio's, uvloop's)."""

    def runner(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return uvloop.run(main()) if request.param == "uvloop" else asyncio.run(main())

    return runner
