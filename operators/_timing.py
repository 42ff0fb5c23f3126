"""What the event-time operators (windows, stream joins, dedupe, TTL) share: the task's
event-time mark as each step keeps it, and the records a call emits.

The runtime tells each step when its task's inputs have all progressed to an event-time mark
(see :mod:`pipelines.runtime.watermarks`): :meth:`~operators.base.Operator.on_watermark`. A step
turns the mark into its own watermark (minus its declared lateness), keeps it in its state under
:data:`WATERMARK` in the namespace :data:`TIME` (``ctx.state(TIME)``), apart from its entries
for records, so it is restored with the rest of the state and never goes back, and closes or
expires what the watermark has passed.

The end of time (every source exhausted) closes everything, but a step does not keep it as its
watermark: it keeps the watermark that makes exactly what it closed late. A later run whose
sources go on with newer input then carries on where this one stopped.
"""

from __future__ import annotations

from typing import Any

from pipelines.batch import Batch
from pipelines.state.api import State

__all__ = [
    "END_OF_TIME",
    "NO_WATERMARK",
    "TIME",
    "WATERMARK",
    "Emitted",
    "advance",
    "close_at",
    "watermark",
]

TIME = "time"
"""The namespace of a step's event-time bookkeeping."""
WATERMARK = "watermark"
"""The key of the step's watermark in :data:`TIME`."""
NO_WATERMARK = -(1 << 62)
"""The watermark before anything is known."""
END_OF_TIME = 1 << 62
"""The mark of inputs that will never write again: every window closes."""


def watermark(time: State) -> int:
    """The step's watermark on this partition (``time``: its namespace :data:`TIME`)."""
    value = time.get(WATERMARK)
    return NO_WATERMARK if value is None else int(value)


def advance(time: State, mark: int, lateness_ms: int = 0) -> int | None:
    """Move the step's watermark up to ``mark - lateness_ms`` (never back); the new watermark,
    or None when it did not move. At the end of time the watermark is not stored: the step
    closes everything, then :func:`close_at` keeps what it closed."""
    if mark <= NO_WATERMARK:
        return None
    if mark >= END_OF_TIME:
        return END_OF_TIME
    candidate = mark - lateness_ms
    if candidate <= watermark(time):
        return None
    time.put(WATERMARK, candidate)
    return candidate


def close_at(time: State, closed: int) -> None:
    """After the end of time: keep as watermark the one that closes exactly what was closed
    (``closed``, the largest watermark any of it needed), if that is later."""
    if closed > watermark(time):
        time.put(WATERMARK, closed)


class Emitted:
    """The records one call of a step emits, gathered as columns."""

    __slots__ = ("keys", "origins", "stamps", "values")

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.stamps: list[int] = []
        self.origins: list[int] = []

    def add(self, key: Any, value: Any, stamp: int, origin: int) -> None:
        """One record; ``origin`` indexes the input batch (-1: made as time passed)."""
        self.keys.append(key)
        self.values.append(value)
        self.stamps.append(stamp)
        self.origins.append(origin)

    def batch(self, like: Batch) -> Batch:
        """The records as a batch read from the same place as ``like``."""
        return Batch(self.keys, self.values, self.stamps, self.origins, like.fetched)
