"""``headwater log check [--repair]`` on real, damaged partition files, through the real CLI.

Every test writes a topic of numbered records (frames of 100 records; each value says its
partition and offset), damages a file the way a disk or a person can, and asserts exactly what
the check reports, which offsets a repair loses, which bytes it quarantines, and that every
other record is still read at its original offset afterwards, by readers and by a pipeline run.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support.cli import headwater

from pipelines.errors import CorruptLogError
from pipelines.log._local import GroupConsumer
from pipelines.log._partition_file import PartitionFile, encode_frame
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.embedded import EmbeddedLog
from pipelines.runtime.runlock import run_lock

FRAMES = 50  # per partition
PER_FRAME = 100  # records per frame
RECORDS = FRAMES * PER_FRAME
NUMBERS = TopicPartition("numbers", 0)  # the partition the tests damage; partition 1 stays intact


def text(result: subprocess.CompletedProcess[str]) -> str:
    """stdout with its lines wrapped back into one (the summary is wrapped at 100 columns)."""
    assert "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stdout.split())


def value(partition: int, offset: int) -> bytes:
    return orjson.dumps({"p": partition, "n": offset})


def batch(partition: int, start: int) -> RawBatch:
    numbers = range(start, start + PER_FRAME)
    return RawBatch(
        [b"k%d" % n for n in numbers], [value(partition, n) for n in numbers], list(numbers)
    )


async def _write_numbers(data_dir: Path) -> None:
    log = EmbeddedLog(data_dir)
    await log.create_topics([TopicSpec("numbers", 2)])
    producer = log.producer()
    for start in range(0, RECORDS, PER_FRAME):
        for partition in (0, 1):
            await producer.send("numbers", partition, batch(partition, start))
    await log.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory whose topic ``numbers`` has 2 partitions of 5,000 records, 50 frames."""
    asyncio.run(_write_numbers(tmp_path / ".headwater"))
    return tmp_path / ".headwater"


def partition_file(data_dir: Path, partition: int = 0) -> Path:
    return data_dir / "topics" / "numbers" / f"{partition}.log"


def frame_positions(path: Path) -> list[int]:
    """The byte position of each frame of an intact file, and the file's end last."""
    data = path.read_bytes()
    positions = [0]
    while positions[-1] < len(data):
        positions.append(positions[-1] + 24 + struct.unpack_from("<I", data, positions[-1])[0])
    return positions


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def read_everything(data_dir: Path, tp: TopicPartition = NUMBERS) -> dict[int, bytes | None]:
    """Offset -> value of every record of ``tp``, read as consumers read (holes skipped),
    checking that each read returns consecutive offsets."""

    async def read() -> dict[int, bytes | None]:
        log = EmbeddedLog(data_dir)
        found: dict[int, bytes | None] = {}
        offset = 0
        while True:
            fetched = await log.read(tp, offset, 333)
            assert list(fetched.offsets) == list(range(offset, offset + len(fetched.records)))
            if not len(fetched.records) and fetched.next_offset == offset:
                await log.close()
                return found
            found.update(zip(fetched.offsets, fetched.records.values, strict=True))
            offset = fetched.next_offset

    return asyncio.run(read())


def expected(lost: range, end: int = RECORDS, partition: int = 0) -> dict[int, bytes | None]:
    return {n: value(partition, n) for n in range(end) if n not in lost}


def quarantine_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "topics" / "numbers").glob("*.quarantine.*[0-9]"))


def append(data_dir: Path, records: RawBatch) -> int | None:
    file = PartitionFile(partition_file(data_dir))
    try:
        return file.append(records)
    finally:
        file.close()


def one(offset: int) -> RawBatch:
    """The numbered record of ``offset`` on partition 0, to append."""
    return RawBatch([b"k%d" % offset], [value(0, offset)], [offset])


# -- nothing wrong ---------------------------------------------------------------------------


def test_an_intact_log_checks_out(data_dir: Path) -> None:
    size = partition_file(data_dir).stat().st_size
    result = headwater("log", "check", "--data-dir", data_dir, cwd=data_dir.parent)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"numbers[0]: OK, 50 frames, 5,000 records, {size:,} bytes (acknowledged to byte {size:,})"
    )
    assert lines[1].startswith("numbers[1]: OK, 50 frames, 5,000 records")
    assert text(result).endswith(
        f"headwater: 2 partitions of 1 topic in {data_dir}: every acknowledged record is intact"
    )


