"""A package named ``operators`` or ``connectors`` that is not Headwater's, found first on the
path, makes ``import pipelines`` fail at once, saying which one and where it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import clean_env


@pytest.mark.parametrize("name", ["operators", "connectors"])
def test_a_shadowing_package_is_named(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    env = clean_env({"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    done = subprocess.run(
        [sys.executable, "-c", "import pipelines"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: Headwater's {name!r} package was not found"), last
    assert f"the one in {tmp_path / name}" in last


def test_headwater_s_own_packages_pass(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import pipelines, operators, connectors"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
