"""The docs run: every code block in README.md and docs/ is a program this test runs.

A block is one of:

* a ```python block: a complete program, run as a script in a fresh
  directory; it must exit with status 0.  A block right after it marked
  ``<!-- output -->`` is what the program prints, checked line by line
  (``...`` on a line of its own stands for any number of lines);
* a ```python block marked ``<!-- pytest -->``: a complete test module, run
  with pytest, which must pass;
* a block marked ``<!-- fragment -->`` (the line right before the fence): a
  piece shown for reading, not run.

Anything else fails: make it a program or mark it as a fragment.  A
fragment that is a layout tree (``<!-- layout -->`` on the line above the
fragment mark) must name only files that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(fragment|output|pytest|layout)\s*-->\s*$")
TIMEOUT = 180


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    marker: str | None
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{index + 1}: a code block that is never closed")
        marked = MARKER.match(lines[index - 1]) if index else None
        marker = marked.group(1) if marked else None
        if (
            marker == "fragment"
            and index > 1
            and MARKER.match(lines[index - 2])
            and MARKER.match(lines[index - 2]).group(1) == "layout"
        ):
            marker = "layout"  # a fragment that is also a layout tree, checked below
        found.append(
            Block(path, index + 1, language, marker, "\n".join(lines[index + 1 : end]) + "\n")
        )
        index = end + 1
    return found


ALL = [block for path in DOCS for block in blocks_of(path)]
PROGRAMS = [block for block in ALL if block.language == "python" and block.marker is None]
TEST_MODULES = [block for block in ALL if block.marker == "pytest"]
LAYOUTS = [block for block in ALL if block.marker == "layout"]


def output_of(block: Block) -> Block | None:
    """The ``<!-- output -->`` block that follows ``block`` in its file, if any."""
    siblings = [other for other in ALL if other.path == block.path]
    following = siblings[siblings.index(block) + 1 :]
    if following and following[0].marker == "output":
        return following[0]
    return None


def test_every_block_is_a_program_or_marked_a_fragment():
    unclassified = []
    for block in ALL:
        if block.marker in ("fragment", "layout", "pytest") or (
            block.marker is None and block.language == "python"
        ):
            continue
        if block.marker == "output":
            previous = [other for other in ALL if other.path == block.path]
            before = previous[previous.index(block) - 1]
            if before.marker is None and before.language == "python" and output_of(before):
                continue
        unclassified.append(f"{block.name} (```{block.language})")
    assert not unclassified, (
        "these code blocks are neither a python program nor marked <!-- fragment --> "
        "(an <!-- output --> block must follow a program): " + ", ".join(unclassified)
    )


def run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    environment.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        arguments,
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; a line ``...`` stands for any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[start:]) for start in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


@pytest.mark.parametrize("block", PROGRAMS, ids=[block.name for block in PROGRAMS])
def test_the_program_runs(block, tmp_path):
    script = tmp_path / "program.py"
    script.write_text(block.text)
    result = run([sys.executable, str(script)], tmp_path)
    assert result.returncode == 0, (
        f"{block.name} exited with {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    expected = output_of(block)
    if expected is not None:
        printed = [line.rstrip() for line in result.stdout.splitlines()]
        shown = [line.rstrip() for line in expected.text.splitlines()]
        assert matches(shown, printed), (
            f"{block.name} printed\n{result.stdout}\nbut the doc shows\n{expected.text}"
        )


@pytest.mark.parametrize("block", TEST_MODULES, ids=[block.name for block in TEST_MODULES])
def test_the_test_module_passes(block, tmp_path):
    module = tmp_path / "test_from_the_docs.py"
    module.write_text(block.text)
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)], tmp_path
    )
    assert result.returncode == 0, f"{block.name}\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout


PATH_LIKE = re.compile(r"[\w.-]+/|[\w-]*\.[\w.]+")


@pytest.mark.parametrize("block", LAYOUTS, ids=[block.name for block in LAYOUTS])
def test_the_layout_names_files_that_exist(block):
    """Each name in a layout tree exists, under the directory it is indented beneath.

    A line is names (``a.py, b.py`` or ``examples/  bench/``) then, after two
    spaces, a description; a line that does not start with a name continues a
    description.
    """
    missing = []
    parents: list[tuple[int, str]] = []  # (indent, directory) of the enclosing names
    for line in block.text.splitlines():
        indent = len(line) - len(line.lstrip())
        columns = re.split(r"\s{2,}", line.strip())
        names = [name for name in columns[0].split(", ") if name]
        if not names or not all(PATH_LIKE.fullmatch(name) for name in names):
            continue
        if all(PATH_LIKE.fullmatch(column) for column in columns):
            names = [name for column in columns for name in column.split(", ")]
        parents = [(depth, name) for depth, name in parents if depth < indent]
        base = ROOT.joinpath(*(name for _, name in parents))
        missing += [
            str((base / name).relative_to(ROOT))
            for name in names
            if not (base / name.rstrip("/")).exists()
        ]
        if len(names) == 1 and names[0].endswith("/"):
            parents.append((indent, names[0].rstrip("/")))
    assert not missing, f"{block.name} names what does not exist: {missing}"
