"""The record: one immutable envelope for a value in flight."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.errors import RecordSource

__all__ = ["Headers", "Record", "event_millis", "from_millis", "to_millis"]

Headers = tuple[tuple[str, bytes], ...]
"""Record headers: ordered (name, bytes) pairs, as on Kafka."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def to_millis(when: datetime) -> int:
    """Milliseconds since the Unix epoch of a tz-aware datetime (exact, no float rounding)."""
    if when.tzinfo is None:
        raise ValueError(f"timestamp {when.isoformat()} has no time zone; use a tz-aware datetime")
    return (when - _EPOCH) // _MILLISECOND


def event_millis(when: object) -> int:
    """The event time a ``time=`` function returned, in milliseconds since the epoch: a tz-aware
    datetime, an ISO-8601 string with a time zone (JSON has no datetime type), or an int of
    epoch milliseconds. Anything else raises with what was given and what is accepted."""
    if isinstance(when, datetime):
        return to_millis(when)
    if isinstance(when, str):
        try:
            parsed = datetime.fromisoformat(when)
        except ValueError:
            raise ValueError(
                f"event time {when!r} is not an ISO-8601 date and time "
                "(like '2026-12-05T08:30:00Z')"
            ) from None
        return to_millis(parsed)
    if isinstance(when, int) and not isinstance(when, bool):
        return when
    raise TypeError(
        f"event time {when!r} ({type(when).__name__}) is not a tz-aware datetime, an ISO-8601 "
        "string or an int of milliseconds since the epoch"
    )


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
