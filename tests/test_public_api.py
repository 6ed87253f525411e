"""The public API's shape: no module shadowing a function, subsystems as attributes,
every exception reachable from shardio.errors."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import subprocess
import sys
import types

import shardio


def test_run_and_the_call_functions_are_functions_not_modules():
    assert isinstance(shardio.run, types.FunctionType)
    assert isinstance(shardio.submit_to, types.FunctionType)
    for shadowing in ("shardio.run", "shardio.submit", "shardio.submit_to"):
        assert importlib.util.find_spec(shadowing) is None, shadowing
    assert shardio.run.__module__ == "shardio.app"
    assert shardio.submit_to.__module__ == "shardio.calls"


def test_subsystems_are_attributes_of_a_freshly_imported_shardio():
    code = (
        "import sys, shardio\n"
        "assert 'shardio.tame' not in sys.modules  # imported on first use only\n"
        "print(shardio.tame.call.__name__, shardio.metrics.collect.__name__,\n"
        "      shardio.testing.Clock.__name__, shardio.osd.__name__, shardio.io.__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["call", "collect", "Clock", "shardio.osd", "shardio.io"]


def _exception_classes() -> list[type]:
    found = {}
    for module_info in pkgutil.walk_packages(shardio.__path__, "shardio."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return list(found.values())


def test_every_exception_is_a_shardio_error_reachable_from_shardio_errors():
    classes = _exception_classes()
    assert len(classes) > 20
    for cls in classes:
        assert issubclass(cls, shardio.ShardioError), cls
        if cls.__module__.startswith("shardio.osd."):
            continue  # the OSD's errors are documented in its modules (docs/osd.md)
        assert getattr(shardio.errors, cls.__name__) is cls, cls
        assert cls.__name__ in dir(shardio.errors)
