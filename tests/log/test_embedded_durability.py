"""The embedded log under crashes and concurrency: real processes, ``kill -9``, torn writes."""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.logs import numbered

from pipelines.errors import CorruptLogError
from pipelines.log._local import GroupConsumer
from pipelines.log._partition_file import PartitionFile, encode_frame
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.embedded import EmbeddedLog

ROOT = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 15.0

# -- child processes -------------------------------------------------------------------------

_PRELUDE = """
import asyncio, sys
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.embedded import EmbeddedLog
data_dir, topic = sys.argv[1], sys.argv[2]
"""

# Appends batches of varied sizes round-robin to 3 partitions, forever; after each acknowledged
# batch prints "<partition> <last offset>". Values, keys and timestamps are the record's offset.
APPENDER = (
    _PRELUDE
    + """
async def main():
    log = EmbeddedLog(data_dir)
    producer = log.producer()
    ends = [0, 0, 0]
    i = 0
    while True:
        p, size = i % 3, 1 + (i * 37) % 400
        numbers = range(ends[p], ends[p] + size)
        batch = RawBatch(
            [b"k%d" % n for n in numbers], [b"%d" % n for n in numbers], list(numbers)
        )
        await producer.send(topic, p, batch)
        await producer.flush()
        ends[p] += size
        print(p, ends[p] - 1, flush=True)
        i += 1

asyncio.run(main())
"""
)

# Waits for "go" on stdin, then appends batches to partition 0; each record says which writer,
# batch and position in the batch it is: b"<writer>:<batch>:<index>".
CONCURRENT_WRITER = (
    _PRELUDE
    + """
writer, batches = int(sys.argv[3]), int(sys.argv[4])

async def main():
    log = EmbeddedLog(data_dir)
    producer = log.producer()
    print("ready", flush=True)
    sys.stdin.readline()
    for b in range(batches):
        size = 1 + (b * 31 + writer * 17) % 150
        values = [b"%d:%d:%d" % (writer, b, j) for j in range(size)]
        await producer.send(topic, 0, RawBatch([b"w%d" % writer] * size, values, [b] * size))
    await producer.close()
    print("done", flush=True)

asyncio.run(main())
"""
)

# A consumer-group member that commits what it consumed after every poll and on revocation.
GROUP_MEMBER = (
    _PRELUDE
    + """
group = sys.argv[3]
positions = {}

class Listener:
    async def on_assigned(self, partitions):
        print("assigned", *sorted(tp.partition for tp in partitions), flush=True)

    async def on_revoked(self, partitions):
        await consumer.commit({tp: positions[tp] for tp in partitions if tp in positions})
        for tp in partitions:
            positions.pop(tp, None)
        print("revoked", *sorted(tp.partition for tp in partitions), flush=True)

async def main():
    global consumer
    consumer = EmbeddedLog(data_dir).consumer(group)
    await consumer.subscribe([topic], Listener())
    while True:
        batches = await consumer.poll(100, 0.05)
        for batch in batches:
            positions[batch.topic_partition] = batch.next_offset
        if batches:
            await consumer.commit(positions)
            print("committed", *(f"{tp.partition}={n}" for tp, n in sorted(positions.items())),
                  flush=True)

asyncio.run(main())
"""
)