def test_the_default_data_dir_and_topic_selection(data_dir: Path) -> None:
    asyncio.run(_create(data_dir, "other", 3))
    flip(partition_file(data_dir), frame_positions(partition_file(data_dir))[3] + 40)
    only_other = headwater("log", "check", "other", cwd=data_dir.parent)  # .headwater
    assert only_other.returncode == 0, only_other
    assert [line.split(":")[0] for line in only_other.stdout.splitlines()[:3]] == [
        "other[0]",
        "other[1]",
        "other[2]",
    ]
    assert "3 partitions of 1 topic" in text(only_other)
    everything = headwater("log", "check", cwd=data_dir.parent)
    assert everything.returncode == 1
    assert "5 partitions of 2 topics" in text(everything)


async def _create(data_dir: Path, name: str, partitions: int) -> None:
    log = EmbeddedLog(data_dir)
    await log.create_topics([TopicSpec(name, partitions)])
    await log.close()


def test_user_errors(tmp_path: Path, data_dir: Path) -> None:
    nowhere = headwater("log", "check", "--data-dir", tmp_path / "nowhere", cwd=tmp_path)
    assert nowhere.returncode == 2
    assert "no embedded log at" in nowhere.stderr and "--data-dir" in nowhere.stderr
    missing = headwater("log", "check", "numbers", "nosuch", cwd=tmp_path)
    assert missing.returncode == 2
    assert "no topic 'nosuch' in .headwater" in " ".join(missing.stderr.split())
    (data_dir / "topics" / "numbers" / "topic.json").write_text('{"partitions": ')
    unreadable = headwater("log", "check", cwd=tmp_path)
    assert unreadable.returncode == 2
    assert "cannot read the partition count of topic 'numbers' from" in unreadable.stderr


# -- a torn tail is not damage ---------------------------------------------------------------


def test_a_torn_tail_is_reported_and_left_to_the_next_writer(data_dir: Path) -> None:
    path = partition_file(data_dir)
    acknowledged = path.stat().st_size
    torn = encode_frame(RECORDS, batch(0, RECORDS))[:300]  # a write cut short by a crash
    with path.open("ab") as file:
        file.write(torn)
    before = path.read_bytes()

    for args in (("log", "check"), ("log", "check", "--repair")):
        result = headwater(*args, cwd=data_dir.parent)
        assert result.returncode == 0, result
        assert result.stdout.splitlines()[0] == (
            f"numbers[0]: OK, 50 frames, 5,000 records, {acknowledged + 300:,} bytes "
            f"(acknowledged to byte {acknowledged:,}); a torn write of 300 bytes past the "
            "acknowledged end (harmless: the next writer cuts it off)"
        )
        assert "every acknowledged record is intact" in text(result)
    assert path.read_bytes() == before  # --repair leaves a torn tail to the next writer
    assert quarantine_files(data_dir) == []
    assert append(data_dir, one(RECORDS)) == RECORDS
    assert path.stat().st_size == acknowledged + len(encode_frame(RECORDS, one(RECORDS)))


# -- damage in the middle: a flipped length field, a bad checksum ----------------------------


