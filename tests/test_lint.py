"""The code stays as typed and as tidy as pyproject.toml says: mypy strict over the packages,
ruff's lint rules and format over everything. Part of the test suite, so CI runs them with
the tests (the versions are pinned in the ``dev`` extra, so a new release cannot fail CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_module(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_mypy_strict_finds_nothing() -> None:
    done = python_module("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_finds_nothing() -> None:
    done = python_module("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_changes_nothing() -> None:
    done = python_module("ruff", "format", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr
