"""The log backend interface: what every backend (``memory``, ``embedded``, ``kafka``) provides.

The interface is Kafka-shaped: named topics of numbered partitions, each an append-only sequence
of records addressed by offset; producers that append batches; consumers that join a *group*,
receive an exclusive assignment of partitions (with callbacks on assignment and revocation),
fetch batches from their position and commit the offset to resume from. A committed offset is
the offset of the *next* record to read, as on Kafka.

Records travel through the log as :class:`RawBatch` columns of bytes: serialisation and
deserialisation happen above the log (see :mod:`pipelines.serde`), once per record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pipelines.record import Headers

__all__ = [
    "Consumer",
    "FetchedBatch",
    "LogBackend",
    "Producer",
    "RawBatch",
    "RebalanceListener",
    "TopicPartition",
    "TopicSpec",
    "TransactionalProducer",
]


class TopicPartition(NamedTuple):
    """One partition of a topic."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What the log needs to know about a topic (no serdes: the log stores bytes)."""

    name: str
    partitions: int
    compacted: bool = False
    retention_ms: int | None = None
    retention_bytes: int | None = None
    """Per partition, as Kafka's ``retention.bytes``: the oldest segments go while the rest
    still hold at least this many bytes."""


@dataclass(slots=True)
class RawBatch:
    """Records as parallel columns of bytes; the unit of produce and fetch.

    ``timestamps`` are event times in milliseconds since the epoch. ``headers`` is ``None``
    when no record in the batch has headers, which is the common, cheap case.
    """

    keys: list[bytes | None]
    values: list[bytes | None]
    timestamps: list[int]
    headers: list[Headers] | None = None

    def __len__(self) -> int:
        return len(self.values)

    def header_at(self, index: int) -> Headers:
        """The headers of record ``index`` (empty when the batch has none)."""
        return () if self.headers is None else self.headers[index]

    def copy(self) -> RawBatch:
        """A batch with lists of its own (the same records)."""
        return RawBatch(
            list(self.keys),
            list(self.values),
            list(self.timestamps),
            None if self.headers is None else list(self.headers),
        )

    def extend(self, other: RawBatch) -> None:
        """Append the records of ``other`` to this batch."""
        if self.headers is None and other.headers is not None:
            self.headers = [()] * len(self)
        self.keys.extend(other.keys)
        self.values.extend(other.values)
        self.timestamps.extend(other.timestamps)
        if self.headers is not None:
            self.headers.extend(other.headers or [()] * len(other))

    def take(self, indices: Sequence[int]) -> RawBatch:
        """A new batch of the records at ``indices``, in that order."""
        keys, values, stamps = self.keys, self.values, self.timestamps
        return RawBatch(
            [keys[i] for i in indices],
            [values[i] for i in indices],
            [stamps[i] for i in indices],
            None if self.headers is None else [self.headers[i] for i in indices],
        )


@dataclass(slots=True)
class FetchedBatch:
    """Records read from one partition: the offset of each, and where reading goes on."""

    topic: str
    partition: int
    records: RawBatch
    offsets: Sequence[int]
    next_offset: int = field(default=0)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


class RebalanceListener(Protocol):
    """Told by a consumer when partitions are assigned to it or taken away.

    On the local backends (memory, embedded) both callbacks run inside :meth:`Consumer.poll`,
    between batches. On Kafka they run in aiokafka's group coordinator task, concurrently with
    the consumer's owner, whenever the group rebalances: a listener that touches what the
    poll loop touches must serialise with it (the worker holds a lock around each batch); what
    ``on_assigned`` raises there, the next :meth:`Consumer.poll` raises. ``on_revoked`` is the
    last chance to flush and commit: the partition is handed over when it
    returns.
    """

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None: ...

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None: ...


class Producer(ABC):
    """Appends batches to partitions. Records are acknowledged when :meth:`flush` returns."""

    @abstractmethod
    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        """Queue (or write) ``batch`` at the end of ``topic[partition]``, in order."""

    @abstractmethod
    async def flush(self) -> None:
        """Return once every record sent so far is durable on the log."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release the producer."""