def test_a_flipped_length_in_the_middle_loses_exactly_its_frame(data_dir: Path) -> None:
    path = partition_file(data_dir)
    positions = frame_positions(path)
    start, end = positions[10], positions[11]  # the frame of offsets 1000-1099
    original = path.read_bytes()
    flip(path, start + 3)  # the high byte of its length: everything after it looks torn
    damaged = path.read_bytes()
    with pytest.raises(CorruptLogError, match="headwater log check --repair"):
        append(data_dir, one(RECORDS))

    checked = headwater("log", "check", cwd=data_dir.parent)
    assert checked.returncode == 1, checked
    assert checked.stdout.splitlines()[0] == (
        f"numbers[0]: DAMAGED, 49 frames, 4,900 records, {len(original):,} bytes (acknowledged "
        f"to byte {len(original):,}); the frame at byte {start:,} is damaged (its length is "
        f"wrong): offsets 1,000 to 1,099 lost (100 records), frames resume at byte {end:,}"
    )
    assert checked.stdout.splitlines()[1].startswith("numbers[1]: OK, 50 frames, 5,000 records")
    assert "1 partition damaged: numbers[0] offsets 1,000 to 1,099 lost (100 records)" in (
        text(checked)
    )
    assert "run `headwater log check --repair`" in text(checked)
    assert path.read_bytes() == damaged  # checking changes nothing

    opened_before = PartitionFile(path)  # a process that has the old file open
    repaired = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert repaired.returncode == 0, repaired
    [quarantine] = quarantine_files(data_dir)
    assert repaired.stdout.splitlines()[0] == (
        "numbers[0]: REPAIRED, offsets 1,000 to 1,099 lost (100 records); the damaged bytes are "
        f"in .headwater/topics/numbers/{quarantine.name} (described in "
        f".headwater/topics/numbers/{quarantine.name}.json)"
    )
    assert (
        "repaired 1 partition, every other record kept at its offset. Lost: numbers[0] "
        "offsets 1,000 to 1,099 lost (100 records)"
    ) in text(repaired)

    # the quarantine holds exactly the damaged frame's bytes, as they were on disk
    assert quarantine.read_bytes() == damaged[start:end]
    about = orjson.loads(quarantine.with_name(quarantine.name + ".json").read_bytes())
    assert about["ranges"] == [
        {
            "partition_file_bytes": [start, end],
            "quarantine_file_bytes": [0, end - start],
            "what": f"the frame at byte {start:,} is damaged (its length is wrong)",
            "first_lost_offset": 1000,
            "last_lost_offset": 1099,
            "lost_count_known": True,
        }
    ]
    # every other frame is where it was, byte for byte; the hole takes the damaged one's place
    repaired_bytes = path.read_bytes()
    assert repaired_bytes[:start] == original[:start]
    assert repaired_bytes[end:] == original[end:]
    assert len(repaired_bytes) == len(original)

    assert read_everything(data_dir) == expected(range(1000, 1100))
    assert read_everything(data_dir, TopicPartition("numbers", 1)) == expected(
        range(0), partition=1
    )
    with pytest.raises(CorruptLogError, match="was replaced"):
        opened_before.append(one(RECORDS))
    opened_before.close()
    assert append(data_dir, one(RECORDS)) == RECORDS  # appends go on after the last offset

    again = headwater("log", "check", cwd=data_dir.parent)
    assert again.returncode == 0, again
    assert again.stdout.splitlines()[0].startswith("numbers[0]: OK, 51 frames, 4,901 records")
    assert again.stdout.splitlines()[0].endswith(
        "; offsets 1,000 to 1,099 lost (100 records) in an earlier repair"
    )

    # a pipeline over the repaired topic processes every intact record once, and nothing else
    ran = run_copy_pipeline(data_dir.parent)
    outputs = Counter((v["p"], v["n"]) for v in ran)
    wanted = {(0, n) for n in range(RECORDS + 1) if not 1000 <= n < 1100}
    assert set(outputs) == wanted | {(1, n) for n in range(RECORDS)}
    assert set(outputs.values()) == {1}


def test_a_bad_checksum_in_a_middle_frame(data_dir: Path) -> None:
    path = partition_file(data_dir)
    positions = frame_positions(path)
    start, end = positions[20], positions[21]  # the frame of offsets 2000-2099
    flip(path, start + 200)  # a byte of its payload
    with pytest.raises(CorruptLogError, match="headwater log check --repair"):
        append(data_dir, one(RECORDS))

    checked = headwater("log", "check", "numbers", cwd=data_dir.parent)
    assert checked.returncode == 1, checked
    assert (
        f"; the frame at byte {start:,} fails its checksum: offsets 2,000 to 2,099 lost "
        f"(100 records), frames resume at byte {end:,}"
    ) in checked.stdout.splitlines()[0]

    repaired = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert repaired.returncode == 0, repaired
    assert "numbers[0]: REPAIRED, offsets 2,000 to 2,099 lost (100 records)" in repaired.stdout
    [quarantine] = quarantine_files(data_dir)
    assert len(quarantine.read_bytes()) == end - start
    assert read_everything(data_dir) == expected(range(2000, 2100))


def test_two_damaged_frames_in_one_partition(data_dir: Path) -> None:
    path = partition_file(data_dir)
    positions = frame_positions(path)
    flip(path, positions[5] + 3)  # offsets 500-599
    flip(path, positions[30] + 100)  # offsets 3000-3099
    flip(path, positions[31] + 100)  # offsets 3100-3199: next to the one before
    checked = headwater("log", "check", cwd=data_dir.parent)
    assert checked.returncode == 1
    assert (
        "numbers[0] offsets 500 to 599 lost (100 records); offsets 3,000 to 3,199 lost "
        "(200 records)"
    ) in text(checked)
    repaired = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert repaired.returncode == 0, repaired
    kept = {n: v for n, v in expected(range(500, 600)).items() if not 3000 <= n < 3200}
    assert read_everything(data_dir) == kept
    [quarantine] = quarantine_files(data_dir)
    lost = positions[6] - positions[5] + positions[32] - positions[30]
    assert len(quarantine.read_bytes()) == lost


