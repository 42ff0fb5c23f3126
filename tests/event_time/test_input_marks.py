"""What a task knows of its inputs' progress (:class:`~pipelines.runtime.watermarks.InputMarks`),
with an injected clock: nothing here waits for real time to pass; and the markers a task writes
for the tasks downstream when it hands its partitions over."""

from __future__ import annotations

import orjson

import connectors
from operators.windows import Tumbling
from pipelines import Pipeline, Topic
from pipelines.log.base import FetchedBatch, RawBatch, TopicPartition
from pipelines.log.memory import MemoryLog
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.task import Task
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watermarks import (
    END_OF_TIME,
    NO_WATERMARK,
    InputMarks,
    marker_batch,
    split_markers,
)

IDLE_MS = 10_000
EXTERNAL = TopicPartition("clicks", 0)
INTERNAL = TopicPartition("p.by-user", 0)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self.wall = 1_780_000_000_000

    def monotonic(self) -> float:
        return self.seconds

    def wall_ms(self) -> int:
        return self.wall

    def sleep(self, seconds: float) -> None:
        self.seconds += seconds
        self.wall += int(seconds * 1000)


def marks_of(
    clock: FakeClock, *, writers: frozenset[str] = frozenset({"0.0", "0.1"})
) -> InputMarks:
    return InputMarks(
        {EXTERNAL: (False, frozenset({"source"})), INTERNAL: (True, writers)},
        idle_ms=IDLE_MS,
        clock=clock,
    )


def test_the_mark_is_the_smallest_over_inputs_and_writers() -> None:
    marks = marks_of(FakeClock())
    marks.observe(EXTERNAL, [500, 300])
    assert marks.mark(idle=False) == NO_WATERMARK  # no writer of the internal input spoke yet
    marks.marked(INTERNAL, [("0.0", 900)])
    assert marks.mark(idle=False) == NO_WATERMARK  # writer 0.1 has said nothing: it holds back
    marks.marked(INTERNAL, [("0.1", 400)])
    assert marks.mark(idle=False) == 400
    marks.marked(INTERNAL, [("0.1", 2000), ("0.0", 800)])  # a writer's mark never goes back
    assert marks.mark(idle=False) == 500  # now the external input is the slowest


def test_markers_of_writers_the_topology_does_not_know_are_ignored() -> None:
    marks = marks_of(FakeClock(), writers=frozenset({"0.0"}))
    marks.observe(EXTERNAL, [5000])
    marks.marked(INTERNAL, [("9.9", 4000)])
    assert marks.mark(idle=False) == NO_WATERMARK
    marks.marked(INTERNAL, [("0.0", 4000)])
    assert marks.mark(idle=False) == 4000


def test_an_external_input_ends_when_its_sources_say_so() -> None:
    marks = InputMarks(
        {EXTERNAL: (False, frozenset({"a", "b"}))}, idle_ms=IDLE_MS, clock=FakeClock()
    )
    marks.observe(EXTERNAL, [100])
    marks.marked(EXTERNAL, [("a", END_OF_TIME)])
    assert marks.mark(idle=False) == 100  # source b may still write
    marks.marked(EXTERNAL, [("b", END_OF_TIME)])
    assert marks.mark(idle=False) == END_OF_TIME


def test_a_quiet_external_input_follows_the_wall_clock_only_when_the_worker_is_idle() -> None:
    clock = FakeClock()
    marks = InputMarks({EXTERNAL: (False, frozenset())}, idle_ms=IDLE_MS, clock=clock)
    marks.observe(EXTERNAL, [100])
    clock.sleep(IDLE_MS / 1000 - 0.001)
    assert marks.mark(idle=True) == 100  # not quiet for long enough yet
    clock.sleep(0.002)
    assert marks.mark(idle=False) == 100  # a worker catching up never moves it by the clock
    assert marks.mark(idle=True) == clock.wall


def test_a_restored_input_is_quiet_only_once_idle_has_passed_after_the_first_idle_check() -> None:
    """A task that restored its state and has read nothing yet must not take its inputs for
    idle at once, however long the restore took (the regression of 2e680bf)."""
    clock = FakeClock()
    marks = InputMarks({EXTERNAL: (False, frozenset())}, idle_ms=IDLE_MS, clock=clock)
    clock.sleep(3600)  # a long restore before the first check
    assert marks.mark(idle=True) == NO_WATERMARK  # the timer starts now
    clock.sleep(IDLE_MS / 1000 - 0.001)
    assert marks.mark(idle=True) == NO_WATERMARK
    clock.sleep(0.002)
    assert marks.mark(idle=True) == clock.wall


