"""Atomic commits on the embedded log, through commit files.

A transaction's batches and the input offsets it consumed are written to one commit file:
written to a temporary name, fsync-ed, then renamed into place, which is the commit point (a
rename is atomic, so the file is either absent or whole). Then the batches are appended to their
partitions, each frame marked with the transaction and the commit's sequence, the offsets are
stored, and the file is deleted. A crash after the rename leaves the file behind; whoever next
claims a partition of that group first applies every commit file whose writer is gone (its
``flock`` is released) — appending only the frames not already there (the marks make appends
idempotent) — so a commit is never half applied and never applied twice.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipelines.log._partition_file import decode_frame, disk_error, encode_frame
from pipelines.log.base import RawBatch, TopicPartition

__all__ = ["CommitRecord", "fsync_directory", "pending_commits", "read_commit", "write_commit"]

_LENGTH = struct.Struct("<I")


@dataclass(slots=True)
class CommitRecord:
    """What one commit file holds."""

    transaction: int
    sequence: int
    group: str
    offsets: dict[TopicPartition, int]
    batches: list[tuple[TopicPartition, RawBatch]]


def write_commit(directory: Path, record: CommitRecord) -> tuple[int, Path]:
    """Durably write ``record``; returns the file, still locked by the returned descriptor."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = [encode_frame(0, batch) for _, batch in record.batches]
    meta = orjson.dumps(
        {
            "transaction": record.transaction,
            "sequence": record.sequence,
            "group": record.group,
            "offsets": [[tp.topic, tp.partition, o] for tp, o in record.offsets.items()],
            "frames": [
                [tp.topic, tp.partition, len(frame)]
                for (tp, _), frame in zip(record.batches, frames, strict=True)
            ],
        }
    )
    name = f"{record.transaction:016x}-{record.sequence}.commit"
    temporary = directory / f".{name}.tmp"
    fd = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        os.write(fd, b"".join([_LENGTH.pack(len(meta)), meta, *frames]))
        os.fsync(fd)
        final = directory / name
        os.replace(temporary, final)
        fsync_directory(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd, final


def read_commit(path: Path) -> CommitRecord:
    """The commit in ``path``."""
    data = path.read_bytes()
    (length,) = _LENGTH.unpack_from(data)
    meta = orjson.loads(data[_LENGTH.size : _LENGTH.size + length])
    position = _LENGTH.size + length
    batches = []
    for topic, partition, size in meta["frames"]:
        _, batch = decode_frame(data[position : position + size])
        batches.append((TopicPartition(topic, partition), batch))
        position += size
    offsets = {TopicPartition(t, p): o for t, p, o in meta["offsets"]}
    return CommitRecord(meta["transaction"], meta["sequence"], meta["group"], offsets, batches)


def pending_commits(directory: Path) -> Sequence[Path]:
    """The commit files in ``directory``, oldest first. A directory that cannot be listed is
    an error, not an empty one: its commits would go unapplied without a word."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise disk_error(directory, "list the pending commits in", error) from error
    return [directory / n for n in sorted(names) if n.endswith(".commit") and n[0] != "."]


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
