"""Commit files of earlier versions of the embedded log, read to finish what they started.

Earlier versions committed an exactly-once transaction through a commit file
(``groups/<group>/commits/<transaction>-<sequence>.commit``): the transaction's batches and
input offsets, written to a temporary name, fsync-ed and renamed into place (the commit point);
then the batches were appended to their partitions, each frame marked with the transaction and
the commit's sequence, the offsets stored, and the file deleted. Transactions now append their
records once, as they are sent (see :mod:`pipelines.log._transactions`), but a data directory
an earlier version left with a commit file in it (its writer killed past the commit point)
still opens: whoever next claims a partition of that group applies every commit file whose
writer is gone (its ``flock`` is released) -- appending only the frames not already there (the
marks make those appends idempotent) -- so such a commit is never half applied nor applied
twice.

A commit file::

    <I meta_len> meta (orjson: transaction, sequence, group, offsets [[topic, partition,
    offset]], frames [[topic, partition, frame_len]])   then the frames, one after the other
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipelines.log._partition_file import decode_frame, disk_error
from pipelines.log.base import RawBatch, TopicPartition

__all__ = ["CommitRecord", "pending_commits", "read_commit"]

_LENGTH = struct.Struct("<I")


@dataclass(slots=True)
class CommitRecord:
    """What one commit file holds."""

    transaction: int
    sequence: int
    group: str
    offsets: dict[TopicPartition, int]
    batches: list[tuple[TopicPartition, RawBatch]]


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
