"""Running the ``headwater`` command from tests, as a user would, and judging its errors.

Every test that starts ``headwater`` runs it through :func:`headwater`: ``python -m
pipelines.cli`` in a directory of the test's, with an environment free of the ``HEADWATER_*``
settings of whoever runs the tests (plus the ones a test gives), standard input not a terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["assert_user_error", "clean_env", "headwater"]

TIMEOUT = 60.0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ``HEADWATER_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    return {**env, **(extra or {})}


def headwater(
    *args: str | Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
    preexec_fn: Callable[[], None] | None = None,
    stdin: int = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    """``headwater ARGS`` in ``cwd``; its status, stdout and stderr (``stdin``: a file
    descriptor to read, such as a pseudo-terminal's; by default none)."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)],
        cwd=cwd,
        env=clean_env(env),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=preexec_fn,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Status 2, nothing on stdout, and one paragraph on stderr, starting ``headwater:`` and
    containing ``needles`` (never a traceback); returns the paragraph joined into one line."""
    stderr = result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, stderr)
    assert "Traceback" not in stderr, stderr
    text = stderr.strip()
    assert text, "nothing on stderr"
    assert "\n\n" not in text, f"more than one paragraph:\n{stderr}"
    assert text.startswith("headwater: "), stderr
    starts = [line for line in text.splitlines() if line.startswith("headwater:")]
    assert len(starts) == 1, stderr
    assert result.stdout == ""
    paragraph = " ".join(text.split())
    for needle in needles:
        assert needle in paragraph, f"{needle!r} not in:\n{stderr}"
    return paragraph
