"""Reading a pipeline's topics and its group's offsets from outside, as any other client of the
log would: :class:`EmbeddedView` on an embedded log's directory, :class:`KafkaView` on a Kafka
broker. Watermark markers are left out of what they read: no step or sink sees them;
:func:`read_topic` gives an embedded topic's records and, apart, its markers. :func:`numbered`
makes records to write that say where they belong."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiokafka import TopicPartition as KafkaPartition

from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.embedded import EmbeddedLog
from pipelines.runtime.watermarks import is_marker, split_markers
from support.kafka import committed_offsets, consumer, end_offsets

__all__ = ["Contents", "EmbeddedView", "Entry", "KafkaView", "LogView", "numbered", "read_topic"]

Entry = tuple[int, bytes | None, bytes | None]
"""(offset, key, value) of one record."""

_T = TypeVar("_T")


def numbered(start: int, count: int, stamp: int | None = None) -> RawBatch:
    """Records whose key, value and timestamp say their offset when written from offset
    ``start`` on: ``k<n>``, ``<n>`` and ``n`` (or all timestamp ``stamp`` when given)."""
    numbers = range(start, start + count)
    stamps = list(numbers) if stamp is None else [stamp] * count
    return RawBatch([b"k%d" % n for n in numbers], [b"%d" % n for n in numbers], stamps)


class LogView(ABC):
    """What the tests read from a log, partition by partition."""

    @abstractmethod
    def ends(self, topic: str, partitions: int) -> dict[int, int]:
        """The end offset of each partition of ``topic`` (0 each while it does not exist)."""

    @abstractmethod
    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        """The offsets ``group`` has committed on ``topic`` (0 where none)."""

    @abstractmethod
    def records(
        self, topic: str, partitions: int, since: Mapping[int, int] | None = None
    ) -> list[list[Entry]]:
        """Each partition's records in offset order (from offset ``since[p]`` on), markers
        left out; none while ``topic`` does not exist."""

    def entries(
        self, topic: str, partitions: int, since: Mapping[int, int] | None = None
    ) -> list[list[tuple[int, bytes]]]:
        """Each partition's (offset, value) pairs, from ``since[p]`` on."""
        return [
            [(o, v) for o, _, v in found if v is not None]
            for found in self.records(topic, partitions, since)
        ]

    def values(
        self, topic: str, partitions: int, since: Mapping[int, int] | None = None
    ) -> list[list[bytes]]:
        """Each partition's record values, from ``since[p]`` on."""
        return [[v for _, v in found] for found in self.entries(topic, partitions, since)]

    def count(self, topic: str, partitions: int) -> int:
        """Records on ``topic`` now: markers take offsets but are not counted."""
        return sum(map(len, self.records(topic, partitions)))


