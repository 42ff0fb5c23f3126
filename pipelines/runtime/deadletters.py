"""``headwater dlq list|show|replay``: what a pipeline's dead-letter topic holds, and sending
its records back where they came from once the step that rejected them is fixed.

A dead letter is the original record (key, value, timestamp, headers) plus headers that say
what went wrong: ``headwater.error``, ``headwater.error.type``, ``headwater.step`` and the
``headwater.source.*`` topic, partition and offset it was read from (see
:func:`pipelines.runtime.task.error_headers`).

Replay appends each dead letter of a step, without Headwater's headers and with a
``headwater.replayed-from`` header naming the dead letter, to the topic partition it was read
from; the pipeline (running, or at its next run) processes it like any new record. Each step has
its own replay position: the consumer group ``<pipeline>.dlq-replay.<step>`` on the dead-letter
topic. The records and the new position are written in one transaction, so a replay that is
interrupted and run again replays every dead letter exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pipelines.errors import PipelineError
from pipelines.log.base import LogBackend, RawBatch, TopicPartition
from pipelines.record import Headers
from pipelines.runtime.topology import Topology

__all__ = ["DeadLetter", "read_dead_letters", "replay", "replay_group", "summary"]

_READ = 5_000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Headers

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None

    @property
    def step(self) -> str:
        return self.header("headwater.step") or "?"

    @property
    def error_type(self) -> str:
        return self.header("headwater.error.type") or "?"

    def origin(self) -> TopicPartition | None:
        """The topic partition it was read from, if its headers say."""
        topic, partition = (
            self.header("headwater.source.topic"),
            self.header("headwater.source.partition"),
        )
        if topic is None or partition is None or not partition.isdigit():
            return None
        return TopicPartition(topic, int(partition))

    def original_headers(self) -> Headers:
        """Its headers without those Headwater added when it was rejected."""
        return tuple((k, v) for k, v in self.headers if not k.startswith("headwater."))


def replay_group(topology: Topology, step: str) -> str:
    """The consumer group that holds the replay position of ``step``'s dead letters."""
    return f"{topology.pipeline.name}.dlq-replay.{step}"


async def _partitions(log: LogBackend, topology: Topology) -> list[TopicPartition]:
    name = topology.pipeline.dead_letter_topic.name
    spec = (await log.describe_topics()).get(name)
    if spec is None:
        return []
    return [TopicPartition(name, p) for p in range(spec.partitions)]


async def read_dead_letters(
    log: LogBackend, topology: Topology, since: dict[TopicPartition, int] | None = None
) -> AsyncIterator[DeadLetter]:
    """Every dead letter of the pipeline, partition by partition, from ``since`` (or the log's
    start: a retention on the dead-letter topic may have removed the oldest)."""
    for tp in await _partitions(log, topology):
        end = (await log.end_offsets([tp]))[tp]
        offset = (since or {}).get(tp)
        if offset is None:
            offset = (await log.start_offsets([tp]))[tp]
        while offset < end:
            fetched = await log.read(tp, offset, _READ)
            raw = fetched.records
            for i, at in enumerate(fetched.offsets):
                yield DeadLetter(
                    tp.partition,
                    at,
                    raw.keys[i],
                    raw.values[i],
                    raw.timestamps[i],
                    raw.header_at(i),
                )
            if fetched.next_offset <= offset:
                break
            offset = fetched.next_offset


@dataclass(frozen=True, slots=True)
class Group:
    """Dead letters of one step with one error type."""

    step: str
    error_type: str
    count: int
    replayed: int
    example: str


async def summary(log: LogBackend, topology: Topology) -> list[Group]:
    """Dead letters grouped by step and error type, with how many were replayed already."""
    counts: Counter[tuple[str, str]] = Counter()
    replayed: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], str] = {}
    positions: dict[str, dict[TopicPartition, int]] = {}
    tps = await _partitions(log, topology)
    async for letter in read_dead_letters(log, topology):
        group = (letter.step, letter.error_type)
        counts[group] += 1
        examples.setdefault(group, letter.header("headwater.error") or "")
        if letter.step not in positions:
            positions[letter.step] = await log.committed_offsets(
                replay_group(topology, letter.step), tps
            )
        at = positions[letter.step].get(TopicPartition(tps[0].topic, letter.partition), 0)
        replayed[group] += letter.offset < at
    return [
        Group(step, kind, n, replayed[(step, kind)], examples[(step, kind)])
        for (step, kind), n in sorted(counts.items())
    ]


async def replay(log: LogBackend, topology: Topology, steps: Sequence[str] = ()) -> dict[str, int]:
    """Send the dead letters of ``steps`` (every step when empty) not replayed yet back to the
    topic partitions they were read from; per step, how many were sent."""
    tps = await _partitions(log, topology)
    found = sorted({letter.step async for letter in read_dead_letters(log, topology)})
    unknown = [s for s in steps if s not in found]
    if unknown:
        raise PipelineError(
            f"no dead letters of step {unknown[0]!r}; steps with dead letters: "
            f"{', '.join(found) or 'none'}"
        )
    sent: dict[str, int] = {}
    for step in steps or found:
        sent[step] = await _replay_step(log, topology, step, tps)
    return sent


async def _replay_step(
    log: LogBackend, topology: Topology, step: str, tps: list[TopicPartition]
) -> int:
    group = replay_group(topology, step)
    since = await log.committed_offsets(group, tps)
    ends = await log.end_offsets(tps)
    batches: dict[TopicPartition, RawBatch] = {}
    count = 0
    async for letter in read_dead_letters(log, topology, since):
        if letter.offset >= ends[TopicPartition(tps[0].topic, letter.partition)]:
            continue
        origin = letter.origin()
        if letter.step != step or origin is None:
            continue
        batch = batches.setdefault(origin, RawBatch([], [], [], []))
        batch.keys.append(letter.key)
        batch.values.append(letter.value)
        batch.timestamps.append(letter.timestamp)
        where = f"{tps[0].topic}[{letter.partition}]@{letter.offset}".encode()
        assert batch.headers is not None
        batch.headers.append((*letter.original_headers(), ("headwater.replayed-from", where)))
        count += 1
    transaction = log.transactional_producer(group)
    try:
        for origin, batch in batches.items():
            await transaction.send(origin.topic, origin.partition, batch)
        await transaction.commit(ends, group)
    finally:
        await transaction.close()
    return count