def test_records_restart_the_idle_timer() -> None:
    clock = FakeClock()
    marks = InputMarks({EXTERNAL: (False, frozenset())}, idle_ms=IDLE_MS, clock=clock)
    marks.observe(EXTERNAL, [100])
    clock.sleep(IDLE_MS / 1000 - 1)
    marks.observe(EXTERNAL, [200])
    clock.sleep(2)
    assert marks.mark(idle=True) == 200


def test_markers_are_split_from_records_in_order() -> None:
    data = RawBatch([b"k1", None], [b"v1", b"v2"], [1, 2])
    batch = RawBatch([], [], [])
    batch.extend(data)
    batch.extend(marker_batch("0.3", 1234, 99))
    batch.extend(RawBatch([b"k3"], [None], [3]))  # a tombstone is a record, not a marker
    fetched = FetchedBatch("t", 0, batch, [10, 11, 12, 13], 14)
    records, markers = split_markers(fetched)
    assert markers == [("0.3", 1234)]
    assert records.records.values == [b"v1", b"v2", None]
    assert list(records.offsets) == [10, 11, 13]
    assert records.next_offset == 14


async def _markers(log: MemoryLog, topic: str) -> dict[int, list[tuple[str, int]]]:
    """Partition -> the (writer, mark) of every marker on ``topic``."""
    found: dict[int, list[tuple[str, int]]] = {}
    for partition in range((await log.describe_topics())[topic].partitions):
        fetched = await log.read(TopicPartition(topic, partition), 0, 1000)
        found[partition] = split_markers(fetched)[1]
    return found


async def test_a_task_handing_over_leaves_its_markers_to_the_next_owner() -> None:
    """A task whose mark moved since its last checkpoint hands its partition over (a rebalance,
    or its worker stopping): it keeps the mark in its state but writes no marker, which nobody
    would read at the end of a run; the next owner restores the mark and writes the markers at
    its first checkpoint, once."""
    pipeline = (
        Pipeline("handover")
        .source(connectors.Iterable([]), into=Topic("clicks", partitions=1))
        .key_by("by-user", lambda click: click["user"])
        .window("minute", Tumbling(minutes=1), time=lambda click: click["ts"])
        .count("count")
        .sink(connectors.LogTopic(Topic("counts", partitions=1)))
    )
    topology = compile_pipeline(pipeline)
    sub = topology.by_topic["clicks"]
    (source,) = topology.writers["clicks"][1]
    clicks = TopicPartition("clicks", 0)
    log = MemoryLog()
    await prepare_topics(log, topology)
    values = [orjson.dumps({"user": f"u{i % 2}", "ts": 60_000 * i}) for i in range(4)]
    log.append(clicks, RawBatch([None] * 4, values, [0] * 4))
    log.append(clicks, marker_batch(source, END_OF_TIME, 0))  # the source read its input
    producer = log.producer()

    owner = Task(topology, sub, 0, Outbox(producer), {}, {}, None)
    await owner.restore(log, {})
    owner.process(await log.read(clicks, 0, 100))
    owner.advance(idle=False)
    assert owner.mark == END_OF_TIME
    owner.checkpoint_marks(0, handing_over=True)
    owner.state.flush(owner.outbox, owner.positions)
    await owner.outbox.send()
    log.store_offsets(topology.group, dict(owner.positions))
    owner.close()
    by_user = f"{pipeline.internal_prefix}by-user"
    partitions = topology.by_topic[by_user].topics[0].partitions
    assert await _markers(log, by_user) == {p: [] for p in range(partitions)}

    successor = Task(topology, sub, 0, Outbox(producer), {}, {}, None)
    await successor.restore(log, await log.committed_offsets(topology.group, [clicks]))
    assert successor.mark == END_OF_TIME
    for _ in range(2):  # its first checkpoint writes the markers, the next one nothing
        successor.checkpoint_marks(0)
        successor.state.flush(successor.outbox, successor.positions)
        await successor.outbox.send()
    successor.close()
    expected = [(f"{sub.index}.0", END_OF_TIME)]
    assert await _markers(log, by_user) == {p: expected for p in range(partitions)}
