"""A batch of deserialised records in flight through a task's operators.

Columns, not objects: operators transform whole lists (``[f(v) for v in batch.values]``), which
is several times cheaper than building a :class:`~pipelines.record.Record` per record and per
step. ``origins`` maps each record back to its position in the fetched batch it came from, so
the original bytes, headers and offset of any record (for the dead-letter topic, for sinks that
want whole records) are one index away. A record a step emits because time passed (a window
closing on an idle partition) has origin -1: no bytes, no headers, offset -1.
:meth:`Batch.records` builds ``Record`` objects on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.errors import RecordSource
from pipelines.log.base import FetchedBatch
from pipelines.record import Headers, Record, from_millis

__all__ = ["Batch"]


@dataclass(slots=True)
class Batch:
    """Parallel columns of keys, values and event times (ms), plus where each record came from."""

    keys: list[Any]
    values: list[Any]
    timestamps: list[int]
    origins: list[int]
    fetched: FetchedBatch

    def __len__(self) -> int:
        return len(self.values)

    def with_values(self, values: list[Any]) -> Batch:
        """The same records carrying ``values`` (one per record)."""
        return Batch(self.keys, values, self.timestamps, self.origins, self.fetched)

    def with_timestamps(self, timestamps: list[int]) -> Batch:
        """The same records at other event times (ms, one per record)."""
        return Batch(self.keys, self.values, timestamps, self.origins, self.fetched)

    def with_keys(self, keys: list[Any]) -> Batch:
        """The same records carrying ``keys`` (one per record)."""
        return Batch(keys, self.values, self.timestamps, self.origins, self.fetched)

    def take(self, indices: Sequence[int]) -> Batch:
        """The records at ``indices``, in that order."""
        keys, values, stamps, origins = self.keys, self.values, self.timestamps, self.origins
        return Batch(
            [keys[i] for i in indices],
            [values[i] for i in indices],
            [stamps[i] for i in indices],
            [origins[i] for i in indices],
            self.fetched,
        )

    def compress(self, keep: Sequence[bool]) -> Batch:
        """The records whose ``keep`` flag is true."""
        return self.take([i for i, k in enumerate(keep) if k])

    def headers_at(self, index: int) -> Headers:
        """The headers record ``index`` was read with."""
        origin = self.origins[index]
        return () if origin < 0 else self.fetched.records.header_at(origin)

    def offset_at(self, index: int) -> int:
        """The offset record ``index`` was read from (-1 for a record a step made on a timer)."""
        origin = self.origins[index]
        return -1 if origin < 0 else self.fetched.offsets[origin]

    def source_of(self, index: int) -> RecordSource:
        """The log position record ``index`` was read from."""
        fetched = self.fetched
        return RecordSource(fetched.topic, fetched.partition, self.offset_at(index))

    def raw_value_at(self, index: int) -> bytes | None:
        """The bytes record ``index`` was read as, before any step changed it."""
        origin = self.origins[index]
        return None if origin < 0 else self.fetched.records.values[origin]

    def raw_key_at(self, index: int) -> bytes | None:
        """The key bytes record ``index`` was read with."""
        origin = self.origins[index]
        return None if origin < 0 else self.fetched.records.keys[origin]

    def record(self, index: int) -> Record:
        """Record ``index`` as a :class:`Record`."""
        fetched = self.fetched
        return Record(
            key=self.keys[index],
            value=self.values[index],
            timestamp=from_millis(self.timestamps[index]),
            headers=self.headers_at(index),
            topic=fetched.topic,
            partition=fetched.partition,
            offset=self.offset_at(index),
        )

    def records(self) -> Iterator[Record]:
        """Every record as a :class:`Record`."""
        return (self.record(i) for i in range(len(self.values)))
