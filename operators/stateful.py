"""Keyed stateful operators: ``aggregate`` (and the ``count``/``sum``/... shorthands) and
``dedupe``. Their state lives in the step's store, which the runtime restores after a crash or a
rebalance; see :mod:`pipelines.state.store`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from operators._expiry import Expiry
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
    """Fold each key's records into its accumulator; emit the key's new result per record.

    With ``ttl_ms``, a key not updated for that long in event time is forgotten (its next
    record starts from the initial accumulator); the store then keeps ``[acc, time]`` pairs and
    keys expire through :class:`~operators._expiry.Expiry`, never by scanning the store.
    """

    def __init__(self, step_id: str, aggregation: Aggregation, ttl_ms: int | None = None) -> None:
        super().__init__(step_id)
        self.aggregation = aggregation
        self._expiry = None if ttl_ms is None else Expiry(ttl_ms)

    def _forget(self, key: Any, stamp: int) -> None:
        entry = self.ctx.store.get(key)
        if entry is not None and entry[1] == stamp:
            self.ctx.store.delete(key)

    def process(self, batch: Batch) -> Batch:
        ctx = self.ctx
        store = ctx.store
        aggregation = self.aggregation
        expiry = self._expiry
        if expiry is not None and not expiry.loaded:
            expiry.load((key, entry[1]) for key, entry in store.items())
        results: list[Any] = []
        kept: list[int] = []
        for index, (key, value, stamp) in enumerate(
            zip(batch.keys, batch.values, batch.timestamps, strict=True)
        ):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            if expiry is not None:
                expiry.advance(stamp, self._forget)
            acc = store.get(key, _MISSING)
            if expiry is not None and acc is not _MISSING:
                acc = acc[0]
            try:
                if acc is _MISSING:
                    acc = aggregation.initial()
                acc = aggregation.fold(acc, value)
                result = aggregation.result(acc)
            except Exception as error:  # a user function failed: routed by the policy
                what = describe_function(type(aggregation))
                ctx.reject(batch, index, user_error(self.step_id, what, error, batch, index))
                continue
            if expiry is None:
                store.put(key, acc)
            else:
                store.put(key, [acc, stamp])
                expiry.stamp(key, stamp)
            results.append(result)
            kept.append(index)
        out = batch if len(kept) == len(batch) else batch.take(kept)
        return out.with_values(results)


class Dedupe(Operator):
    """Pass the first record of each key, and drop the records of that key whose event time is
    less than ``horizon_ms`` after it. A key is forgotten once the largest event time seen
    passes its first record by the horizon (see :mod:`operators._expiry`)."""

    def __init__(self, step_id: str, horizon_ms: int) -> None:
        super().__init__(step_id)
        self.horizon_ms = horizon_ms
        self._expiry = Expiry(horizon_ms)

    def _forget(self, key: Any, stamp: int) -> None:
        if self.ctx.store.get(key) == stamp:
            self.ctx.store.delete(key)

    def process(self, batch: Batch) -> Batch:
        ctx = self.ctx
        store = ctx.store
        expiry, horizon = self._expiry, self.horizon_ms
        if not expiry.loaded:
            expiry.load(store.items())
        kept: list[int] = []
        for index, (key, stamp) in enumerate(zip(batch.keys, batch.timestamps, strict=True)):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            expiry.advance(stamp, self._forget)
            seen = store.get(key)
            if seen is not None and 0 <= stamp - seen < horizon:
                continue
            store.put(key, stamp)
            expiry.stamp(key, stamp)
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
