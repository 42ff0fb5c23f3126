"""Compaction of the embedded log: the last record of each key stays in the sealed segments, at
its offset; old tombstones go with what they delete; the active segment is never touched; a
crash at any step leaves every record readable once."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import signal
import time
from pathlib import Path

from support.cli import headwater

from pipelines.log._compaction import compact
from pipelines.log._partition_file import PartitionFile, segment_paths
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.check import LogCheck, check_log
from pipelines.log.embedded import EmbeddedLog

from .test_embedded_durability import Child

SMALL = 4096
KEYS = 40


def versions(start: int, count: int) -> RawBatch:
    """Records ``start`` .. ``start + count - 1``: record n sets key ``k<n % KEYS>`` to ``n``,
    except that every 7th deletes it (a tombstone)."""
    numbers = range(start, start + count)
    return RawBatch(
        [b"k%d" % (n % KEYS) for n in numbers],
        [None if n % 7 == 6 else b"%d" % n for n in numbers],
        list(numbers),
        [(("h", b"%d" % n),) for n in numbers],
    )


def write(partition: PartitionFile, total: int) -> None:
    for start in range(0, total, 25):
        partition.append(versions(start, 25))


def read_entries(partition: PartitionFile, start: int = 0) -> list[tuple[int, bytes, bytes | None]]:
    """(offset, key, value) of every record from ``start`` on, offsets strictly increasing."""
    found: list[tuple[int, bytes, bytes | None]] = []
    offset, end = start, partition.end_offset()
    while offset < end:
        records, offsets, following = partition.read(offset, 300)
        assert following > offset
        for index, at in enumerate(offsets):
            assert not found or at > found[-1][0]
            key = records.keys[index]
            assert key is not None
            found.append((at, key, records.values[index]))
            assert records.header_at(index) == (("h", b"%d" % at),)  # headers kept
        offset = following
    return found


def final_values(records: list[tuple[int, bytes, bytes | None]]) -> dict[bytes, bytes | None]:
    """The value each key ends with (None: deleted), from the records in offset order."""
    state: dict[bytes, bytes | None] = {}
    for _, key, value in records:
        state[key] = value
    return state


def expected_final(total: int) -> dict[bytes, bytes | None]:
    """What the input alone says each key ends with."""
    return final_values(
        [(n, b"k%d" % (n % KEYS), None if n % 7 == 6 else b"%d" % n) for n in range(total)]
    )


def test_the_last_record_of_each_key_stays_at_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=SMALL)
    write(partition, 3000)
    before = read_entries(partition)
    segments_before = len(segment_paths(path))
    active = partition.segments()[-1]
    dropped = compact(partition, segment_bytes=SMALL, now_ms=0, force=True)  # tombstones young
    after = read_entries(PartitionFile(path, segment_bytes=SMALL))
    assert dropped == len(before) - len(after) > 2000
    assert final_values(after) == final_values(before) == expected_final(3000)
    assert set(after) <= set(before)  # same records at the same offsets, fewer of them
    sealed_end = active[0]
    keys_in_sealed = [key for at, key, _ in after if at < sealed_end]
    assert len(keys_in_sealed) == len(set(keys_in_sealed))  # at most one per key there
    assert [r for r in after if r[0] >= sealed_end] == [r for r in before if r[0] >= sealed_end]
    assert len(segment_paths(path)) < segments_before  # merged into fewer files
    assert partition.end_offset() == 3000


def test_old_tombstones_go_with_what_they_delete(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=SMALL)
    write(partition, 3000)
    partition.roll()  # everything sealed
    compact(partition, segment_bytes=SMALL, now_ms=10**15, force=True)  # every tombstone old
    after = read_entries(partition)
    assert all(value is not None for _, _, value in after)
    expected = {key: value for key, value in expected_final(3000).items() if value is not None}
    assert final_values(after) == expected


def test_a_reader_across_compaction_reads_each_record_once(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=SMALL)
    write(partition, 2000)
    reader = PartitionFile(path, segment_bytes=SMALL)
    first: list[tuple[int, bytes, bytes | None]] = []
    middle = 0
    while middle < 500:  # a reader half way through, its first segments open
        records, offsets, middle = reader.read(middle, 100)
        first += [
            (at, b"k%d" % (at % KEYS), v) for at, v in zip(offsets, records.values, strict=True)
        ]
    compact(partition, segment_bytes=SMALL, now_ms=0, force=True)
    rest = read_entries(reader, start=middle)
    assert all(at >= middle for at, _, _ in rest)
    assert final_values(first + rest) == expected_final(2000)


async def test_the_embedded_log_reads_a_compacted_partition_with_its_offsets(
    tmp_path: Path,
) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    await log.create_topics([TopicSpec("state", 1, compacted=True)])
    tp = TopicPartition("state", 0)
    for start in range(0, 2000, 25):
        log.append(tp, versions(start, 25))
    await log.compact([TopicSpec("state", 1, compacted=True)], now_ms=0)
    fetched = log.read_now(tp, 0, 100)
    assert list(fetched.offsets) == sorted(set(fetched.offsets))
    assert fetched.offsets[0] > 0  # the first records were replaced by later ones
    assert len(fetched.offsets) == len(fetched.records)
    checked = check_log(tmp_path)
    assert not checked.damaged, [p.line() for p in checked.partitions]
    described = headwater("topics", "describe", "state", "--data-dir", tmp_path, cwd=tmp_path)
    assert described.returncode == 0, described.stderr
    assert re.search(r"compacted up to offset [\d,]+ at \d{4}-\d\d-\d\d ", described.stdout)


def test_a_crash_between_the_rename_and_the_removals_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=SMALL)
    write(partition, 3000)
    copies = tmp_path / "copies"
    copies.mkdir()
    for _, segment in segment_paths(path)[:-1]:
        for file in (segment, segment.with_suffix(".end")):
            shutil.copy2(file, copies / file.name)
    compact(partition, segment_bytes=1 << 30, now_ms=0, force=True)  # one merged file
    assert len(segment_paths(path)) == 2
    for copy in copies.iterdir():  # the removals after the rename never happened
        if copy.name not in ("0.log", "0.end"):
            shutil.copy2(copy, path.parent / copy.name)
    (path.parent / "0-00000000000000000025.log.compacting").write_bytes(b"half a file")
    crashed = PartitionFile(path, segment_bytes=SMALL)
    assert final_values(read_entries(crashed)) == expected_final(
        3000
    )  # each offset once, either copy
    compact(crashed, segment_bytes=1 << 30, now_ms=0, force=True)
    assert len(segment_paths(path)) == 2
    assert not list(path.parent.glob("*.compacting"))
    assert final_values(read_entries(PartitionFile(path))) == expected_final(3000)


def test_compaction_waits_for_enough_dirty_segments(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    partition = PartitionFile(path, segment_bytes=SMALL)
    write(partition, 3000)
    assert compact(partition, segment_bytes=SMALL, now_ms=0) > 0  # all dirty at first
    assert compact(partition, segment_bytes=SMALL, now_ms=0) == 0  # nothing new since
    for start in range(3000, 3100, 25):
        partition.append(versions(start, 25))
    assert compact(partition, segment_bytes=SMALL, now_ms=0) == 0  # a little dirt only
    asyncio.run(asyncio.sleep(0))


COMPACTOR = """
import sys
from pathlib import Path
from pipelines.log._compaction import compact
from pipelines.log._partition_file import PartitionFile
sys.path.insert(0, sys.argv[2])
from log.test_compaction import SMALL, versions