class EmbeddedView(LogView):
    """An embedded log's directory, opened anew for each look."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def _run(self, work: Callable[[EmbeddedLog], Awaitable[_T]]) -> _T:
        async def go() -> _T:
            log = EmbeddedLog(self.data_dir)
            try:
                return await work(log)
            finally:
                await log.close()

        return asyncio.run(go())

    def _exists(self, topic: str) -> bool:
        return (self.data_dir / "topics" / topic / "topic.json").exists()

    def ends(self, topic: str, partitions: int) -> dict[int, int]:
        if not self._exists(topic):
            return dict.fromkeys(range(partitions), 0)
        tps = [TopicPartition(topic, p) for p in range(partitions)]

        async def work(log: EmbeddedLog) -> dict[int, int]:
            return {tp.partition: o for tp, o in (await log.end_offsets(tps)).items()}

        return self._run(work)

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in range(partitions)]

        async def work(log: EmbeddedLog) -> dict[int, int]:
            found = await log.committed_offsets(group, tps)
            return {tp.partition: found.get(tp, 0) for tp in tps}

        return self._run(work)

    def records(
        self, topic: str, partitions: int, since: Mapping[int, int] | None = None
    ) -> list[list[Entry]]:
        if not self._exists(topic):
            return [[] for _ in range(partitions)]

        async def work(log: EmbeddedLog) -> list[list[Entry]]:
            found = []
            for partition in range(partitions):
                tp = TopicPartition(topic, partition)
                offset, entries = (since or {}).get(partition, 0), []
                while True:
                    fetched = await log.read(tp, offset, 50_000)
                    if fetched.next_offset <= offset:  # the end (aborted records move it on)
                        break
                    raw = fetched.records
                    entries += [
                        (o, k, v)
                        for o, k, v in zip(fetched.offsets, raw.keys, raw.values, strict=True)
                        if not is_marker(k, v)
                    ]
                    offset = fetched.next_offset
                found.append(entries)
            return found

        return self._run(work)


class KafkaView(LogView):
    """A Kafka broker, read as any ``read_committed`` client reads it (records of aborted
    transactions are not seen); ``KafkaView(bootstrap, "read_uncommitted")`` sees them too."""

    def __init__(self, bootstrap: str, isolation_level: str = "read_committed") -> None:
        self.bootstrap = bootstrap
        self.isolation_level = isolation_level

    def ends(self, topic: str, partitions: int) -> dict[int, int]:
        return end_offsets(self.bootstrap, topic, partitions, self.isolation_level)

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        return committed_offsets(self.bootstrap, group, topic, partitions)

    def records(
        self, topic: str, partitions: int, since: Mapping[int, int] | None = None
    ) -> list[list[Entry]]:
        """Up to the end (under ``read_committed``, the last stable offset)."""

        async def go() -> list[list[Entry]]:
            async with consumer(self.bootstrap, self.isolation_level) as client:
                if topic not in await client.topics():
                    return [[] for _ in range(partitions)]
                tps = [KafkaPartition(topic, p) for p in range(partitions)]
                client.assign(tps)
                ends = await client.end_offsets(tps)
                if since is None:
                    await client.seek_to_beginning(*tps)
                else:
                    for tp in tps:
                        client.seek(tp, since.get(tp.partition, 0))
                found: dict[int, list[Entry]] = {p: [] for p in range(partitions)}
                deadline = time.monotonic() + 90
                todo = [tp for tp in tps if await client.position(tp) < ends[tp]]
                while todo:
                    fetched = await client.getmany(*todo, timeout_ms=500, max_records=50_000)
                    for tp, messages in fetched.items():
                        found[tp.partition] += [
                            (m.offset, m.key, m.value)
                            for m in messages
                            if m.offset < ends[tp] and not is_marker(m.key, m.value)
                        ]
                    todo = [tp for tp in todo if await client.position(tp) < ends[tp]]
                    assert time.monotonic() < deadline, f"reading {topic} took over 90s"
                return [found[p] for p in range(partitions)]

        return asyncio.run(go())


KeyValue = tuple[bytes | None, bytes | None]


@dataclass
class Contents:
    """What a topic holds: its data records, and apart from them its watermark markers."""

    records: list[KeyValue]
    """Every (key, value), partition by partition, in offset order."""
    markers: dict[int, list[tuple[int, str, int]]]
    """Partition -> the (offset, writer, mark) of each marker on it, in order."""
    ends: dict[int, int]
    """Partition -> its end offset (records and markers)."""


def read_topic(data_dir: Path, name: str) -> Contents:
    """Everything on topic ``name`` of the embedded log in ``data_dir``."""

    async def read() -> Contents:
        log = EmbeddedLog(data_dir)
        try:
            spec = (await log.describe_topics())[name]
            tps = [TopicPartition(name, p) for p in range(spec.partitions)]
            ends = await log.end_offsets(tps)
            contents = Contents([], {}, {tp.partition: ends[tp] for tp in tps})
            for tp in tps:
                markers = contents.markers.setdefault(tp.partition, [])
                offset = 0
                while offset < ends[tp]:
                    fetched = await log.read(tp, offset, 50_000)
                    assert len(fetched.records), f"{tp} ends at {ends[tp]}, not {offset}"
                    data, found = split_markers(fetched)
                    contents.records += zip(data.records.keys, data.records.values, strict=True)
                    at = sorted(set(fetched.offsets) - set(data.offsets))
                    markers += [(o, w, m) for o, (w, m) in zip(at, found, strict=True)]
                    offset = fetched.next_offset
            return contents
        finally:
            await log.close()

    return asyncio.run(read())
