"""Event-time windows: which windows a timestamp belongs to.

Every kind answers one question, :meth:`Windows.assign`, with the windows ``[start, end)`` (in
milliseconds) that contain a timestamp; the windowed aggregation does the rest (state per key
and window, expiry when the watermark passes ``end + grace``, emitting). Session windows are the
one *merging* kind: each record opens a window ``[t, t + gap)`` and the aggregation merges it
with every window of the same key it overlaps or touches.

``Sliding`` follows Flink's definition (windows of ``size`` starting every ``slide``), which is
what Kafka Streams calls hopping windows; ``Hopping`` is the same with Kafka Streams' names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Hopping", "Session", "Sliding", "Tumbling", "Window", "Windows"]


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """``[start, end)`` in milliseconds since the epoch."""

    start: int
    end: int


def _millis(span: timedelta, what: str) -> int:
    millis = span // timedelta(milliseconds=1)  # exact: no float rounding
    if millis <= 0:
        raise ValueError(f"a window's {what} must be positive, got {span}")
    return millis


class Windows:
    """A kind of window (see the module docstring)."""

    merging = False

    def assign(self, timestamp: int) -> list[Window]:
        """The windows that contain ``timestamp``."""
        raise NotImplementedError


class Tumbling(Windows):
    """Fixed-size, non-overlapping windows aligned to the epoch."""

    def __init__(
        self, size: timedelta | None = None, *, minutes: float = 0, seconds: float = 0
    ) -> None:
        self.size = _millis(size or timedelta(minutes=minutes, seconds=seconds), "size")

    def __repr__(self) -> str:
        return f"Tumbling({timedelta(milliseconds=self.size)})"

    def assign(self, timestamp: int) -> list[Window]:
        start = timestamp - timestamp % self.size
        return [Window(start, start + self.size)]


class Hopping(Windows):
    """Windows of ``size`` that start every ``advance``, so they overlap when advance < size."""

    def __init__(self, size: timedelta, advance: timedelta) -> None:
        self.size = _millis(size, "size")
        self.advance = _millis(advance, "advance")
        if self.advance > self.size:
            raise ValueError("a hopping window's advance cannot exceed its size")

    def __repr__(self) -> str:
        size, advance = timedelta(milliseconds=self.size), timedelta(milliseconds=self.advance)
        return f"{type(self).__name__}({size}, {advance})"

    def assign(self, timestamp: int) -> list[Window]:
        last_start = timestamp - timestamp % self.advance
        windows = []
        start = last_start
        while start > timestamp - self.size:
            windows.append(Window(start, start + self.size))
            start -= self.advance
        return windows[::-1]


class Sliding(Hopping):
    """Windows of ``size`` that start every ``slide`` (Flink's sliding windows)."""

    def __init__(self, size: timedelta, slide: timedelta) -> None:
        super().__init__(size, slide)


class Session(Windows):
    """Per-key windows of activity that close after ``gap`` without records."""

    merging = True

    def __init__(self, gap: timedelta) -> None:
        self.gap = _millis(gap, "gap")

    def __repr__(self) -> str:
        return f"Session({timedelta(milliseconds=self.gap)})"

    def assign(self, timestamp: int) -> list[Window]:
        return [Window(timestamp, timestamp + self.gap)]
