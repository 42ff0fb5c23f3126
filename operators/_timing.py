"""What the event-time operators (windows, stream joins) share: a partition's clock and the
records a call emits.

The watermark is kept in the step's store under a key no record entry can have (a 1-tuple), so
it is restored with the rest of the state. The idle timer is wall-clock and in memory: after a
restore a partition counts as active until ``idle`` passes without records, and the worker only
asks (ticks) while it has nothing to fetch, so a worker catching up a backlog never moves a
watermark by the clock. ``idle`` should still exceed the time upstream steps in other workers
may need to catch up after a rebalance.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.batch import Batch
    from pipelines.state.store import KeyValueStore

__all__ = ["NO_WATERMARK", "WATERMARK_KEY", "Emitted", "EventClock"]

WATERMARK_KEY = ("watermark",)
NO_WATERMARK = -(1 << 62)


class EventClock:
    """One partition's watermark (in the step's store) and its idle timer."""

    def __init__(self, idle_ms: int) -> None:
        self.idle_ms = idle_ms
        self._last_arrival: float | None = None  # the first tick starts the timer

    @staticmethod
    def watermark(store: KeyValueStore) -> int:
        value = store.get(WATERMARK_KEY)
        return NO_WATERMARK if value is None else int(value)

    def advance(self, store: KeyValueStore, candidate: int) -> None:
        """Move the watermark up to ``candidate`` (never back)."""
        if candidate > self.watermark(store):
            store.put(WATERMARK_KEY, candidate)

    def arrived(self) -> None:
        """Records came: the partition is not idle."""
        self._last_arrival = time.monotonic()

    def idle_now(self) -> int | None:
        """The wall clock (epoch ms) once the partition has been idle for ``idle``, else None."""
        now = time.monotonic()
        if self._last_arrival is None:  # first asked after the task's restore: active from now
            self._last_arrival = now
        if (now - self._last_arrival) * 1000 < self.idle_ms:
            return None
        return time.time_ns() // 1_000_000


class Emitted:
    """The records one call of a step emits, gathered as columns."""

    __slots__ = ("keys", "origins", "stamps", "values")

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.stamps: list[int] = []
        self.origins: list[int] = []

    def add(self, key: Any, value: Any, stamp: int, origin: int) -> None:
        """One record; ``origin`` indexes the input batch (-1: made on a timer)."""
        self.keys.append(key)
        self.values.append(value)
        self.stamps.append(stamp)
        self.origins.append(origin)

    def batch(self, like: Batch) -> Batch:
        """The records as a batch read from the same place as ``like``."""
        from pipelines.batch import Batch

        return Batch(self.keys, self.values, self.stamps, self.origins, like.fetched)
