"""Fixtures of the chaos tests: the commands a test starts never outlive it.

Every ``headwater`` command a chaos test starts runs in its own session (process group), and its
worker processes are in that session too. :func:`sessions` kills every such session at the end
of the test, whatever happened in it, and waits until no process of them is left.

The Kafka tests use the broker fixtures of tests/kafka_support.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import stat_fields


class Sessions:
    """The sessions of the commands one test started (each session id is its leader's pid)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def add(self, session: int) -> None:
        self.ids.append(session)

    def alive(self) -> list[int]:
        """The live (not zombie) processes of these sessions, whoever their parent is now."""
        if not self.ids:
            return []
        wanted = {str(s) for s in self.ids}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[3] in wanted and fields[0] != "Z":
                found.append(int(entry.name))
        return sorted(found)

    def kill_all(self, timeout: float = 15.0) -> list[int]:
        """SIGKILL every process of these sessions; returns those still alive after
        ``timeout`` seconds (none, normally)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.alive()
            if not left or time.monotonic() > deadline:
                return left
            for session in self.ids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(session, signal.SIGKILL)
            for pid in left:  # a process that left its group still belongs to its session
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    """Where a test registers the sessions it starts; all are killed when the test ends."""
    started = Sessions()
    yield started
    left = started.kill_all()
    assert not left, f"processes of the test outlived it even after SIGKILL: {left}"
