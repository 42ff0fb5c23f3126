"""Every Python block of README.md runs, in order, in one namespace (as a reader pasting them
into one session would), in a fresh directory; the blocks' own assertions check the results.
Shell blocks are covered elsewhere: the two commands by tests/test_example.py and the CI."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each Python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 3


def test_every_python_block_of_the_readme_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    for line, code in python_blocks():
        try:
            exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), namespace)
        except Exception as error:
            raise AssertionError(f"the README block at line {line} fails: {error!r}") from error
    assert os.getcwd() == str(tmp_path)
