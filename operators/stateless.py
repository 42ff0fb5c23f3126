"""Stateless operators: ``map``, ``filter``, ``flat_map``, ``peek`` and ``key_by``.

Each one calls its user function once per record through :func:`~operators.base.call_each`
and drops the records whose call failed (the runtime has already routed them). ``map``,
``filter``, ``flat_map`` and ``peek`` also take an async function, given with how to call it
(``concurrent``, see :mod:`operators.concurrent`); ``key_by`` decides where records go and
takes a plain function only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from operators.base import CallsEach, Operator, call_each, describe_function
from operators.concurrent import Concurrent, listed
from pipelines.batch import Batch

__all__ = ["Filter", "FlatMap", "KeyBy", "Map", "Peek"]


def _without(batch: Batch, failed: set[int]) -> Batch:
    return batch.take([i for i in range(len(batch)) if i not in failed])


def _calls(concurrent: Concurrent | None) -> CallsEach:
    """How to call a step function: in turn, or, when it is async, ``concurrent``ly."""
    return call_each if concurrent is None else concurrent


class Map(Operator):
    """Replace each value with ``fn(value)``."""

    def __init__(
        self, step_id: str, fn: Callable[[Any], Any], *, concurrent: Concurrent | None = None
    ) -> None:
        super().__init__(step_id)
        self.fn = fn
        self._calls = _calls(concurrent)

    def process(self, batch: Batch) -> Batch:
        values, failed = self._calls(self.ctx, self.fn, batch)
        mapped = batch.with_values(values)
        return _without(mapped, failed) if failed else mapped


class Filter(Operator):
    """Keep the records for which ``predicate(value)`` is true."""

    def __init__(
        self,
        step_id: str,
        predicate: Callable[[Any], object],
        *,
        concurrent: Concurrent | None = None,
    ) -> None:
        super().__init__(step_id)
        self.predicate = predicate
        self._calls = _calls(concurrent)

    def process(self, batch: Batch) -> Batch:
        keep, failed = self._calls(self.ctx, self.predicate, batch)
        if failed:
            for index in failed:
                keep[index] = False
        return batch.compress(keep)


class FlatMap(Operator):
    """Replace each value with the values of the iterable ``fn(value)`` returns (maybe none),
    or, for an async ``fn``, of the iterable it returns or of the async generator it is."""

    def __init__(
        self,
        step_id: str,
        fn: Callable[[Any], Iterable[Any]],
        *,
        concurrent: Concurrent | None = None,
    ) -> None:
        super().__init__(step_id)
        self.fn = fn
        self._calls = _calls(concurrent)
        # a call's items are gathered within it, so that an error while iterating fails the
        # record the call was for
        self._listed: Callable[[Any], Any] = (
            (lambda value: list(fn(value))) if concurrent is None else functools.partial(listed, fn)
        )
        self._name = describe_function(fn)

    def process(self, batch: Batch) -> Batch:
        expanded, failed = self._calls(self.ctx, self._listed, batch, name=self._name)
        indices = [i for i, items in enumerate(expanded) if i not in failed for _ in items]
        values = [item for i, items in enumerate(expanded) if i not in failed for item in items]
        return batch.take(indices).with_values(values)


class Peek(Operator):
    """Call ``fn(value)`` for its side effect and pass every record on unchanged."""

    def __init__(
        self, step_id: str, fn: Callable[[Any], object], *, concurrent: Concurrent | None = None
    ) -> None:
        super().__init__(step_id)
        self.fn = fn
        self._calls = _calls(concurrent)

    def process(self, batch: Batch) -> Batch:
        _, failed = self._calls(self.ctx, self.fn, batch)
        return _without(batch, failed) if failed else batch


class KeyBy(Operator):
    """Set each record's key to ``fn(value)``; the runtime repartitions by it through the log."""

    def __init__(self, step_id: str, fn: Callable[[Any], Any]) -> None:
        super().__init__(step_id)
        self.fn = fn

    def process(self, batch: Batch) -> Batch:
        keys, failed = call_each(self.ctx, self.fn, batch)
        keyed = batch.with_keys(keys)
        return _without(keyed, failed) if failed else keyed
