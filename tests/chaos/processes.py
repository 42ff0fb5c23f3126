"""The processes of the commands a chaos test starts, read from /proc."""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["alive", "stat_fields", "tail", "worker_pids"]


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


def worker_pids(parent: int) -> list[int]:
    """The live worker processes of a ``headwater run|worker`` process (spawned children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is None or fields[0] == "Z" or int(fields[1]) != parent:
            continue
        with contextlib.suppress(OSError):
            if b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return sorted(found)


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])
