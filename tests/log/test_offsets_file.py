"""The embedded log's committed offsets: overwritten in place after a process's first commit,
read back whole or not at all, and a number written by hand still counts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipelines.errors import CorruptLogError
from pipelines.log import EmbeddedLog
from pipelines.log._offsets_file import parse, read, record
from pipelines.log.base import TopicPartition, TopicSpec

TP = TopicPartition("letters", 0)


def offsets_path(data_dir: Path) -> Path:
    return data_dir / "groups" / "readers" / "offsets" / "letters.0"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (record(4950), 4950),
        (record(0), 0),
        (b"4950", 4950),  # written by hand
        (b" 12\n", 12),
        (record(4950).replace(b"4950", b"4951"), None),  # the checksum of another number
        (record(123_456)[:16] + record(99)[16:], None),  # half of one write, half of another
        (b"garbage", None),
        (b"", None),
    ],
)
def test_a_record_is_read_whole_or_not_at_all(raw: bytes, expected: int | None) -> None:
    assert parse(raw) == expected


async def test_commits_after_the_first_overwrite_the_file_in_place(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("letters", 1)])
    log.store_offsets("readers", {TP: 10})
    path = offsets_path(tmp_path)
    first = path.stat().st_ino
    for offset in (20, 30):
        log.store_offsets("readers", {TP: offset})
        assert path.stat().st_ino == first  # the same file: no new file renamed over it
        assert path.read_bytes() == record(offset)
    assert await log.committed_offsets("readers", [TP]) == {TP: 30}
    await log.close()


async def test_a_number_written_by_hand_is_where_the_group_resumes(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("letters", 1)])
    log.store_offsets("readers", {TP: 10})
    await log.close()
    offsets_path(tmp_path).write_bytes(b"7\n")
    reopened = EmbeddedLog(tmp_path)
    assert await reopened.committed_offsets("readers", [TP]) == {TP: 7}
    reopened.store_offsets("readers", {TP: 8})  # a new process's first commit: the file whole
    assert offsets_path(tmp_path).read_bytes() == record(8)
    await reopened.close()


async def test_a_damaged_record_stops_the_reader(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("letters", 1)])
    log.store_offsets("readers", {TP: 10})
    offsets_path(tmp_path).write_bytes(record(4950).replace(b"4950", b"4951"))
    with pytest.raises(CorruptLogError, match="is damaged"):
        await log.committed_offsets("readers", [TP])
    await log.close()


def test_a_reader_racing_the_writer_sees_only_offsets_it_wrote(tmp_path: Path) -> None:
    """Another process's reads (the runner's lag, a new owner) while commits overwrite the file:
    every read is an offset written, in order, never a mix of two."""
    log = EmbeddedLog(tmp_path)
    path = offsets_path(tmp_path)
    log.store_offsets("readers", {TP: 1_000_000})
    done = threading.Event()

    def commit() -> None:
        offset = 1_000_000
        while not done.is_set():
            offset += 999_999  # most of the digits change each time
            log.store_offsets("readers", {TP: offset})

    writer = threading.Thread(target=commit)
    writer.start()
    seen = []
    try:
        for _ in range(20_000):
            found = read(path)
            assert found is not None
            seen.append(found[0])
    finally:
        done.set()
        writer.join()
    assert None not in seen
    assert seen == sorted(seen)
    assert all(offset is not None and (offset - 1_000_000) % 999_999 == 0 for offset in seen)
