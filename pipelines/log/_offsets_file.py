"""A consumer group's committed offset on one partition of the embedded log: a small text file,
``groups/<group>/offsets/<topic>.<partition>``.

What Headwater writes is 30 bytes: the offset in 20 digits, a space, the CRC-32 of those digits
in 8 hex digits, a newline (``00000000000000004950 39411abe``). A commit overwrites it in place,
in one ``pwrite`` at the start of the file: a write of 30 bytes within one disk sector is never
torn by a crash, and a reader that catches it half done sees a checksum that does not match and
reads again. Renaming a new file over the old one at every commit, as before, made the file
system write out each file before the rename: ~0.4 ms a partition at every checkpoint, in the
worker's loop.

A process's first commit on a partition writes the file whole (a temporary file renamed over
it, see :class:`~pipelines.log.embedded.EmbeddedLog`), so that whatever was there before (a
number written by hand, a file of an older version) is replaced at once. A file holding a plain
number, as a person would write it to set where a group resumes, is read as that number.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

__all__ = ["parse", "read", "record", "write_in_place"]

_READ_ATTEMPTS = 3
"""Reads of a file whose checksum does not match before it counts as damaged: a writer in
another process may be in the middle of its one write."""


def record(offset: int) -> bytes:
    """The file's content for ``offset``."""
    digits = b"%020d" % offset
    return b"%s %08x\n" % (digits, zlib.crc32(digits))


def parse(raw: bytes) -> int | None:
    """The offset ``raw`` holds: a record, or a plain number; None if it is neither (damaged,
    or read in the middle of a write)."""
    fields = raw.split()
    try:
        if len(fields) == 1:
            return int(fields[0])
        if len(fields) == 2 and int(fields[1], 16) == zlib.crc32(fields[0]):
            return int(fields[0])
    except ValueError:
        return None
    return None


def read(path: Path) -> tuple[int | None, bytes] | None:
    """The offset in ``path`` (None if damaged) and the bytes last read; None if there is no
    file. Reads again while the checksum does not match (a write in progress)."""
    raw = b""
    for _ in range(_READ_ATTEMPTS):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        offset = parse(raw)
        if offset is not None:
            return offset, raw
    return None, raw


def write_in_place(path: Path, offset: int) -> bool:
    """Overwrite the record in ``path`` with ``offset``; False if there is no file (the caller
    writes it whole)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return False
    try:
        os.pwrite(fd, record(offset), 0)
    finally:
        os.close(fd)
    return True
