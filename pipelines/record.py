"""The record: one immutable envelope for a value in flight."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.errors import RecordSource

__all__ = ["Headers", "Record", "from_millis", "to_millis"]

Headers = tuple[tuple[str, bytes], ...]
"""Record headers: ordered (name, bytes) pairs, as on Kafka."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def to_millis(when: datetime) -> int:
    """Milliseconds since the Unix epoch of a tz-aware datetime (exact, no float rounding)."""
    if when.tzinfo is None:
        raise ValueError(f"timestamp {when.isoformat()} has no time zone; use a tz-aware datetime")
    return (when - _EPOCH) // _MILLISECOND


def from_millis(millis: int) -> datetime:
    """The UTC datetime of milliseconds since the Unix epoch."""
    return _EPOCH + timedelta(milliseconds=millis)


@dataclass(frozen=True, slots=True)
class Record:
    """A key, a value, its event time and headers, and where it was read from.

    ``topic``, ``partition`` and ``offset`` are set for records read from the log and ``None``
    for records that have not been written to it yet.
    """

    key: Any
    value: Any
    timestamp: datetime
    headers: Headers = ()
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def with_value(self, value: Any) -> Record:
        """The same record carrying another value."""
        return replace(self, value=value)

    @property
    def source(self) -> RecordSource | None:
        """The log position this record was read from, if it was."""
        if self.topic is None or self.partition is None or self.offset is None:
            return None
        return RecordSource(self.topic, self.partition, self.offset)
