"""Forgetting keys by event time without scanning the store: a heap of (time, key).

A keyed step with a horizon (dedupe's window, an aggregation's ``ttl``) remembers when each key
was last stamped. As the task's event-time mark moves on (see :mod:`operators._timing`), the
entries stamped more than the horizon before it come off the heap, and the step forgets them
unless the key was stamped again since (a stale heap entry is skipped). The mark is the smallest
over every upstream writer, so a fast writer cannot make a slow one's records forget what they
should meet. After a restore the heap is built once, from the store.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Expiry"]


class Expiry:
    """Keys and the event time each was last stamped, oldest first."""

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        self._heap: list[tuple[int, int, Any]] | None = None
        self._tiebreak = itertools.count()

    @property
    def loaded(self) -> bool:
        return self._heap is not None

    def load(self, stamped: Iterable[tuple[Any, int]]) -> None:
        """Start from the (key, time) pairs a restored store holds."""
        self._heap = [(t, next(self._tiebreak), k) for k, t in stamped]
        heapq.heapify(self._heap)

    def stamp(self, key: Any, stamp: int) -> None:
        """``key`` was (re)stamped at ``stamp``."""
        assert self._heap is not None
        heapq.heappush(self._heap, (stamp, next(self._tiebreak), key))

    def advance(self, mark: int, forget: Callable[[Any, int], None]) -> None:
        """Event time reached ``mark``: call ``forget(key, time)`` for each heap entry at least
        the horizon older (the caller checks the key was not stamped again since)."""
        heap = self._heap
        assert heap is not None
        while heap and heap[0][0] <= mark - self.horizon_ms:
            first, _, key = heapq.heappop(heap)
            forget(key, first)
