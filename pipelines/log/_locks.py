"""The two ``flock`` idioms the embedded log's tools share: hold a lock file for a block, and
ask whether a live process holds one (the kernel drops a dead holder's lock at once)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["held", "locked"]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive ``flock`` of ``path`` (created if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def held(path: Path) -> bool:
    """Whether a live process holds the ``flock`` of ``path`` (False if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