class Child:
    """A Python child process running ``script``, its stdout lines queued as they arrive."""

    def __init__(self, script: str, *args: object) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.endswith("\n"):  # a line cut short by kill -9 was never acknowledged
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, predicate: Callable[[str], bool], timeout: float = WAIT_SECONDS) -> str:
        """The next line that satisfies ``predicate`` (earlier lines are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out waiting for the child process"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"the child exited with {self.process.wait()}"
            if predicate(line):
                return line

    def rest(self) -> list[str]:
        """Every line still to come, once the process has ended."""
        self._reader.join(WAIT_SECONDS)
        lines = []
        while (line := self.lines.get_nowait()) is not None:
            lines.append(line)
        return lines

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(WAIT_SECONDS) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_SECONDS)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    """Starts children; whatever happens, none outlives the test."""
    started: list[Child] = []

    def start(script: str, *args: object) -> Child:
        child = Child(script, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


async def read_partition(log: EmbeddedLog, tp: TopicPartition, chunk: int = 333) -> RawBatch:
    """Every record of ``tp``, checking that offsets run on without gaps."""
    records = RawBatch([], [], [])
    offset = 0
    while True:
        fetched = await log.read(tp, offset, chunk)
        assert list(fetched.offsets) == list(range(offset, offset + len(fetched.records)))
        if not len(fetched.records):
            assert fetched.next_offset == offset
            return records
        records.keys.extend(fetched.records.keys)
        records.values.extend(fetched.records.values)
        records.timestamps.extend(fetched.records.timestamps)
        offset = fetched.next_offset


def assert_numbered(records: RawBatch, count: int) -> None:
    """``records`` are exactly the numbered records 0..count-1 (see :func:`numbered`)."""
    assert len(records) == count
    assert records.values == [b"%d" % n for n in range(count)]
    assert records.keys == [b"k%d" % n for n in range(count)]
    assert records.timestamps == list(range(count))


# -- (a) kill -9 while appending -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_acknowledged_records_survive_kill_9_of_the_writer(
    tmp_path: Path, children: Callable[..., Child]
) -> None:
    setup = EmbeddedLog(tmp_path)
    await setup.create_topics([TopicSpec("numbers", 3)])
    await setup.close()

    writer = children(APPENDER, tmp_path, "numbers")
    # let it get going, then kill it in the middle of its stream
    lines = [writer.expect(lambda _line: True) for _ in range(90)]
    writer.kill()
    acknowledged = [0, 0, 0]  # records acknowledged per partition
    for line in lines + writer.rest():
        partition, last = map(int, line.split())
        acknowledged[partition] = max(acknowledged[partition], last + 1)
    assert min(acknowledged) > 0

    log = EmbeddedLog(tmp_path)
    tps = [TopicPartition("numbers", p) for p in range(3)]
    ends = await log.end_offsets(tps)
    for tp in tps:
        assert ends[tp] >= acknowledged[tp.partition]  # maybe one more batch, never fewer
        assert_numbered(await read_partition(log, tp), ends[tp])

    # the log takes appends again right where it ends (a torn tail, if any, is cut)
    producer = log.producer()
    for tp in tps:
        await producer.send(tp.topic, tp.partition, numbered(ends[tp], 5))
    await producer.close()
    await log.close()
    reopened = EmbeddedLog(tmp_path)
    for tp in tps:
        assert_numbered(await read_partition(reopened, tp), ends[tp] + 5)
    await reopened.close()


# -- (b) torn writes -------------------------------------------------------------------------


def _torn_frame(base: int) -> bytes:
    return encode_frame(base, RawBatch([b"torn"] * 50, [b"x" * 40] * 50, [0] * 50))


TORN_TAILS: dict[str, Callable[[int], bytes]] = {
    "one byte": lambda base: _torn_frame(base)[:1],
    "part of the header": lambda base: _torn_frame(base)[:10],
    "the header": lambda base: _torn_frame(base)[:24],
    "part of the payload": lambda base: _torn_frame(base)[:200],
    "all but one byte": lambda base: _torn_frame(base)[:-1],
    # a whole frame's worth of bytes whose checksum fails: garbage behind a plausible length
    "complete-looking garbage": lambda base: _torn_frame(base)[:8] + b"\xab" * 2036,
    "zeros behind a length": lambda base: _torn_frame(base)[:4] + bytes(len(_torn_frame(base)) - 4),
    "flipped last byte": lambda base: _torn_frame(base)[:-1] + bytes([_torn_frame(base)[-1] ^ 1]),
    "huge length": lambda base: b"\xff\xff\xff\x7f" + _torn_frame(base)[4:100],
}


@pytest.mark.parametrize("tail", TORN_TAILS)
async def test_a_torn_tail_is_invisible_and_cut_by_the_next_append(
    tmp_path: Path, tail: str
) -> None:
    tp = TopicPartition("t", 0)
    first = EmbeddedLog(tmp_path)
    await first.create_topics([TopicSpec("t", 1)])
    producer = first.producer()
    for start, count in ((0, 3), (3, 4), (7, 5)):
        await producer.send("t", 0, numbered(start, count))
    assert_numbered(await read_partition(first, tp), 12)  # `first` has indexed the intact frames

    path = tmp_path / "topics" / "t" / "0.log"
    intact_size = path.stat().st_size
    torn = TORN_TAILS[tail](12)
    with path.open("ab") as file:  # a write cut short by a crash
        file.write(torn)
    assert path.stat().st_size == intact_size + len(torn)

    reader = EmbeddedLog(tmp_path)
    assert await reader.end_offsets([tp]) == {tp: 12}
    assert_numbered(await read_partition(reader, tp), 12)
    assert await first.end_offsets([tp]) == {tp: 12}
    assert_numbered(await read_partition(first, tp), 12)
    assert path.stat().st_size == intact_size + len(torn)  # readers leave the file alone

    writer = EmbeddedLog(tmp_path)
    await writer.producer().send("t", 0, numbered(12, 2))
    assert path.stat().st_size == intact_size + len(encode_frame(12, numbered(12, 2)))
    for log in (writer, reader, first, EmbeddedLog(tmp_path)):
        assert await log.end_offsets([tp]) == {tp: 14}
        assert_numbered(await read_partition(log, tp), 14)
        await log.close()


# -- (c) committed offsets -------------------------------------------------------------------


class _Quiet:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


async def test_committed_offsets_survive_a_reopen(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("t", 2)])
    producer = log.producer()
    for p in range(2):
        await producer.send("t", p, numbered(0, 10))
    consumer = log.consumer("g")
    await consumer.subscribe(["t"], _Quiet())
    await consumer.poll(100, 0.0)
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    await consumer.commit({tp0: 3, tp1: 10})
    await consumer.commit({tp0: 7})
    await consumer.close()
    await log.close()

    reopened = EmbeddedLog(tmp_path)
    assert await reopened.committed_offsets("g", [tp0, tp1]) == {tp0: 7, tp1: 10}
    assert await reopened.committed_offsets("other", [tp0, tp1]) == {}
    consumer = reopened.consumer("g")
    await consumer.subscribe(["t"], _Quiet())
    batches = await consumer.poll(100, 1.0)
    assert {(b.partition, tuple(b.offsets)) for b in batches} == {(0, (7, 8, 9))}
    await consumer.close()
    await reopened.close()


# -- (d) concurrent appenders ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_two_processes_append_to_one_partition(
    tmp_path: Path, children: Callable[..., Child]
) -> None:
    setup = EmbeddedLog(tmp_path)
    await setup.create_topics([TopicSpec("shared", 1)])
    await setup.close()
    batches = 400
    writers = [children(CONCURRENT_WRITER, tmp_path, "shared", w, batches) for w in (1, 2)]
    for writer in writers:
        writer.expect(lambda line: line == "ready")
    for writer in writers:
        writer.send("go")
    for writer in writers:
        writer.expect(lambda line: line == "done")
        assert writer.process.wait(WAIT_SECONDS) == 0

    def size(writer: int, batch: int) -> int:
        return 1 + (batch * 31 + writer * 17) % 150

    log = EmbeddedLog(tmp_path)
    records = await read_partition(log, TopicPartition("shared", 0), chunk=1000)
    expected = sum(size(w, b) for w in (1, 2) for b in range(batches))
    assert len(records) == expected
    # every batch is there once, whole and in order, and each writer's batches in its order
    runs: list[tuple[int, int]] = []
    position = 0
    while position < len(records):
        value = records.values[position]
        assert value is not None
        writer, batch, index = map(int, value.split(b":"))
        assert index == 0, "a batch was split or interleaved"
        count = size(writer, batch)
        assert records.values[position : position + count] == [
            b"%d:%d:%d" % (writer, batch, j) for j in range(count)
        ]
        assert set(records.keys[position : position + count]) == {b"w%d" % writer}
        runs.append((writer, batch))
        position += count
    assert len(runs) == len(set(runs)) == 2 * batches
    for w in (1, 2):
        assert [b for writer, b in runs if writer == w] == list(range(batches))
    switches = sum(a[0] != b[0] for a, b in itertools.pairwise(runs))
    print(f"the writers took turns {switches} times")  # how much they overlapped: it varies
    await log.close()


# -- (e) a group member killed with kill -9 --------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_killed_members_partitions_are_taken_over(
    tmp_path: Path, children: Callable[..., Child]
) -> None:
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("t", 4)])
    producer = log.producer()
    for p in range(4):
        await producer.send("t", p, numbered(0, 10))
    everything = frozenset(TopicPartition("t", p) for p in range(4))

    child = children(GROUP_MEMBER, tmp_path, "t", "g")
    child.expect(lambda line: line == "assigned 0 1 2 3")
    child.expect(lambda line: line == "committed 0=10 1=10 2=10 3=10")

    events: list[tuple[str, frozenset[TopicPartition]]] = []

    class Recorder:
        async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
            events.append(("assigned", partitions))

        async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
            events.append(("revoked", partitions))

    consumer = log.consumer("g")
    await consumer.subscribe(["t"], Recorder())
    seen: list[tuple[int, int]] = []

    async def poll_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not done():
            assert time.monotonic() < deadline, "timed out"
            for batch in await consumer.poll(100, 0.05):
                seen.extend((batch.partition, o) for o in batch.offsets)

    await poll_until(lambda: len(consumer.assignment()) == 2)  # the child handed two over
    child.expect(lambda line: line.startswith("revoked"))
    kept_by_child = everything - consumer.assignment()
    assert seen == []  # the child had committed everything it read

    child.kill()
    killed = time.monotonic()
    await poll_until(lambda: consumer.assignment() == everything)
    assert time.monotonic() - killed < 5.0
    assert events[-1] == ("assigned", kept_by_child)
    assert not [kind for kind, _ in events if kind == "revoked"]
    assert isinstance(consumer, GroupConsumer)
    members = (tmp_path / "groups" / "g" / "members").iterdir()
    # the dead member's file was cleaned up
    assert [p.name for p in members if not p.name.startswith(".")] == [consumer.member_id]

    # the survivor resumes from the dead member's commits: only new records arrive
    for p in range(4):
        await producer.send("t", p, numbered(10, 3))
    await poll_until(lambda: len(seen) >= 12)
    assert sorted(seen) == [(p, n) for p in range(4) for n in (10, 11, 12)]
    await consumer.close()
    await log.close()


# -- (f) a reader racing the writer that cuts a torn tail -------------------------------------


@pytest.mark.parametrize("written", [0, 3, 10, 24, 60])
def test_a_reader_racing_the_cut_of_a_torn_tail_sees_no_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: int
) -> None:
    """A reader that took the file's size while a torn tail was there must not call the log
    corrupt when, before it reads, a writer cuts the tail and starts writing its own frame
    (``written`` bytes of it so far)."""
    path = tmp_path / "0.log"
    setup = PartitionFile(path)
    for start, count in ((0, 3), (3, 4), (7, 5)):
        setup.append(numbered(start, count))
    setup.close()
    with path.open("ab") as file:
        file.write(_torn_frame(12)[:1500])  # most of a big frame, cut short by a crash

    reader = PartitionFile(path)
    assert reader.end_offset() == 12
    writer = PartitionFile(path)
    new_frame = encode_frame(12, numbered(12, 2))
    real_fstat = os.fstat
    raced = False

    def fstat(fd: int) -> os.stat_result:
        nonlocal raced
        result = real_fstat(fd)
        if fd == reader._active._fd and not raced:  # right after the reader took the size
            raced = True
            writer._active._recover_tail()  # as append does under its lock: cut the torn tail...
            os.write(writer._active._fd, new_frame[:written])  # ...and start writing
        return result

    monkeypatch.setattr(os, "fstat", fstat)
    assert reader.end_offset() == 12  # the new frame is not complete yet
    assert raced
    monkeypatch.undo()

    os.write(writer._active._fd, new_frame[written:])  # the writer finishes its frame
    assert reader.end_offset() == 14
    records, _, next_offset = reader.read(0, 100)
    assert next_offset == 14
    assert_numbered(records, 14)
    reader.close()
    writer.close()


# -- (g) real corruption is reported, not skipped --------------------------------------------


async def test_a_corrupt_frame_inside_the_log_raises(tmp_path: Path) -> None:
    """A reader takes the end offset from the acknowledged frames' headers, which are intact
    here; reading the records checks each frame, and the damaged one raises."""
    tp = TopicPartition("t", 0)
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("t", 1)])
    producer = log.producer()
    for start, count in ((0, 3), (3, 4), (7, 5)):
        await producer.send("t", 0, numbered(start, count))
    await log.close()
    path = tmp_path / "topics" / "t" / "0.log"
    second_frame = len(encode_frame(0, numbered(0, 3)))
    data = bytearray(path.read_bytes())
    data[second_frame + 30] ^= 0xFF  # a bit flip in the second of three frames
    path.write_bytes(bytes(data))

    reopened = EmbeddedLog(tmp_path)
    assert await reopened.end_offsets([tp]) == {tp: 12}
    assert len((await reopened.read(tp, 0, 3)).records) == 3  # the first frame is intact
    with pytest.raises(CorruptLogError, match="fails its checksum"):
        await reopened.read(tp, 3, 100)
    await reopened.close()


DAMAGE = {
    # the high byte of the middle frame's length: everything after it looks like one torn frame
    "a flipped length in the middle": lambda data, frames: _flip(data, frames[1] + 3),
    # a complete last frame whose payload no longer matches its checksum
    "a bad checksum in the last frame": lambda data, frames: _flip(data, len(data) - 5),
    # acknowledged bytes removed from the end of the file
    "a truncated file": lambda data, frames: data[: len(data) - 20],
}


def _flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0xFF
    return bytes(changed)


@pytest.mark.parametrize("damage", DAMAGE)
async def test_damage_below_the_acknowledged_end_is_never_cut(tmp_path: Path, damage: str) -> None:
    """Damage to acknowledged frames is not a torn write: the next writer stops with an error
    that names the file and cuts nothing, so the intact records after it stay on disk."""
    tp = TopicPartition("t", 0)
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("t", 1)])
    producer = log.producer()
    for start, count in ((0, 3), (3, 4), (7, 5)):
        await producer.send("t", 0, numbered(start, count))
    await log.close()
    path = tmp_path / "topics" / "t" / "0.log"
    frames = [0, len(encode_frame(0, numbered(0, 3)))]
    damaged = DAMAGE[damage](path.read_bytes(), frames)
    path.write_bytes(damaged)

    reader = EmbeddedLog(tmp_path)
    with pytest.raises(CorruptLogError):  # not a shorter partition that looks fine
        await reader.read(tp, 0, 100)
    await reader.close()
    writer = EmbeddedLog(tmp_path)
    with pytest.raises(CorruptLogError) as caught:
        await writer.producer().send("t", 0, numbered(12, 2))
    await writer.close()
    assert str(path) in str(caught.value)
    assert "Nothing is cut" in str(caught.value)
    assert path.read_bytes() == damaged


HEADER_DAMAGE = {
    # (where, in a frame of three: the middle or the last; the header field's byte), and
    # whether the end offset can still be told (from the frames after the damage)
    "the middle frame's base": ((1, 8), False),
    "the middle frame's count": ((1, 16), True),
    "the middle frame's length": ((1, 0), False),
    "the last frame's count": ((2, 16), False),
    "the last frame's base": ((2, 8), False),
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
async def test_a_damaged_header_never_moves_the_end_offset(tmp_path: Path, damage: str) -> None:
    """A reader indexes acknowledged frames from their headers alone, except the last: each
    header's base must follow the frame before it, and the last frame is checked whole. So a
    damaged header either raises or leaves the end offset right; its records never read."""
    tp = TopicPartition("t", 0)
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("t", 1)])
    producer = log.producer()
    batches = ((0, 3), (3, 4), (7, 5))
    for start, count in batches:
        await producer.send("t", 0, numbered(start, count))
    await log.close()
    path = tmp_path / "topics" / "t" / "0.log"
    frames = list(itertools.accumulate(len(encode_frame(s, numbered(s, n))) for s, n in batches))
    (frame, field), end_is_known = HEADER_DAMAGE[damage]
    path.write_bytes(_flip(path.read_bytes(), [0, *frames][frame] + field))

    reader = EmbeddedLog(tmp_path)
    if end_is_known:
        assert await reader.end_offsets([tp]) == {tp: 12}
    else:
        with pytest.raises(CorruptLogError):
            await reader.end_offsets([tp])
    with pytest.raises(CorruptLogError):
        await reader.read(tp, 0, 100)
    await reader.close()


async def test_a_commit_applied_between_listing_and_locking_is_left_alone(
    tmp_path: Path,
) -> None:
    """A recovery lists a group's pending commits, and one of them is applied and removed by
    its writer before the recovery locks it: the recovery must skip it, not create an empty
    commit file in its place (which every later recovery failed to read, so workers that
    claimed the group's partitions crashed over and over). An empty commit file left by that
    is removed."""
    log = EmbeddedLog(tmp_path)
    await log.create_topics([TopicSpec("out", 1)])
    commits = tmp_path / "groups" / "g" / "commits"
    commits.mkdir(parents=True)
    gone = commits / f"{7:016x}-1.commit"  # listed, then applied and removed by its writer
    log._recover(gone)
    assert not gone.exists()
    assert os.listdir(commits) == []

    (commits / f"{8:016x}-1.commit").touch()  # what that left behind before
    log.recover_transactions("g")
    assert os.listdir(commits) == []
    assert await log.end_offsets([TopicPartition("out", 0)]) == {TopicPartition("out", 0): 0}
