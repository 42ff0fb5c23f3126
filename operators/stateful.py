"""Keyed stateful operators: ``aggregate`` (and the ``count``/``sum``/... shorthands) and
``dedupe``. Their state lives in the step's store, which the runtime restores after a crash or a
rebalance; see :mod:`pipelines.state.store`."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from operators.aggregations import Aggregation
from operators.base import Operator, call_each, describe_function, user_error

if TYPE_CHECKING:
    from pipelines.batch import Batch
    from pipelines.errors import StepError

__all__ = ["Aggregate", "Dedupe", "EventTime", "missing_key_error"]

_MISSING = object()


def missing_key_error(step_id: str, batch: Batch, index: int) -> StepError:
    from pipelines.errors import StepError

    return StepError(
        "a keyed step got a record without a key; re-key the stream with key_by(...) first",
        step=step_id,
        source=batch.source_of(index),
    )


class Aggregate(Operator):
    """Fold each key's records into its accumulator; emit the key's new result per record."""

    def __init__(self, step_id: str, aggregation: Aggregation) -> None:
        super().__init__(step_id)
        self.aggregation = aggregation

    def process(self, batch: Batch) -> Batch:
        ctx = self.ctx
        store = ctx.store
        aggregation = self.aggregation
        results: list[Any] = []
        kept: list[int] = []
        for index, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            acc = store.get(key, _MISSING)
            try:
                if acc is _MISSING:
                    acc = aggregation.initial()
                acc = aggregation.fold(acc, value)
                result = aggregation.result(acc)
            except Exception as error:  # a user function failed: routed by the policy
                what = describe_function(type(aggregation))
                ctx.reject(batch, index, user_error(self.step_id, what, error, batch, index))
                continue
            store.put(key, acc)
            results.append(result)
            kept.append(index)
        out = batch if len(kept) == len(batch) else batch.take(kept)
        return out.with_values(results)


class Dedupe(Operator):
    """Pass the first record of each key, and drop the records of that key whose event time is
    less than ``horizon_ms`` after it.

    A key is forgotten once the largest event time seen passes its first record by the horizon.
    That is decided record by record (so what passes does not depend on how records are
    batched), through a heap of (time, key) that finds those keys without scanning the store;
    the heap is built once, from the store, after a restore.
    """

    def __init__(self, step_id: str, horizon_ms: int) -> None:
        super().__init__(step_id)
        self.horizon_ms = horizon_ms
        self._expiry: list[tuple[int, int, Any]] | None = None
        self._tiebreak = itertools.count()
        self._latest = -(1 << 62)

    def process(self, batch: Batch) -> Batch:
        ctx = self.ctx
        store = ctx.store
        if self._expiry is None:
            self._expiry = [(t, next(self._tiebreak), k) for k, t in store.items()]
            heapq.heapify(self._expiry)
            self._latest = max((t for t, _, _ in self._expiry), default=self._latest)
        expiry, horizon = self._expiry, self.horizon_ms
        kept: list[int] = []
        for index, (key, stamp) in enumerate(zip(batch.keys, batch.timestamps, strict=True)):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            if stamp > self._latest:
                self._latest = stamp
                while expiry and expiry[0][0] <= stamp - horizon:
                    first, _, old = heapq.heappop(expiry)
                    if store.get(old) == first:
                        store.delete(old)
            seen = store.get(key)
            if seen is not None and 0 <= stamp - seen < horizon:
                continue
            store.put(key, stamp)
            heapq.heappush(expiry, (stamp, next(self._tiebreak), key))
            kept.append(index)
        return batch if len(kept) == len(batch) else batch.take(kept)


class EventTime(Operator):
    """Set each record's timestamp to ``time(value)`` (a tz-aware datetime or epoch ms), the
    event time windows and watermarks use; without ``time`` records keep their timestamps."""

    def __init__(self, step_id: str, time: Callable[[Any], Any] | None) -> None:
        super().__init__(step_id)
        self.time = time

    def process(self, batch: Batch) -> Batch:
        if self.time is None:
            return batch
        time = self.time

        def millis(value: Any) -> int:
            when = time(value)
            if isinstance(when, int):
                return when
            from pipelines.record import to_millis

            return to_millis(when)

        stamps, failed = call_each(self.ctx, millis, batch, name=describe_function(time))
        timed = batch.with_timestamps(stamps)
        if failed:
            return timed.take([i for i in range(len(batch)) if i not in failed])
        return timed
