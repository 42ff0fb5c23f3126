"""docs/reliability.md is the catalogue of faults and what Headwater does about each; every row
names the test that proves it. These tests keep the two in step: a renamed or deleted test
fails here, and so does a test in tests/faults/ that the catalogue does not mention."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support.source import parse

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _references() -> list[tuple[str, str]]:
    return REFERENCE.findall(CATALOGUE.read_text())


def _tests_in(path: Path) -> set[str]:
    tree = parse(path)
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_catalogue_names_exists() -> None:
    references = _references()
    assert len(references) > 40, "the catalogue lost its rows"
    missing = [
        f"{file}::{name}"
        for file, name in references
        if not (ROOT / file).is_file() or name not in _tests_in(ROOT / file)
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_fault_test_is_in_the_catalogue() -> None:
    named = set(_references())
    unlisted = [
        f"{path.relative_to(ROOT)}::{name}"
        for path in sorted((ROOT / "tests" / "faults").glob("test_*.py"))
        if path.name != Path(__file__).name
        for name in sorted(_tests_in(path))
        if (str(path.relative_to(ROOT)), name) not in named
    ]
    assert not unlisted, f"fault tests missing from docs/reliability.md: {unlisted}"