def test_junk_between_frames_loses_nothing(data_dir: Path) -> None:
    """Bytes inserted between two frames (shorter than a frame header): no offset is lost,
    the junk is quarantined and a hole of no offsets takes its place."""
    path = partition_file(data_dir)
    positions = frame_positions(path)
    data = path.read_bytes()
    junk = b"\x5a" * 10
    path.write_bytes(data[: positions[10]] + junk + data[positions[10] :])
    checked = headwater("log", "check", cwd=data_dir.parent)
    assert checked.returncode == 1, checked
    assert (
        f"the frame at byte {positions[10]:,} is damaged (its length is wrong): no records lost "
        f"(the damaged bytes lie between intact frames), frames resume at byte "
        f"{positions[10] + 10:,}"
    ) in checked.stdout.splitlines()[0]
    repaired = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert repaired.returncode == 0, repaired
    [quarantine] = quarantine_files(data_dir)
    assert quarantine.read_bytes() == junk
    assert path.stat().st_size == len(data) + 24  # a hole is at least a header
    assert read_everything(data_dir) == expected(range(0))
    assert headwater("log", "check", cwd=data_dir.parent).returncode == 0
    assert append(data_dir, one(RECORDS)) == RECORDS


# -- damage at the end: the number of records lost is not written anywhere --------------------


def test_a_file_truncated_below_its_acknowledged_end(data_dir: Path) -> None:
    path = partition_file(data_dir)
    positions = frame_positions(path)
    acknowledged = positions[-1]
    last = positions[-2]  # the frame of offsets 4900-4999
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CorruptLogError, match="headwater log check --repair"):
        append(data_dir, one(RECORDS))

    checked = headwater("log", "check", cwd=data_dir.parent)
    assert checked.returncode == 1, checked
    assert checked.stdout.splitlines()[0] == (
        f"numbers[0]: DAMAGED, 49 frames, 4,900 records, {acknowledged - 20:,} bytes "
        f"(acknowledged to byte {acknowledged:,}); the file ends at byte {acknowledged - 20:,}, "
        f"inside the frame at byte {last:,} and before its acknowledged end at byte "
        f"{acknowledged:,}: offsets 4,900 to 4,999 lost at least (100 records, by the damaged "
        "frame's header); no intact frame follows, so whether more were lost cannot be known"
    )

    repaired = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert repaired.returncode == 0, repaired
    assert "; new records get offsets from 5,000 on; the damaged bytes are in" in repaired.stdout
    [quarantine] = quarantine_files(data_dir)
    assert len(quarantine.read_bytes()) == acknowledged - 20 - last
    assert path.stat().st_size == acknowledged  # a hole fills the acknowledged bytes
    assert read_everything(data_dir) == expected(range(4900, 5000))
    assert append(data_dir, one(RECORDS)) == RECORDS  # the lost offsets are never reused

    # a run over it finishes: the consumer commits past the hole at the end of the partition
    ran = run_copy_pipeline(data_dir.parent)
    outputs = Counter((v["p"], v["n"]) for v in ran)
    kept = {(0, n) for n in range(4900)} | {(0, RECORDS)}
    assert set(outputs) == kept | {(1, n) for n in range(RECORDS)}
    assert set(outputs.values()) == {1}


def test_frames_cut_off_whole_keep_the_offsets_a_group_committed(data_dir: Path) -> None:
    """Two whole frames removed from the end (4800-4999): nothing says how many records
    there were, but a consumer group committed offset 4950, so at least 4800-4949 existed."""
    path = partition_file(data_dir)
    positions = frame_positions(path)
    path.write_bytes(path.read_bytes()[: positions[-3]])
    offsets = data_dir / "groups" / "readers" / "offsets"
    offsets.mkdir(parents=True)
    (offsets / "numbers.0").write_bytes(b"4950")

    checked = headwater("log", "check", cwd=data_dir.parent)
    assert checked.returncode == 1, checked
    assert (
        f"the file ends at byte {positions[-3]:,}, before its acknowledged end "
        f"({positions[-1]:,}): offsets 4,800 to 4,949 lost at least (150 records, by the "
        "offsets consumer groups committed)"
    ) in checked.stdout.splitlines()[0]
    repaired = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert repaired.returncode == 0, repaired
    assert "; new records get offsets from 4,950 on;" in repaired.stdout
    [quarantine] = quarantine_files(data_dir)
    assert quarantine.read_bytes() == b""  # the bytes are gone: nothing to keep
    assert read_everything(data_dir) == expected(range(4800, 5000), end=4800)
    assert append(data_dir, one(4950)) == 4950


