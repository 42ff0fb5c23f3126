"""Keyed stateful operators: ``aggregate`` (and the ``count``/``sum``/... shorthands) and
``dedupe``. Their state is one entry per record key in the default namespace of the step's
keyed state (``ctx.state()``), which the runtime restores after a crash or a rebalance; see
:mod:`pipelines.state.api` and :mod:`pipelines.state.store`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from operators._expiry import Expiry
from operators.aggregations import Aggregation
from operators.base import Operator, StepContext, call_each, describe_function, reject_call
from pipelines.batch import Batch
from pipelines.errors import StepError
from pipelines.record import event_millis

__all__ = ["Aggregate", "Dedupe", "EventTime", "missing_key_error", "stamped"]

_MISSING = object()


def missing_key_error(step_id: str, batch: Batch, index: int) -> StepError:
    return StepError(
        "a keyed step got a record without a key; re-key the stream with key_by(...) first",
        step=step_id,
        source=batch.source_of(index),
    )


class Aggregate(Operator):
    """Fold each key's records into its accumulator; emit the key's new result per record.

    With ``ttl_ms``, a key is forgotten once the task's event-time mark passes its latest
    record by that long (its next record starts from the initial accumulator); the store then
    keeps ``[acc, time]`` pairs and keys expire through :class:`~operators._expiry.Expiry`,
    never by scanning the store.
    """

    def __init__(self, step_id: str, aggregation: Aggregation, ttl_ms: int | None = None) -> None:
        super().__init__(step_id)
        self.aggregation = aggregation
        self._expiry = None if ttl_ms is None else Expiry(ttl_ms)

    def _forget(self, key: Any, stamp: int) -> None:
        state = self.ctx.state()
        entry = state.get(key)
        if entry is not None and entry[1] == stamp:
            state.delete(key)

    def process(self, batch: Batch) -> Batch:
        ctx = self.ctx
        state = ctx.state()
        aggregation = self.aggregation
        expiry = self._expiry
        if expiry is not None and not expiry.loaded:
            expiry.load((key, entry[1]) for key, entry in state.items())
        results: list[Any] = []
        kept: list[int] = []
        for index, (key, value, stamp) in enumerate(
            zip(batch.keys, batch.values, batch.timestamps, strict=True)
        ):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            acc = state.get(key, _MISSING)
            latest = stamp
            if expiry is not None and acc is not _MISSING:
                acc, latest = acc[0], max(stamp, acc[1])
            try:
                if acc is _MISSING:
                    acc = aggregation.initial()
                acc = aggregation.fold(acc, value)
                result = aggregation.result(acc)
            except Exception as error:  # a user function failed: routed by the policy
                reject_call(ctx, type(aggregation), error, batch, index)
                continue
            if expiry is None:
                state.put(key, acc)
            else:
                state.put(key, [acc, latest])
                expiry.stamp(key, latest)
            results.append(result)
            kept.append(index)
        out = batch if len(kept) == len(batch) else batch.take(kept)
        return out.with_values(results)

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        """Forget the keys whose latest record the mark has passed by the ttl."""
        expiry = self._expiry
        if expiry is not None:
            if not expiry.loaded:
                expiry.load((key, entry[1]) for key, entry in self.ctx.state().items())
            expiry.advance(mark, self._forget)
        return batch


class Dedupe(Operator):
    """Drop a record when a record of the same key passed whose event time is less than
    ``horizon_ms`` away from its own (before or after), whatever order they arrive in.

    The store keeps, per key, the event times of the records that passed; each is forgotten
    once the task's event-time mark has passed it by the horizon (see
    :mod:`operators._expiry`): the mark is the smallest over every upstream writer, so no
    record within the declared disorder can still need it.
    """

    def __init__(self, step_id: str, horizon_ms: int) -> None:
        super().__init__(step_id)
        self.horizon_ms = horizon_ms
        self._expiry = Expiry(horizon_ms)

    def _forget(self, key: Any, stamp: int) -> None:
        state = self.ctx.state()
        passed = state.get(key)
        if passed is None or stamp not in passed:
            return
        left = [s for s in passed if s != stamp]
        if left:
            state.put(key, left)
        else:
            state.delete(key)

    def _load(self) -> None:
        self._expiry.load(
            (key, stamp) for key, passed in self.ctx.state().items() for stamp in passed
        )

    def process(self, batch: Batch) -> Batch:
        ctx = self.ctx
        state = ctx.state()
        expiry, horizon = self._expiry, self.horizon_ms
        if not expiry.loaded:
            self._load()
        kept: list[int] = []
        for index, (key, stamp) in enumerate(zip(batch.keys, batch.timestamps, strict=True)):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            passed = state.get(key)
            if passed is not None and any(abs(stamp - s) < horizon for s in passed):
                continue
            state.put(key, [stamp] if passed is None else [*passed, stamp])
            expiry.stamp(key, stamp)
            kept.append(index)
        return batch if len(kept) == len(batch) else batch.take(kept)

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        """Forget the passed records the mark is a horizon beyond."""
        if not self._expiry.loaded:
            self._load()
        self._expiry.advance(mark, self._forget)
        return batch


class EventTime(Operator):
    """Set each record's timestamp to ``time(value)``, the event time windows and watermarks
    use (see :func:`stamped`); without ``time`` records keep their timestamps."""

    def __init__(self, step_id: str, time: Callable[[Any], Any] | None) -> None:
        super().__init__(step_id)
        self.time = time

    def process(self, batch: Batch) -> Batch:
        if self.time is None:
            return batch
        timed = stamped(self.ctx, self.time, batch)
        self.ctx.observe(timed)
        return timed


def stamped(ctx: StepContext, time: Callable[[Any], Any], batch: Batch) -> Batch:
    """``batch`` with each record's timestamp set to ``time(value)``: a datetime (tz-aware),
    an ISO-8601 string with a time zone, or milliseconds since the epoch. A record whose
    ``time`` raises or returns anything else is rejected through ``ctx``."""

    def millis(value: Any) -> int:
        return event_millis(time(value))

    stamps, failed = call_each(ctx, millis, batch, name=f"the event time {describe_function(time)}")
    timed = batch.with_timestamps(stamps)
    if failed:
        return timed.take([i for i in range(len(batch)) if i not in failed])
    return timed
