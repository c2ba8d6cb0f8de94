"""ARCHITECTURE.md's "Where things live" names every file of the source tree,
and only files that exist, so a newcomer can trust it as a map."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The parts of the repository the map must cover completely.
MAPPED = ("crates", "python", "tests", "bench", "examples")
#: A name in the map: a relative path, a directory ending in "/".
NAME = re.compile(r"[\w.-]+(/[\w.-]+)*/?")


def tree_block(text: str) -> list[str]:
    """The lines of the first code block after the "Where things live" heading."""
    section = text.split("## Where things live", 1)[1]
    return section.split("```", 2)[1].splitlines()[1:]


def named_paths(lines: list[str]) -> set[str]:
    """Every path the tree names. A line is ``names  description``: names are
    separated by ", " and end at the first run of two spaces. A name is
    relative to the nearest directory (a name ending in "/") above it with
    less indentation; a line whose start is not names (a description carried
    over) names nothing."""
    paths: set[str] = set()
    parents: list[tuple[int, str]] = []
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        names = head.split(", ")
        if not all(NAME.fullmatch(n) and ("." in n or n.endswith("/")) for n in names):
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        base = parents[-1][1] if parents else ""
        for name in names:
            paths.add(base + name)
            if name.endswith("/"):
                parents.append((indent, base + name))
    return paths


def tracked_files() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of warden (the map is checked against tracked files)")
    out = subprocess.run(
        ["git", "ls-files", "--", *MAPPED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {line for line in out.splitlines() if line}


def test_the_parser_reads_nested_names_and_skips_carried_over_descriptions():
    lines = [
        "crates/                 the crates",
        "  a/                    one crate",
        "    src/lib.rs, x.rs    its files",
        "                        and more words about them",
        "  b.toml                a file of crates/",
        "top.py                  a file at the top",
    ]
    assert named_paths(lines) == {
        "crates/",
        "crates/a/",
        "crates/a/src/lib.rs",
        "crates/a/x.rs",
        "crates/b.toml",
        "top.py",
    }


def test_every_tracked_source_file_is_named_in_the_architecture_map():
    named = named_paths(tree_block((ROOT / "ARCHITECTURE.md").read_text()))
    missing = sorted(tracked_files() - named)
    assert not missing, f"ARCHITECTURE.md does not name: {missing}"


def test_every_file_the_architecture_map_names_exists():
    named = named_paths(tree_block((ROOT / "ARCHITECTURE.md").read_text()))
    absent = sorted(p for p in named if not (ROOT / p).exists())
    assert not absent, f"ARCHITECTURE.md names what does not exist: {absent}"
