"""Source tasks: each source step reads its connector into its topic and remembers its position.

For every :class:`~connectors.base.SourceBatch`: serialise with the topic's serdes (unless the
batch is raw bytes already), partition by key, send, flush the producer — and only then append
the batch's position to the pipeline's positions topic. On restart a source resumes from its last
stored position, so what is already on the log is not emitted again; a crash between the flush
and the position write re-emits at most that one batch (at-least-once).

A source that reaches the end of its input writes an end-of-time marker to every partition of
its topic (see :mod:`pipelines.runtime.watermarks`): once every source writing a partition has
ended it, the windows downstream close without waiting for a clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from connectors.base import Source, SourceBatch
from connectors.files import Csv, JsonLines
from pipelines.errors import ConnectorError, PipelineError
from pipelines.log.base import LogBackend, Producer, RawBatch, TopicPartition
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.topology import Topology
from pipelines.runtime.watermarks import END_OF_TIME, marker_batch
from pipelines.steps import SourceStep
from pipelines.topic import Topic

__all__ = ["SourceProgress", "describe_position", "load_positions", "run_source"]

_READ_CHUNK = 10_000


@dataclass(slots=True)
class SourceProgress:
    """How far one source step has got."""

    step_id: str
    records: int = 0
    done: bool = False
    resumed_at: str | None = None
    """Where the source resumed, in words ("byte 8,123,456"), or None when it started from the
    beginning of its input (no stored position)."""

    @property
    def nothing_new(self) -> bool:
        """Whether the source resumed from a stored position and read to the end of its input
        without finding a record after it (it had all been processed by an earlier run)."""
        return self.done and self.records == 0 and self.resumed_at is not None


def describe_position(source: Source, position: Any) -> str:
    """A stored position in words: a byte offset for the file sources, else as stored."""
    if isinstance(position, int) and not isinstance(position, bool):
        unit = "byte" if isinstance(source, JsonLines | Csv) else "position"
        return f"{unit} {position:,}"
    return f"position {orjson.dumps(position).decode()}"


async def load_positions(log: LogBackend, topic: Topic) -> dict[str, Any]:
    """The last stored position of each source step."""
    tp = TopicPartition(topic.name, 0)
    positions: dict[str, Any] = {}
    offset = (await log.start_offsets([tp]))[tp]
    while True:
        fetched = await log.read(tp, offset, _READ_CHUNK)
        if fetched.next_offset <= offset:  # (a read in a repaired hole moves past it)
            return positions
        for key, value in zip(fetched.records.keys, fetched.records.values, strict=True):
            if key is not None and value is not None:
                positions[key.decode()] = orjson.loads(value)
        offset = fetched.next_offset


def _values(topic: Topic, values: list[Any]) -> list[bytes | None]:
    """Serialised values; ``bytes`` are taken as already in the topic's format (so a test can
    feed a malformed record) and ``None`` stays a null value."""
    serialize = topic.value_serde.serialize
    return [v if v is None or isinstance(v, bytes) else serialize(v) for v in values]


def _serialise(step: SourceStep, topic: Topic, batch: SourceBatch) -> RawBatch:
    count = len(batch.values)
    now = int(time.time() * 1000)
    timestamps = batch.timestamps if batch.timestamps is not None else [now] * count
    try:
        values = batch.values if batch.raw else _values(topic, batch.values)
        keys: list[bytes | None] = (
            [None] * count
            if batch.keys is None
            else [None if k is None else topic.key_serde.serialize(k) for k in batch.keys]
        )
    except (TypeError, ValueError) as error:
        raise ConnectorError(
            f"source values do not fit topic {topic.name!r} ({topic.value_serde!r}): {error}",
            step=step.step_id,
        ) from error
    return RawBatch(keys, values, timestamps)


async def run_source(
    topology: Topology,
    step: SourceStep,
    log: LogBackend,
    producer: Producer,
    progress: SourceProgress,
    start: Any,
) -> None:
    """Feed one source step's topic from ``start`` (a stored position, or None) to the end."""
    topic, source = step.topic, step.source
    progress.resumed_at = None if start is None else describe_position(source, start)
    positions = topology.positions_topic
    outbox = Outbox(producer)
    try:
        async for batch in source.read(start):
            raw = _serialise(step, topic, batch)
            outbox.add(topic, raw.keys, raw.values, raw.timestamps)
            await outbox.send()
            await producer.flush()
            await producer.send(
                positions.name,
                0,
                RawBatch(
                    [step.step_id.encode()],
                    [orjson.dumps(batch.position)],
                    [int(time.time() * 1000)],
                ),
            )
            await producer.flush()
            progress.records += len(raw)
        end = marker_batch(step.step_id, END_OF_TIME, int(time.time() * 1000))
        for partition in range(topic.partitions):
            outbox.add_to_partition(topic.name, partition, end)
        await outbox.send()
        await producer.flush()
    except PipelineError as error:
        error.step = error.step or step.step_id
        raise
    except OSError as error:
        raise ConnectorError(
            f"source {source.name!r} failed: {error}", step=step.step_id
        ) from error
    progress.done = True
