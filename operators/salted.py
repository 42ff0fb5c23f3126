"""Salted aggregation: a hot key's records spread over several partitions, then merged.

``key_by(step_id, fn, salt=N)`` followed by an aggregation runs as four steps::

    key_by  step_id               key -> (key, salt), salt in 0..N-1 (SaltedKeyBy)
    aggregate  <agg>.partials     an accumulator per (key, salt) (PartialAggregate)
    key_by  <agg>.by-key          (key, salt) -> key, the partial travels as the value (Unsalt)
    aggregate  <agg>              the latest partial of each salt, merged per key (MergePartials)

The salt comes from the record's input offset through a multiplicative hash, so it is cheap,
spread evenly even over keys that come at a regular stride, and the same when a record is
processed again after a crash. The salted topic's key serde (:class:`SaltedKey`) appends it to
the key's bytes, so the partitioner sends each (key, salt) to its own partition: a key with most
of the records is folded by up to N tasks.

What the steps emit differs from an unsalted aggregation, and what they end with does not: the
partial step emits each sub-key's accumulator once per batch (its last), not once per record,
so the merge step gets a few records per batch instead of every record of the hot key; the
merge step emits the key's merged result each time a partial arrives. The last result of each
key equals the unsalted one whenever merging partial accumulators in any order gives what
folding the records in arrival order gives (:attr:`Aggregation.order_free`): counts, sums,
means, minimums and maximums, not ``collect`` or ``reduce``.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

from operators.aggregations import Aggregation
from operators.base import Operator, reject_call
from operators.stateful import missing_key_error
from operators.stateless import KeyBy
from pipelines.batch import Batch
from pipelines.errors import InvalidRecord
from pipelines.serde import Serde

__all__ = [
    "MAX_SALT",
    "MergePartials",
    "PartialAggregate",
    "SaltedKey",
    "SaltedKeyBy",
    "Unsalt",
    "salt_of",
]

MAX_SALT = 256
"""Sub-keys per key at most: the salt is one byte appended to the key's bytes."""
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing
_MASK = (1 << 64) - 1
_MISSING = object()


def salt_of(offset: int, salts: int) -> int:
    """The salt (0 to ``salts`` - 1) of the record read at ``offset``: Fibonacci hashing, so
    offsets at any regular stride still spread over every salt."""
    return ((offset * _GOLDEN) & _MASK) * salts >> 64


class SaltedKey(Serde):
    """Keys ``(key, salt)``: the bytes of ``key`` by ``inner``, then the salt as one byte."""

    def __init__(self, inner: Serde) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"SaltedKey({self.inner!r})"

    def serialize(self, value: Any) -> bytes:
        key, salt = value
        return self.inner.serialize(key) + bytes((salt,))

    def deserialize(self, data: bytes) -> tuple[Any, int]:
        if not data:
            raise InvalidRecord("a salted key needs at least its salt byte, got no bytes")
        return self.inner.deserialize(data[:-1]), data[-1]


class SaltedKeyBy(KeyBy):
    """Key each record with ``(fn(value), salt)``, the salt from its input offset."""

    def __init__(self, step_id: str, fn: Any, salts: int) -> None:
        super().__init__(step_id, fn)
        self.salts = salts

    def process(self, batch: Batch) -> Batch:
        keyed = super().process(batch)
        salts, offset_at = self.salts, keyed.offset_at
        return keyed.with_keys(
            [(key, salt_of(offset_at(i), salts)) for i, key in enumerate(keyed.keys)]
        )


class PartialAggregate(Operator):
    """Fold each (key, salt)'s records into its accumulator; emit, per batch, each sub-key's
    last accumulator once, as ``[salt, accumulator]``."""

    def __init__(self, step_id: str, aggregation: Aggregation) -> None:
        super().__init__(step_id)
        self.aggregation = aggregation

    def process(self, batch: Batch) -> Batch:
        ctx, aggregation = self.ctx, self.aggregation
        state = ctx.state()
        accs: dict[Any, Any] = {}
        last: dict[Any, int] = {}  # sub-key -> the index of its last record in the batch
        for index, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            acc = accs.get(key, _MISSING)
            if acc is _MISSING:
                acc = state.get(key, _MISSING)
            try:
                if acc is _MISSING:
                    acc = aggregation.initial()
                accs[key] = aggregation.fold(acc, value)
            except Exception as error:  # a user function failed: routed by the policy
                reject_call(ctx, type(aggregation), error, batch, index)
                continue
            last[key] = index
        for key, acc in accs.items():
            state.put(key, acc)
        out = batch.take(sorted(last.values()))
        return out.with_values([[key[1], accs[key]] for key in out.keys])


class Unsalt(Operator):
    """The ``key_by`` back to the original key: ``(key, salt)`` -> ``key``; values (the
    partials, which carry their salt) pass unchanged."""

    def process(self, batch: Batch) -> Batch:
        return batch.with_keys([key[0] for key in batch.keys])


class MergePartials(Operator):
    """Keep each key's latest partial accumulator per salt; emit the result of merging them,
    each time one arrives."""

    def __init__(self, step_id: str, aggregation: Aggregation) -> None:
        super().__init__(step_id)
        self.aggregation = aggregation

    def process(self, batch: Batch) -> Batch:
        ctx, aggregation = self.ctx, self.aggregation
        state = ctx.state()
        results: list[Any] = []
        kept: list[int] = []
        for index, (key, (salt, acc)) in enumerate(zip(batch.keys, batch.values, strict=True)):
            partials = {**state.get(key, {}), str(salt): acc}  # JSON state: string keys
            try:
                result = aggregation.result(reduce(aggregation.merge, partials.values()))
            except Exception as error:  # a user merge failed: routed by the policy
                reject_call(ctx, type(aggregation), error, batch, index)
                continue
            state.put(key, partials)
            results.append(result)
            kept.append(index)
        out = batch if len(kept) == len(batch) else batch.take(kept)
        return out.with_values(results)
