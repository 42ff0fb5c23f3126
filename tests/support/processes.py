"""Processes the tests start, read from /proc: alive or not, their worker processes, and the
processes left of the sessions a test started."""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["alive", "session_processes", "stat_fields", "worker_pids"]


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session...),
    or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _live_processes() -> list[tuple[int, list[str]]]:
    """Every live (not zombie) process, with its stat fields."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                found.append((int(entry.name), fields))
    return found


def worker_pids(parent: int) -> list[int]:
    """The live worker processes of a ``headwater run|worker`` process (spawned children)."""
    found = []
    for pid, fields in _live_processes():
        if int(fields[1]) == parent:
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
    return sorted(found)


def session_processes(sessions: list[int]) -> list[int]:
    """The live processes of ``sessions`` (session ids), whoever their parent is now."""
    wanted = {str(s) for s in sessions}
    return sorted(pid for pid, fields in _live_processes() if fields[3] in wanted)
