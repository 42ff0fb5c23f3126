"""One ``headwater run`` of a pipeline per data directory.

Two runners of one pipeline on one data directory would both run its sources and emit the
input twice. The runner holds an exclusive ``flock`` on ``<data-dir>/runs/<pipeline>.lock``
for as long as it runs; a second runner finds it taken and stops with an error naming the
first one's pid. The kernel releases the lock when the holder dies, even by ``kill -9``, so a
crashed run never blocks the next one. ``headwater worker`` takes no lock: adding workers to a
running pipeline is what it is for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.log._partition_file import disk_error

__all__ = ["AlreadyRunning", "run_lock"]


class AlreadyRunning(PipelineError):
    """Another runner of the same pipeline holds the data directory."""


@contextlib.contextmanager
def run_lock(data_dir: Path, pipeline: str) -> Iterator[None]:
    """Hold the run lock of ``pipeline`` in ``data_dir`` for the duration of the block."""
    path = data_dir / "runs" / f"{pipeline}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise disk_error(path, "take the run lock", error) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(
                f"pipeline {pipeline!r} is already running on data directory {data_dir} "
                f"(runner pid {holder}); stop it first, or add workers to it with "
                "'headwater worker'"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
