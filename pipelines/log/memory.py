"""The ``memory`` backend: an in-process log for notebooks and tests.

Deterministic and nothing on disk. Partitions are columnar lists; consumer-group members are
consumers in this process (on one event loop), coordinated as every local group is (see
:mod:`pipelines.log._local`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipelines.errors import TopicError
from pipelines.log._local import (
    LocalLog,
    Membership,
    new_member_id,
    sleep_until_appended,
)
from pipelines.log.base import (
    FetchedBatch,
    RawBatch,
    TopicPartition,
    TopicSpec,
    TransactionalProducer,
)
from pipelines.record import Headers

__all__ = ["MemoryLog"]


@dataclass(slots=True)
class _Partition:
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    headers: list[Headers] = field(default_factory=list)
    has_headers: bool = False

    def append(self, batch: RawBatch) -> None:
        self.keys.extend(batch.keys)
        self.values.extend(batch.values)
        self.timestamps.extend(batch.timestamps)
        if batch.headers is None:
            self.headers.extend([()] * len(batch))
        else:
            self.headers.extend(batch.headers)
            self.has_headers = True

    def slice(self, start: int, stop: int) -> RawBatch:
        return RawBatch(
            self.keys[start:stop],
            self.values[start:stop],
            self.timestamps[start:stop],
            self.headers[start:stop] if self.has_headers else None,
        )


@dataclass(slots=True)
class _Group:
    members: set[str] = field(default_factory=set)
    claims: dict[TopicPartition, str] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


class _MemoryMembership(Membership):
    def __init__(self, group: _Group) -> None:
        self.member_id = new_member_id()
        self._group = group
        group.members.add(self.member_id)

    def live_members(self) -> list[str]:
        return sorted(self._group.members)

    def try_claim(self, tp: TopicPartition) -> bool:
        holder = self._group.claims.setdefault(tp, self.member_id)
        return holder == self.member_id

    def release(self, tp: TopicPartition) -> None:
        if self._group.claims.get(tp) == self.member_id:
            del self._group.claims[tp]

    def leave(self) -> None:
        for tp in [tp for tp, m in self._group.claims.items() if m == self.member_id]:
            del self._group.claims[tp]
        self._group.members.discard(self.member_id)


class MemoryLog(LocalLog):
    """An in-process log; every producer and consumer of it must share its event loop."""

    name = "memory"

    def __init__(self) -> None:
        self._specs: dict[str, TopicSpec] = {}
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._groups: dict[str, _Group] = {}
        self._appended: asyncio.Event | None = None

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        for spec in specs:
            existing = self._specs.get(spec.name)
            if existing is not None:
                if existing.partitions != spec.partitions:
                    raise TopicError(
                        f"topic {spec.name!r} exists with {existing.partitions} partitions, "
                        f"not {spec.partitions}"
                    )
                continue
            if spec.partitions < 1:
                raise TopicError(f"topic {spec.name!r} needs at least one partition")
            self._specs[spec.name] = spec
            for p in range(spec.partitions):
                self._partitions[TopicPartition(spec.name, p)] = _Partition()

    async def describe_topics(self) -> dict[str, TopicSpec]:
        return dict(self._specs)

    def spec(self, name: str) -> TopicSpec:
        """The spec of topic ``name`` (synchronously: this log is in memory)."""
        try:
            return self._specs[name]
        except KeyError:
            raise TopicError(f"no topic {name!r} on the memory log") from None

    def _partition(self, tp: TopicPartition) -> _Partition:
        try:
            return self._partitions[tp]
        except KeyError:
            raise TopicError(f"no partition {tp} on the memory log") from None

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self._partition(tp).values) for tp in partitions}

    async def committed_offsets(
        self, group: str, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        offsets = self._groups.get(group, _Group()).offsets
        return {tp: offsets[tp] for tp in partitions if tp in offsets}

    def append(self, tp: TopicPartition, batch: RawBatch) -> None:
        self._partition(tp).append(batch)
        if self._appended is not None:
            self._appended.set()

    def read_now(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        partition = self._partition(tp)
        stop = min(len(partition.values), offset + max_records)
        start = min(offset, stop)
        return FetchedBatch(
            tp.topic, tp.partition, partition.slice(start, stop), range(start, stop), stop
        )

    def store_offsets(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        self._groups.setdefault(group, _Group()).offsets.update(offsets)

    def transactional_producer(self, transactional_id: str) -> TransactionalProducer:
        return _MemoryTransaction(self)

    def commit_transaction(
        self,
        batches: Sequence[tuple[TopicPartition, RawBatch]],
        offsets: Mapping[TopicPartition, int],
        group: str,
    ) -> None:
        """Append ``batches`` and commit ``offsets``: in one process with no await in between,
        so nothing can see half of it."""
        for tp in [*offsets, *(tp for tp, _ in batches)]:
            self._partition(tp)  # an unknown partition fails before anything changes
        for tp, batch in batches:
            self.append(tp, batch)
        self.store_offsets(group, offsets)

    def membership(self, group: str) -> Membership:
        return _MemoryMembership(self._groups.setdefault(group, _Group()))

    async def wait_for_append(self, timeout: float) -> None:
        if self._appended is None:
            self._appended = asyncio.Event()
        await sleep_until_appended(self._appended, timeout)

    async def close(self) -> None:
        return None


class _MemoryTransaction(TransactionalProducer):
    """Buffers a task's batches until :meth:`commit` hands them to the log in one piece (in
    memory there is no crash to survive: a transaction is all or nothing by construction)."""

    def __init__(self, log: MemoryLog) -> None:
        self._log = log
        self._pending: dict[TopicPartition, RawBatch] = {}

    async def fence(self) -> None:
        """Nothing to fence: one process, no earlier owner."""

    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        if not len(batch):
            return
        tp = TopicPartition(topic, partition)
        pending = self._pending.get(tp)
        if pending is None:
            self._pending[tp] = batch.copy()
        else:
            pending.extend(batch)

    async def commit(self, offsets: Mapping[TopicPartition, int], group: str) -> None:
        pending, self._pending = self._pending, {}
        if pending or offsets:
            self._log.commit_transaction(list(pending.items()), offsets, group)

    async def abort(self) -> None:
        self._pending.clear()

    async def close(self) -> None:
        self._pending.clear()
