"""Compaction of an embedded partition: keep the last record of each key in its sealed segments.

What a compacted topic (a state changelog, the source positions, a table) needs is the latest
value of each key; compaction drops every record of the sealed segments that a later one of the
same key replaces, as Kafka's log cleaner does. The active segment is never touched, so writers
are never in the way. Records keep their offsets (committed offsets and restore checkpoints
point at them): a compacted segment holds *sparse* frames, each record with its own offset (see
:func:`~pipelines.log._partition_file.encode_frame`).

**Transactions.** Only sealed segments below the partition's last stable offset are compacted,
so every transaction with frames there is decided: records of committed ones are kept as any
other (plain frames: the marks and markers go), records of aborted ones are dropped.

**Tombstones** (``None`` values: a key deleted, a window closed) go too, once they are the last
record of their key and their segment was sealed more than ``tombstone_ms`` ago (an hour by
default). The delay is for a reader in the middle of the partition while a compaction runs: it
may have read a key's value from a segment before compaction and would miss the tombstone that
deletes it if that went at once; an hour is far longer than a restore takes.

**Crash safety.** A run of consecutive sealed segments is rewritten as one file (merged up to
``segment_bytes``, so compacted partitions do not end up as many tiny files) beside them,
fsync-ed, its ``.end`` written, then renamed over the first of them; the others of the run are
removed after. A crash before the rename leaves the old files (and a ``.compacting`` file,
removed by the next run). A crash after it leaves the new file and some of the old ones it
replaced: their offsets are also in the new file, the next compaction removes them first
(a segment whose base lies below the end of the one before it), and a reader meanwhile reads
either copy of the same records. Nothing is lost and nothing is read twice.

How far a partition is compacted is kept in ``<p>.clean`` (the end offset of the last sealed
segment compacted); a partition is compacted again once its dirty sealed segments (those after
that) hold as many bytes as the clean ones.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.log._partition_file import (
    _END,
    PartitionFile,
    Seal,
    disk_error,
    encode_frame,
    seal_frame,
)
from pipelines.log.base import RawBatch

__all__ = ["TOMBSTONE_MS", "compact"]

TOMBSTONE_MS = 3_600_000
"""How long a tombstone stays after its segment was sealed."""
_FRAME_RECORDS = 1000
_READ = 10_000


@dataclass(slots=True)
class _Kept:
    """The records one output file keeps, from a run of consecutive sealed segments."""

    bases: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    records: RawBatch = field(default_factory=lambda: RawBatch([], [], [], []))
    offsets: list[int] = field(default_factory=list)
    size: int = 0
    seal: Seal | None = None


def compact(
    partition: PartitionFile,
    *,
    segment_bytes: int,
    now_ms: int,
    tombstone_ms: int = TOMBSTONE_MS,
    force: bool = False,
) -> int:
    """Compact ``partition``'s sealed segments if they are dirty enough (or ``force``); how
    many records were dropped."""
    _remove_leftovers(partition)
    stable = partition.stable_end()  # below it, every transaction's frames are decided
    sealed = [segment for segment in partition.segments()[:-1] if segment[1] <= stable]
    if not sealed:
        return 0
    clean_path = partition.path.with_suffix(".clean")
    clean = _read_clean(clean_path)
    dirty = sum(path.stat().st_size for base, _, path in sealed if base >= clean)
    settled = sum(path.stat().st_size for base, _, path in sealed if base < clean)
    if not force and (dirty == 0 or dirty < settled):
        return 0
    latest = _latest_offsets(partition, [base for base, _, _ in sealed])
    dropped = 0
    run = _Kept()
    for base, _, path in sealed:
        seal = partition.seal_of(base)
        assert seal is not None
        if run.bases and run.size >= segment_bytes:
            _write(partition, run)
            run = _Kept()
        old_tombstones = seal.sealed_at <= now_ms - tombstone_ms
        dropped += _keep(partition, base, latest, old_tombstones, run)
        run.bases.append(base)
        run.paths.append(path)
        run.seal = seal if run.seal is None else _merged(run.seal, seal)
    _write(partition, run)
    _write_clean(clean_path, sealed[-1][1])
    return dropped


def _read_clean(path: Path) -> int:
    try:
        return int(path.read_bytes() or b"0")
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        return 0  # unreadable: compact it all again, which is always safe


def _write_clean(path: Path, offset: int) -> None:
    temporary = path.with_suffix(".clean.tmp")
    try:
        temporary.write_bytes(b"%d" % offset)
        temporary.replace(path)
    except OSError as error:
        raise disk_error(path, "write", error) from error


def _remove_leftovers(partition: PartitionFile) -> None:
    """Remove what a compaction that crashed left: its unfinished output, and the segments
    that its finished output already holds (a base below the end of the one before)."""
    for stray in partition.path.parent.glob(f"{partition.path.stem}*.compacting"):
        stray.unlink(missing_ok=True)
    reach = -1
    for base, _, path in partition.segments()[:-1]:
        if base < reach:
            partition.forget(base)
            path.unlink(missing_ok=True)
            path.with_suffix(".end").unlink(missing_ok=True)
            continue
        seal = partition.seal_of(base)
        reach = seal.end if seal is not None else reach
    partition.log_start()


def _records(partition: PartitionFile, base: int) -> list[tuple[RawBatch, list[int]]]:
    """Every record of the sealed segment at ``base``, a read at a time, with its offsets (not
    those of aborted transactions: they go)."""
    end = partition.sealed_segment(base).end_offset()
    reads: list[tuple[RawBatch, list[int]]] = []
    offset = base
    while offset < end:
        records, offsets, following = partition.read(offset, _READ)
        reads.append((records, list(offsets)))
        if following <= offset:
            break
        offset = following
    return reads


def _latest_offsets(partition: PartitionFile, bases: list[int]) -> dict[bytes, int]:
    """The offset of the last record of each key in the sealed segments at ``bases``."""
    latest: dict[bytes, int] = {}
    for base in bases:
        for records, offsets in _records(partition, base):
            for key, offset in zip(records.keys, offsets, strict=True):
                if key is not None:
                    latest[key] = offset
    return latest


def _keep(
    partition: PartitionFile,
    base: int,
    latest: dict[bytes, int],
    old_tombstones: bool,
    run: _Kept,
) -> int:
    """Add the records of the segment at ``base`` that stay to ``run``; how many go."""
    dropped = 0
    kept = run.records
    assert kept.headers is not None
    for records, offsets in _records(partition, base):
        for index, offset in enumerate(offsets):
            key, value = records.keys[index], records.values[index]
            if _goes(key, value, offset, latest, old_tombstones):
                dropped += 1
                continue
            kept.keys.append(key)
            kept.values.append(value)
            kept.timestamps.append(records.timestamps[index])
            kept.headers.append(records.header_at(index))
            run.offsets.append(offset)
            run.size += 16 + len(key or b"") + len(value or b"")
    return dropped


def _goes(
    key: bytes | None,
    value: bytes | None,
    offset: int,
    latest: dict[bytes, int],
    old_tombstones: bool,
) -> bool:
    """Whether a record is dropped: a later one of its key replaces it, or it is an old
    tombstone with nothing before it left to delete. Records without a key all stay."""
    if key is None:
        return False
    return latest.get(key) != offset or (value is None and old_tombstones)


def _merged(first: Seal, later: Seal) -> Seal:
    """The seal of a run of segments: the last one's end, transactions, time and open
    transactions (decided by now: a run ends at or below the last stable offset)."""
    newest = max(first.newest, later.newest)
    return Seal(later.end, newest, later.transactions, later.sealed_at, later.open)


def _write(partition: PartitionFile, run: _Kept) -> None:
    """Replace the segments of ``run`` by one file holding what it keeps (see the module
    docstring for the order of the steps)."""
    if not run.bases or run.seal is None:
        return
    first = run.paths[0]
    temporary = first.with_name(first.name + ".compacting")
    # the first frame starts at the segment's base, kept records or not: reads of any offset
    # from there on find a frame that holds it or the gap before the next
    frames = [
        encode_frame(
            run.offsets[start] if start else run.bases[0],
            _slice(run.records, start, start + _FRAME_RECORDS),
            offsets=run.offsets[start : start + _FRAME_RECORDS],
        )
        for start in range(0, max(len(run.offsets), 1), _FRAME_RECORDS)
    ]
    frames.append(seal_frame(run.seal))
    data = b"".join(frames)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        end_fd = os.open(first.with_suffix(".end"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(end_fd, _END.pack(len(data)), 0)
        finally:
            os.close(end_fd)
        os.replace(temporary, first)
        _sync_directory(first.parent)
    except OSError as error:
        raise disk_error(first, "compact", error) from error
    for base in run.bases:
        partition.forget(base)
    for path in run.paths[1:]:
        path.unlink(missing_ok=True)
        path.with_suffix(".end").unlink(missing_ok=True)
    partition.log_start()


def _slice(records: RawBatch, start: int, stop: int) -> RawBatch:
    headers = records.headers[start:stop] if records.headers is not None else None
    return RawBatch(
        records.keys[start:stop],
        records.values[start:stop],
        records.timestamps[start:stop],
        headers if headers and any(headers) else None,
    )


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsync-ed
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
