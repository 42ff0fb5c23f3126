"""No test helper is defined twice: a top-level function or class of ``tests/`` whose name does
not start with ``test_`` or ``Test`` (a helper, a fixture, a model) is defined in one file, and
the others import it (shared helpers live in ``tests/support/``, shared fixtures in a
``conftest.py``). A name defined in two files fails, naming them: make it one helper, or give
the two different things different names.

One list allows a name in several files, each entry for a reason: :data:`OVERRIDES`, a
fixture a test file defines again on purpose, overriding a conftest's. The test fails while an
entry allows what is no longer there.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from support.source import parse

TESTS = Path(__file__).resolve().parent

OVERRIDES: dict[str, str] = {}
"""Fixture name -> why a test file overrides the conftest fixture of that name."""


def definitions(root: Path) -> dict[str, list[str]]:
    """Helper name -> the files under ``root`` that define it at the top level (paths relative
    to ``root``'s parent, as ``tests/...``); test functions and classes left out."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        tree = parse(path)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if not node.name.startswith(("test_", "Test")):
                found[node.name].append(path.relative_to(root.parent).as_posix())
    return found


def _is_fixture(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
        "fixture" in ast.unparse(decorator) for decorator in node.decorator_list
    )


def fixtures(root: Path) -> dict[str, list[str]]:
    """Fixture name -> the files under ``root`` that define it (as :func:`definitions`)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in parse(path).body:
            if _is_fixture(node):
                assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                found[node.name].append(path.relative_to(root.parent).as_posix())
    return found


def duplicates(root: Path, overrides: dict[str, str]) -> list[str]:
    """One line per helper name defined in more than one file under ``root`` that
    ``overrides`` does not allow, and per entry of it that allows what is not there."""
    defined = definitions(root)
    fixture_files = fixtures(root)
    problems = []
    for name, files in sorted(defined.items()):
        conftests = [f for f in files if f.endswith("/conftest.py")]
        allowed = name in overrides and bool(conftests) and files == fixture_files[name]
        if len(files) > 1 and not allowed:
            problems.append(f"{name} is defined in {len(files)} files: {', '.join(files)}")
    for name, reason in sorted(overrides.items()):
        files = fixture_files.get(name, [])
        if len(files) < 2 or not any(f.endswith("/conftest.py") for f in files):
            problems.append(
                f"OVERRIDES lists {name} ({reason}), but no test file overrides a conftest "
                f"fixture of that name (fixtures of that name: {', '.join(files) or 'none'})"
            )
    return problems


def test_no_helper_is_defined_in_two_test_files() -> None:
    problems = duplicates(TESTS, OVERRIDES)
    assert not problems, "\n".join(problems)


def test_the_walk_sees_the_helpers_and_fixtures_of_every_directory() -> None:
    defined = definitions(TESTS)
    assert defined["headwater"] == ["tests/support/cli.py"]
    assert defined["sessions"] == ["tests/chaos/conftest.py"]
    assert fixtures(TESTS)["kafka"] == ["tests/support/kafka.py"]
    assert not [name for name in defined if name.startswith(("test_", "Test"))]


def test_a_helper_in_two_files_fails_naming_both(tmp_path: Path) -> None:
    root = tmp_path / "tests"
    (root / "a").mkdir(parents=True)
    (root / "a" / "test_one.py").write_text(
        "def helper():\n    pass\n\n\ndef test_x():\n    pass\n"
    )
    (root / "test_two.py").write_text("class helper:\n    pass\n\n\ndef test_x():\n    pass\n")
    assert duplicates(root, {}) == [
        "helper is defined in 2 files: tests/a/test_one.py, tests/test_two.py"
    ]
    (root / "test_three.py").write_text("async def helper():\n    pass\n")
    [problem] = duplicates(root, {})
    assert problem.startswith("helper is defined in 3 files")


def test_an_override_of_a_conftest_fixture_passes_only_when_listed(tmp_path: Path) -> None:
    root = tmp_path / "tests"
    root.mkdir()
    fixture = "import pytest\n\n\n@pytest.fixture\ndef names():\n    return 1\n"
    (root / "conftest.py").write_text(fixture)
    (root / "test_override.py").write_text(fixture)
    assert duplicates(root, {}) == [
        "names is defined in 2 files: tests/conftest.py, tests/test_override.py"
    ]
    assert duplicates(root, {"names": "this module's names are shorter"}) == []
    (root / "test_override.py").write_text("def names():\n    return 2\n")  # not a fixture
    assert len(duplicates(root, {"names": "this module's names are shorter"})) == 2


def test_an_override_allowing_what_is_not_there_fails(tmp_path: Path) -> None:
    root = tmp_path / "tests"
    root.mkdir()
    (root / "test_one.py").write_text("def helper():\n    pass\n")
    assert duplicates(root, {"helper": "why"}) == [
        "OVERRIDES lists helper (why), but no test file overrides a conftest fixture of that "
        "name (fixtures of that name: none)"
    ]
