"""Forgetting keys by event time without scanning the store: a heap of (time, key).

A keyed step with a horizon (dedupe's window, an aggregation's ``ttl``) remembers when each key
was last stamped. As the largest event time seen moves on, the keys stamped more than the
horizon before it come off the heap, and are forgotten if they were not stamped again since
(a stale heap entry is skipped). Decisions are made record by record, so they do not depend on
how records are batched. After a restore the heap is built once, from the store.
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
        self._latest = -(1 << 62)

    @property
    def loaded(self) -> bool:
        return self._heap is not None

    def load(self, stamped: Iterable[tuple[Any, int]]) -> None:
        """Start from the (key, time) pairs a restored store holds."""
        self._heap = [(t, next(self._tiebreak), k) for k, t in stamped]
        heapq.heapify(self._heap)
        self._latest = max((t for t, _, _ in self._heap), default=self._latest)

    def stamp(self, key: Any, stamp: int) -> None:
        """``key`` was (re)stamped at ``stamp``."""
        assert self._heap is not None
        heapq.heappush(self._heap, (stamp, next(self._tiebreak), key))

    def advance(self, stamp: int, forget: Callable[[Any, int], None]) -> None:
        """Event time reached ``stamp``: call ``forget(key, time)`` for each heap entry older
        than the horizon (the caller checks the key was not stamped again since)."""
        if stamp <= self._latest:
            return
        self._latest = stamp
        heap = self._heap
        assert heap is not None
        while heap and heap[0][0] <= stamp - self.horizon_ms:
            first, _, key = heapq.heappop(heap)
            forget(key, first)