# -- repairing refuses while the log is in use ------------------------------------------------


def test_repair_refuses_while_a_runner_or_member_uses_the_log(data_dir: Path) -> None:
    path = partition_file(data_dir)
    flip(path, frame_positions(path)[10] + 3)
    damaged = path.read_bytes()
    with run_lock(data_dir, "copy"):
        result = headwater("log", "check", "--repair", cwd=data_dir.parent)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "cannot repair the log in .headwater while it is in use, by the runner of " in message
    assert f"pipeline 'copy' (pid {os.getpid()})" in message

    member = EmbeddedLog(data_dir).membership("readers")
    try:
        result = headwater("log", "check", "--repair", cwd=data_dir.parent)
    finally:
        member.leave()
    assert result.returncode == 2
    assert "a member of consumer group 'readers'" in " ".join(result.stderr.split())
    assert path.read_bytes() == damaged
    assert quarantine_files(data_dir) == []


# -- readers and consumers at a hole ---------------------------------------------------------


@pytest.fixture
def holed(data_dir: Path) -> Iterator[Path]:
    """``numbers[0]`` with offsets 1000-1099 lost to a repair."""
    path = partition_file(data_dir)
    flip(path, frame_positions(path)[10] + 3)
    assert headwater("log", "check", "--repair", cwd=data_dir.parent).returncode == 0
    yield data_dir


def test_a_read_stops_at_a_hole_and_one_in_it_skips_it(holed: Path) -> None:
    file = PartitionFile(partition_file(holed))
    records, _, next_offset = file.read(950, 500)
    assert (len(records), next_offset) == (50, 1000)  # only the records before the hole
    assert file.read(1000, 500)[0].values == []
    assert file.read(1000, 500)[2] == 1100  # no records, and the offset after the hole
    assert file.read(1042, 5) == (RawBatch([], [], [], None), range(1100, 1100), 1100)
    records, _, next_offset = file.read(1100, 5)
    assert (records.values, next_offset) == ([value(0, n) for n in range(1100, 1105)], 1105)
    assert file.end_offset() == RECORDS
    file.close()


async def test_a_consumer_moves_past_a_hole_and_commits_it(holed: Path) -> None:
    log = EmbeddedLog(holed)
    consumer = log.consumer("g")
    assert isinstance(consumer, GroupConsumer)

    class Quiet:
        async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
            return None

        async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
            return None

    log.store_offsets("g", {NUMBERS: 990, TopicPartition("numbers", 1): RECORDS})
    await consumer.subscribe(["numbers"], Quiet())
    polls = [await consumer.poll(1000, 1.0) for _ in range(3)]
    seen = [(b.partition, list(b.offsets), b.next_offset) for poll in polls for b in poll]
    assert seen == [
        (0, list(range(990, 1000)), 1000),
        (0, [], 1100),  # the hole: no records, but the position moves on
        (0, list(range(1100, 2100)), 2100),
    ]
    await consumer.commit({NUMBERS: 1100})
    assert await log.committed_offsets("g", [NUMBERS]) == {NUMBERS: 1100}
    await consumer.close()
    await log.close()


# -- a pipeline run ----------------------------------------------------------------------------

COPY = """
import connectors
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("copy")
    .source(LogTopic(Topic("numbers", partitions=2)))
    .sink(connectors.JsonLinesSink("out.jsonl"))
)
"""


def run_copy_pipeline(cwd: Path) -> list[dict[str, int]]:
    """Run a pipeline copying every value of ``numbers`` to out.jsonl; the values written."""
    (cwd / "copy_numbers.py").write_text(COPY)
    result = headwater("run", "copy_numbers.py", "--no-progress", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "copy finished" in result.stderr, result.stderr
    assert "dead letters" not in result.stderr, result.stderr
    return [orjson.loads(line) for line in (cwd / "out.jsonl").read_bytes().splitlines()]
