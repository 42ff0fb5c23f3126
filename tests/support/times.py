"""Event times as the tests write them: durations in milliseconds, and instants as the exact
milliseconds since the epoch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["EPOCH", "exact_millis", "ms"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(millis: int) -> timedelta:
    """A duration of ``millis`` milliseconds."""
    return timedelta(milliseconds=millis)


def exact_millis(when: datetime) -> int:
    """The milliseconds since the epoch of ``when`` (a timezone-aware datetime), exactly: no
    float rounding."""
    return (when - EPOCH) // timedelta(milliseconds=1)