class TransactionalProducer(ABC):
    """Appends batches that become visible together, with consumed offsets, at :meth:`commit`.

    One transactional producer per task, named by a stable ``transactional_id``: on Kafka a new
    producer with the same id fences off an old one (a zombie) so that only one can commit.
    """

    @abstractmethod
    async def fence(self) -> None:
        """Become the owner of the transactional id now (sending and committing do it too, if
        not done): an earlier owner can no longer commit, and a commit it had begun is finished
        (or aborted) first. A new owner of a task calls it before it reads the offsets to
        resume from and restores the task's state, so that an earlier owner still running (a
        zombie, on Kafka) cannot commit past them meanwhile."""

    @abstractmethod
    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        """Add ``batch`` to the open transaction."""

    @abstractmethod
    async def commit(self, offsets: Mapping[TopicPartition, int], group: str) -> None:
        """Atomically make every batch sent since the last commit visible and commit
        ``offsets`` for ``group``: all of it happens, or none of it."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop what was sent since the last commit."""

    @abstractmethod
    async def close(self) -> None:
        """Abort what is open and release the producer."""


class Consumer(ABC):
    """A member of a consumer group that fetches batches from its assigned partitions."""

    @abstractmethod
    async def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        """Join the group for ``topics``; assignments arrive through ``listener`` (see
        :class:`RebalanceListener` for when its callbacks run)."""

    @abstractmethod
    async def poll(self, max_records: int, timeout: float) -> list[FetchedBatch]:
        """Fetch up to ``max_records`` from the assigned partitions, waiting up to ``timeout``
        seconds for data. On the local backends it runs the rebalance callbacks first when the
        group changed; on Kafka they run on their own (see :class:`RebalanceListener`)."""

    @abstractmethod
    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Durably record, per partition, the offset of the next record to read."""

    @abstractmethod
    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member owns now."""

    @abstractmethod
    async def close(self) -> None:
        """Revoke every partition (through the listener) and leave the group."""


class LogBackend(ABC):
    """Topics, producers and consumer groups on one storage."""

    name: str

    @abstractmethod
    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist. A topic that exists with another partition
        count raises :class:`~pipelines.errors.TopicError`."""

    @abstractmethod
    async def describe_topics(self) -> dict[str, TopicSpec]:
        """Every topic on the log, by name."""

    @abstractmethod
    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset the next record appended to each partition will get."""

    @abstractmethod
    async def committed_offsets(
        self, group: str, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The offsets ``group`` committed (partitions it never committed are left out)."""

    @abstractmethod
    async def read(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        """Read outside any group, from ``offset``, up to the last stable offset (the first
        record of a transaction still open). A batch may be empty before that: records of
        aborted transactions, commit markers and holes are passed over, and ``next_offset``
        moves on; read on from it. At the end, ``next_offset == offset``."""

    @abstractmethod
    def producer(self) -> Producer:
        """A new producer."""

    @abstractmethod
    def transactional_producer(self, transactional_id: str) -> TransactionalProducer:
        """A new producer whose batches and offsets commit atomically."""

    @abstractmethod
    def consumer(self, group: str) -> Consumer:
        """A new consumer that joins ``group`` when it subscribes."""

    async def start_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The first offset still on the log of each partition (records below were dropped
        by retention or a purge). By default nothing is ever dropped: 0."""
        return dict.fromkeys(partitions, 0)

    async def purge(self, below: Mapping[TopicPartition, int]) -> None:
        """Let the log drop the records of each partition below the offset given (records every
        reader has processed: a repartition topic below its group's committed offsets). The
        log may keep some: the embedded log drops whole sealed segments only. By default it
        keeps everything."""
        del below

    async def compact(self, specs: Sequence[TopicSpec], now_ms: int) -> None:
        """Compact the compacted topics among ``specs``: keep the last record of each key.
        Kafka's brokers do this themselves; by default nothing is done."""
        del specs, now_ms

    async def roll_segments(self, specs: Sequence[TopicSpec], now_ms: int) -> None:
        """Start a new segment in each partition of ``specs`` whose active one has been open
        too long, so its records can expire, be purged or compacted. Kafka's brokers roll
        segments themselves (``segment.ms``); by default there are no segments."""
        del specs, now_ms

    async def enforce_retention(self, specs: Sequence[TopicSpec], now_ms: int) -> None:
        """Drop what the ``retention_ms`` and ``retention_bytes`` of each topic in ``specs`` let
        go, as of ``now_ms``.
        Kafka's brokers do this themselves; by default nothing is dropped."""
        del specs, now_ms

    @abstractmethod
    async def close(self) -> None:
        """Release the backend's resources."""
