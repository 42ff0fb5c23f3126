"""Running the ``headwater`` command from tests, as a user would, and judging what it says.

Every test that starts ``headwater`` runs ``python -m pipelines.cli`` in a directory of the
test's, with an environment free of the ``HEADWATER_*`` settings of whoever runs the tests (plus
the ones a test gives), standard input not a terminal:

- :func:`headwater` runs a command to the end: its status, stdout and stderr;
- :func:`start` starts one in the background, in a session of its own (its worker processes are
  in it too), its output in files next to it: a :class:`Cli`. :func:`background` does the same for
  a ``with`` block and kills the session after it; :class:`Sessions` keeps every command of a
  test and kills them all at its end;
- :func:`wait_until` polls a condition while watching background commands, and fails with the
  end of their stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.processes import session_processes

__all__ = [
    "TIMEOUT",
    "Cli",
    "Sessions",
    "assert_user_error",
    "background",
    "clean_env",
    "headwater",
    "start",
    "summary_counts",
    "tail",
    "wait_until",
    "write_module",
]

TIMEOUT = 60.0
"""Seconds a command may take before the test gives up on it (and kills it)."""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ``HEADWATER_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    return {**env, **(extra or {})}


def write_module(path: Path, source: str) -> Path:
    """Write ``source`` (dedented) to ``path``, making its directory; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def headwater(
    *args: str | Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
    preexec_fn: Callable[[], None] | None = None,
    stdin: int = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    """``headwater ARGS`` in ``cwd``; its status, stdout and stderr (``preexec_fn``: run in the
    child before the interpreter starts; ``stdin``: a file descriptor to read, such as a
    pseudo-terminal's; by default none)."""
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


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def summary_counts(stderr: str) -> dict[str, tuple[int, int]]:
    """Step id -> (records in, records out) from the summary ``headwater run|worker`` prints."""
    found = {}
    for match in re.finditer(r"^  (\S+): ([\d,]+) in, ([\d,]+) out", stderr, re.MULTILINE):
        found[match[1]] = (int(match[2].replace(",", "")), int(match[3].replace(",", "")))
    return found


# -- in the background -------------------------------------------------------------------------


@dataclass
class Cli:
    """A ``headwater`` command running in the background, in its own session."""

    process: subprocess.Popen[bytes]
    name: str
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Its status once it ends; after ``timeout`` s its session is killed, the test fails."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_session()
            pytest.fail(
                f"`headwater {self.name}` did not finish in {timeout:.0f}s:\n{tail(self.stderr())}"
            )

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM to the command (as a service manager stops it), then wait for it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        return self.wait(timeout)

    def kill_session(self) -> None:
        """SIGKILL the command and its worker processes (its whole process group) at once, also
        workers whose command has ended."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def start(
    args: Sequence[str | Path], *, cwd: Path, name: str, env: Mapping[str, str] | None = None
) -> Cli:
    """Start ``headwater ARGS`` in ``cwd`` in the background, in a new session; its stdout and
    stderr go to ``<name>.stdout`` and ``<name>.stderr`` in ``cwd``."""
    out, err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *map(str, args)],
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=clean_env(env),
            start_new_session=True,
        )
    return Cli(process, name, out, err)


@contextlib.contextmanager
def background(
    args: Sequence[str | Path], *, cwd: Path, name: str, env: Mapping[str, str] | None = None
) -> Iterator[Cli]:
    """:func:`start` for the block; the command's session is killed after it, whatever
    happened."""
    cli = start(args, cwd=cwd, name=name, env=env)
    try:
        yield cli
    finally:
        cli.kill_session()


class Sessions:
    """The commands one test started, each in its own session; :meth:`kill_all` kills every
    process of those sessions, whoever their parent is now (the ``sessions`` fixture of the
    chaos tests calls it when the test ends)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env or {})
        """Settings every command gets."""
        self.started: list[Cli] = []

    def start(self, args: Sequence[str | Path], *, cwd: Path, name: str) -> Cli:
        """:func:`start` with :attr:`env`."""
        cli = start(args, cwd=cwd, name=name, env=self.env)
        self.started.append(cli)
        return cli

    def alive(self) -> list[int]:
        """The live processes of the started sessions."""
        return session_processes([cli.pid for cli in self.started])

    def kill_all(self, timeout: float = 15.0) -> list[int]:
        """SIGKILL every process of the started sessions; returns those still alive after
        ``timeout`` seconds (none, normally)."""
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            for cli in self.started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(cli.pid, signal.SIGKILL)
            for pid in left:  # a process that left its group still belongs to its session
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for cli in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                cli.process.wait(timeout=5)
        return self.alive()


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    watch: Sequence[Cli] = (),
    interval: float = 0.1,
) -> None:
    """Poll ``condition``; fail if it stays false for ``timeout`` s or a watched command ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        for cli in watch:
            if not cli.running():
                pytest.fail(
                    f"`headwater {cli.name}` ended (status {cli.process.returncode}) before "
                    f"{what}:\n{tail(cli.stderr())}"
                )
        if time.monotonic() > deadline:
            where = "".join(f"\n--- {c.name}:\n{tail(c.stderr())}" for c in watch)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{where}")
        time.sleep(interval)