partition = PartitionFile(Path(sys.argv[1]), segment_bytes=SMALL)
while True:
    end = partition.end_offset()
    for start in range(end, end + 500, 25):
        partition.append(versions(start, 25))
    compact(partition, segment_bytes=SMALL * 4, now_ms=0, force=True)
    print(partition.end_offset(), flush=True)
"""


def test_kill_9_while_compacting_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """A process appends and compacts in a loop and is killed five times at random moments;
    after each kill every key still ends as the input says, each offset is read once, and
    the log checks out."""
    path = tmp_path / "0.log"
    chance = random.Random(7)
    for _ in range(5):
        child = Child(COMPACTOR, path, Path(__file__).parent.parent)
        assert child.lines.get(timeout=30) is not None  # a first round is done
        time.sleep(chance.uniform(0.0, 0.3))
        child.process.send_signal(signal.SIGKILL)
        child.process.wait()
        partition = PartitionFile(path, segment_bytes=SMALL)
        end = partition.end_offset()
        assert end % 25 == 0  # whole batches only
        assert final_values(read_entries(partition)) == expected_final(end)
        partition.close()
    assert not check_log_of(path).damaged


def check_log_of(path: Path) -> LogCheck:
    """``headwater log check`` of the one partition at ``path``, laid out as a data dir."""
    data_dir = path.parent / "data"
    topic = data_dir / "topics" / "t"
    topic.mkdir(parents=True)
    (topic / "topic.json").write_bytes(
        b'{"partitions": 1, "compacted": true, "retention_ms": null}'
    )
    for file in path.parent.iterdir():
        if file.is_file() and file.name.startswith("0"):
            shutil.copy2(file, topic / file.name)
    return check_log(data_dir)
