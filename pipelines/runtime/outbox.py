"""What a worker writes to topics, buffered per partition and sent in batches."""

from __future__ import annotations

from collections import defaultdict

from pipelines.log.base import Producer, RawBatch, TransactionalProducer
from pipelines.partitioner import partition_batch
from pipelines.record import Headers
from pipelines.topic import Topic

__all__ = ["Outbox"]


class Outbox:
    """Serialised records on their way to the log, grouped by partition.

    Keys pick the partition with Kafka's partitioner. A batch without keys goes whole to one
    partition (the writer's own, or the next in rotation: Kafka's sticky partitioning): fewer,
    bigger frames, and no per-record work.
    Nothing is on the log until :meth:`send`; nothing is acknowledged until the producer
    flushes.
    """

    def __init__(self, producer: Producer | TransactionalProducer) -> None:
        self._producer = producer
        self._pending: dict[tuple[str, int], RawBatch] = {}
        self._rotation: dict[str, int] = defaultdict(int)

    def __len__(self) -> int:
        return sum(len(b) for b in self._pending.values())

    def add(
        self,
        topic: Topic,
        keys: list[bytes | None],
        values: list[bytes | None],
        timestamps: list[int],
        headers: list[Headers] | None = None,
        *,
        sticky: int | None = None,
    ) -> None:
        """Queue records for ``topic``, partitioned by key. A batch without keys goes whole to
        partition ``sticky`` (modulo the count) when given, else to the next in rotation."""
        if not values:
            return
        if topic.partitions == 1 or keys.count(None) == len(keys):
            if sticky is None:
                sticky = self._rotation[topic.name]
                self._rotation[topic.name] = sticky + 1
            batch = RawBatch(keys, values, timestamps, headers)
            self._extend(topic.name, sticky % topic.partitions, batch)
            return
        partitions = partition_batch(keys, topic.partitions)
        chunks: dict[int, list[int]] = defaultdict(list)
        for index, partition in enumerate(partitions):
            chunks[partition].append(index)
        whole = RawBatch(keys, values, timestamps, headers)
        for partition, indices in chunks.items():
            self._extend(topic.name, partition, whole.take(indices))

    def add_to_partition(self, topic: str, partition: int, batch: RawBatch) -> None:
        """Queue serialised records for one given partition (a changelog's, say)."""
        if len(batch):
            self._extend(topic, partition, batch)

    def _extend(self, topic: str, partition: int, batch: RawBatch) -> None:
        pending = self._pending.get((topic, partition))
        if pending is None:  # copy: the caller's lists must not grow with later records
            self._pending[(topic, partition)] = batch.copy()
        else:
            pending.extend(batch)

    async def send(self) -> None:
        """Hand every queued batch to the producer."""
        pending, self._pending = self._pending, {}
        for (topic, partition), batch in pending.items():
            await self._producer.send(topic, partition, batch)
