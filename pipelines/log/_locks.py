"""The ``flock`` idioms the embedded log's tools share: hold a lock file for a block, take one
if it is free, and ask whether a live process holds one (the kernel drops a dead holder's lock
at once)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["held", "locked", "try_lock"]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive ``flock`` of ``path`` (created if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def try_lock(path: Path, *, create: bool = True) -> int | None:
    """An fd holding an exclusive lock on ``path`` (created if missing and ``create``, else
    :class:`FileNotFoundError`), or None if another holder has it."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
