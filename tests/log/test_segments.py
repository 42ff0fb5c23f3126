"""Segments of the embedded log: a partition rolls into sealed segment files, readers and
writers in other processes follow the seals, transactions stay idempotent across a roll, and
whole sealed segments are removed from the oldest on (what retention and purges do)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from support.logs import numbered

from pipelines.log._partition_file import (
    OffsetOutOfRange,
    PartitionFile,
    segment_paths,
)
from pipelines.log.base import TopicPartition, TopicSpec
from pipelines.log.check import check_log
from pipelines.log.embedded import EmbeddedLog

from .test_embedded_durability import _PRELUDE, Child

SMALL = 4096  # bytes per segment: a roll every few batches

# Appends batches of varied sizes round-robin to 3 partitions from their end on, forever; the
# value of each record is its offset; after each acknowledged batch prints "<p> <last offset>".
APPENDER = (
    _PRELUDE
    + """
async def main():
    log = EmbeddedLog(data_dir)
    producer = log.producer()
    partitions = [TopicPartition(topic, p) for p in range(3)]
    ends = [(await log.end_offsets(partitions))[tp] for tp in partitions]
    i = 0
    while True:
        p, size = i % 3, 1 + (i * 37) % 200
        numbers = range(ends[p], ends[p] + size)
        batch = RawBatch([b"k%d" % n for n in numbers], [b"%d" % n for n in numbers], list(numbers))
        await producer.send(topic, p, batch)
        await producer.flush()
        ends[p] += size
        print(p, ends[p] - 1, flush=True)
        i += 1

asyncio.run(main())
"""
)


def read_offsets(partition: PartitionFile, start: int = 0) -> list[int]:
    """The values of every record from ``start`` to the end, as offsets, checking each record's
    value is its offset."""
    found: list[int] = []
    offset = start
    while offset < partition.end_offset():
        records, _, following = partition.read(offset, 1000)
        found += [int(v) for v in records.values]  # type: ignore[arg-type]
        assert following > offset, f"no progress at {offset}"
        offset = following
    return found


def fill(partition: PartitionFile, batches: int, size: int = 50) -> int:
    end = partition.end_offset()
    for _ in range(batches):
        partition.append(numbered(end, size))
        end += size
    return end


def test_a_partition_rolls_into_sealed_segments_and_reads_across_them(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    reader = PartitionFile(path, segment_bytes=SMALL)  # opened before any roll
    writer = PartitionFile(path, segment_bytes=SMALL)
    end = fill(writer, 40)
    segments = segment_paths(path)
    assert len(segments) > 5
    assert segments[0] == (0, path)
    assert [base for base, _ in segments] == sorted(base for base, _ in segments)
    assert reader.end_offset() == end
    assert read_offsets(reader) == list(range(end))
    assert read_offsets(PartitionFile(path, segment_bytes=SMALL)) == list(range(end))
    assert read_offsets(reader, start=777) == list(range(777, end))
    for base, end_of, _ in writer.segments()[:-1]:
        seal = writer.seal_of(base)
        assert seal is not None
        assert seal.newest == end_of - 1  # timestamps are offsets here
        assert seal.end == end_of


def test_a_seal_records_the_newest_timestamp_whoever_appended_it(tmp_path: Path) -> None:
    """A writer keeps the newest timestamp of its own appends as it goes; the frames of another
    writer, and those there before it opened the segment, count too."""
    path = tmp_path / "0.log"
    writer, other = PartitionFile(path), PartitionFile(path)
    writer.append(numbered(0, 5, stamp=10))
    other.append(numbered(5, 5, stamp=99))  # the newest, in the middle
    writer.append(numbered(10, 5, stamp=20))
    writer.roll()
    seal = writer.seal_of(0)
    assert seal is not None and seal.newest == 99
    writer.append(numbered(15, 3, stamp=5))  # the next segment starts afresh
    writer.append(numbered(18, 3, stamp=3))
    writer.roll()
    (_, (base, _, _), _) = writer.segments()
    seal = writer.seal_of(base)
    assert seal is not None and seal.newest == 5


def test_a_writer_with_a_stale_segment_follows_the_seal(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    early = PartitionFile(path, segment_bytes=1 << 30)  # never rolls by itself
    early.append(numbered(0, 10))
    other = PartitionFile(path, segment_bytes=SMALL)
    end = fill(other, 30)
    early.append(numbered(end, 5))  # its segment was sealed meanwhile: goes to the newest
    assert read_offsets(other) == list(range(end + 5))
    assert len(segment_paths(path)) > 3


def test_a_roll_cut_short_after_the_seal_is_finished_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=1 << 30)
    partition.append(numbered(0, 10))
    partition._active.seal()  # a writer died after sealing, before creating the next file
    partition.close()
    assert segment_paths(path) == [(0, path)]
    reader = PartitionFile(path)
    assert reader.end_offset() == 10
    assert read_offsets(reader) == list(range(10))
    writer = PartitionFile(path)
    writer.append(numbered(10, 5))
    assert [base for base, _ in segment_paths(path)] == [0, 10]
    assert read_offsets(reader) == list(range(15))


def test_a_transaction_is_applied_once_across_rolls(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    first = PartitionFile(path, segment_bytes=SMALL)
    assert first.append(numbered(0, 10), (7, 1)) == 0
    fill(first, 20)  # more segments since
    fresh = PartitionFile(path, segment_bytes=SMALL)  # as a process recovering the commit
    assert fresh.append(numbered(0, 10), (7, 1)) is None
    assert fresh.append(numbered(0, 10), (7, 0)) is None
    end = fresh.end_offset()
    assert fresh.append(numbered(end, 10), (7, 2)) == end


def test_sealed_segments_are_removed_oldest_first_and_reads_below_fail(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=SMALL)
    reader = PartitionFile(path, segment_bytes=SMALL)
    end = fill(partition, 40)
    assert read_offsets(reader)[:1] == [0]  # the reader has the first segments open
    segments = partition.segments()
    cut = segments[3][1]  # the end of the fourth segment
    removed = partition.drop(below=cut + 1)
    assert removed == [p for _, _, p in segments[:4]]
    assert not any(p.exists() or p.with_suffix(".end").exists() for p in removed)
    assert partition.log_start() == cut
    assert read_offsets(partition, start=cut) == list(range(cut, end))
    with pytest.raises(OffsetOutOfRange, match="no longer on the log") as caught:
        PartitionFile(path).read(0, 10)
    assert caught.value.log_start == cut
    assert partition.drop(below=10**9) == [p for _, _, p in segments[4:-1]]
    assert partition.segments()[0][2] == segments[-1][2]  # the active segment stays
    start = partition.log_start()
    assert start == segments[-1][0]
    assert read_offsets(partition, start=start) == list(range(start, end))


async def test_the_embedded_log_names_the_topic_of_a_read_below_its_start(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    await log.create_topics([TopicSpec("numbers", 1)])
    tp = TopicPartition("numbers", 0)
    for start in range(0, 2000, 50):
        log.append(tp, numbered(start, 50))
    partition = log._file(tp)
    partition.drop(below=1000)
    with pytest.raises(OffsetOutOfRange, match="topic 'numbers' partition 0: the log now starts"):
        log.read_now(tp, 0, 10)
    fetched = log.read_now(tp, partition.log_start(), 10)
    assert list(fetched.offsets) == list(range(partition.log_start(), partition.log_start() + 10))


def test_log_check_reads_every_segment(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    asyncio.run(log.create_topics([TopicSpec("numbers", 1)]))
    for start in range(0, 2000, 50):
        log.append(TopicPartition("numbers", 0), numbered(start, 50))
    checked = check_log(tmp_path)
    assert not checked.damaged
    assert len(checked.partitions) == len(segment_paths(tmp_path / "topics" / "numbers" / "0.log"))
    assert sum(p.records for p in checked.partitions) == 2000
    assert checked.partitions[1].name.startswith("numbers[0] from offset ")


def test_kill_9_while_rolling_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """An appender rolling every few batches is killed five times; every record it said was
    acknowledged is there, at its offset, and the offsets run on without a gap or a repeat."""
    asyncio_log = EmbeddedLog(tmp_path)
    asyncio.run(asyncio_log.create_topics([TopicSpec("t", 3)]))
    acknowledged = [-1, -1, -1]
    os.environ["HEADWATER_SEGMENT_BYTES"] = str(SMALL)
    try:
        for _ in range(5):
            child = Child(APPENDER, tmp_path, "t")
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline:
                line = child.lines.get(timeout=15)
                assert line is not None
                partition, last = map(int, line.split())
                acknowledged[partition] = max(acknowledged[partition], last)
            child.process.send_signal(signal.SIGKILL)
            child.process.wait()
    finally:
        del os.environ["HEADWATER_SEGMENT_BYTES"]
    for number in range(3):
        path = tmp_path / "topics" / "t" / f"{number}.log"
        assert len(segment_paths(path)) > 2
        values = read_offsets(PartitionFile(path))
        assert values == list(range(len(values)))
        assert len(values) > acknowledged[number]


def test_a_writer_whose_segment_was_sealed_and_purged_goes_on_in_the_newest(
    tmp_path: Path,
) -> None:
    """A worker's active segment is sealed by another writer, which goes on for several
    segments, and a purge removes them all but the newest: the first writer's next append
    goes to the newest segment, and a reader's end offset follows."""
    path = tmp_path / "0.log"
    early = PartitionFile(path, segment_bytes=1 << 30)
    early.append(numbered(0, 10))
    assert early.end_offset() == 10
    other = PartitionFile(path, segment_bytes=SMALL)
    end = fill_from(other, 10, 30)
    other.drop(below=end)
    assert early.end_offset() == end  # follows past the purged segments
    early.append(numbered(end, 5))
    assert read_offsets(other, start=other.log_start())[-5:] == list(range(end, end + 5))


def fill_from(partition: PartitionFile, start: int, batches: int) -> int:
    for _ in range(batches):
        partition.append(numbered(start, 50))
        start += 50
    return start
