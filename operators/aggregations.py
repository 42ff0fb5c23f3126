"""Aggregations: what a keyed ``aggregate`` step folds each key's records into.

An aggregation is an accumulator with four operations: ``initial()``, ``fold(acc, value)``,
``result(acc)`` (what the step emits) and ``merge(a, b)`` (combining two accumulators, which
session windows need when two sessions grow into one). Accumulators are stored as JSON, so they
are built from numbers, strings, lists and dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Aggregation",
    "Collect",
    "Count",
    "Fold",
    "Many",
    "Max",
    "Mean",
    "Min",
    "Reduce",
    "Sum",
    "as_aggregation",
]


def _identity(value: Any) -> Any:
    return value


class Aggregation(ABC):
    """Folds values into an accumulator (see the module docstring)."""

    @abstractmethod
    def initial(self) -> Any:
        """The accumulator of a key before its first record."""

    @abstractmethod
    def fold(self, acc: Any, value: Any) -> Any:
        """The accumulator after ``value``."""

    def result(self, acc: Any) -> Any:
        """What the step emits for ``acc``."""
        return acc

    @property
    def can_merge(self) -> bool:
        """Whether :meth:`merge` works (session windows need it)."""
        return type(self).merge is not Aggregation.merge

    @property
    def order_free(self) -> bool:
        """Whether merging accumulators of any split of the values, in any order, gives what
        folding them in arrival order gives: what a salted aggregation (``key_by(...,
        salt=N)``) needs, as it folds a key's records in several partial accumulators and
        merges those."""
        return False

    def merge(self, left: Any, right: Any) -> Any:
        """One accumulator for the values of both (needed by session windows)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot merge accumulators; give it a merge function to use "
            "it with session windows"
        )


class Count(Aggregation):
    """How many records."""

    order_free = True

    def initial(self) -> int:
        return 0

    def fold(self, acc: int, value: Any) -> int:
        return acc + 1

    def merge(self, left: int, right: int) -> int:
        return left + right


class Sum(Aggregation):
    """The sum of ``of(value)`` (the value itself by default)."""

    order_free = True

    def __init__(self, of: Callable[[Any], Any] = _identity) -> None:
        self.of = of

    def initial(self) -> Any:
        return 0

    def fold(self, acc: Any, value: Any) -> Any:
        return acc + self.of(value)

    def merge(self, left: Any, right: Any) -> Any:
        return left + right


class Min(Aggregation):
    """The smallest ``of(value)``."""

    order_free = True

    def __init__(self, of: Callable[[Any], Any] = _identity) -> None:
        self.of = of

    def initial(self) -> Any:
        return None

    def fold(self, acc: Any, value: Any) -> Any:
        item = self.of(value)
        return item if acc is None or item < acc else acc

    def merge(self, left: Any, right: Any) -> Any:
        return right if left is None else left if right is None else min(left, right)


class Max(Aggregation):
    """The largest ``of(value)``."""

    order_free = True

    def __init__(self, of: Callable[[Any], Any] = _identity) -> None:
        self.of = of

    def initial(self) -> Any:
        return None

    def fold(self, acc: Any, value: Any) -> Any:
        item = self.of(value)
        return item if acc is None or item > acc else acc

    def merge(self, left: Any, right: Any) -> Any:
        return right if left is None else left if right is None else max(left, right)


class Mean(Aggregation):
    """The mean of ``of(value)`` (accumulated as ``[sum, count]``)."""

    order_free = True

    def __init__(self, of: Callable[[Any], Any] = _identity) -> None:
        self.of = of

    def initial(self) -> list[Any]:
        return [0, 0]

    def fold(self, acc: list[Any], value: Any) -> list[Any]:
        return [acc[0] + self.of(value), acc[1] + 1]

    def result(self, acc: list[Any]) -> float | None:
        return acc[0] / acc[1] if acc[1] else None

    def merge(self, left: list[Any], right: list[Any]) -> list[Any]:
        return [left[0] + right[0], left[1] + right[1]]


class Collect(Aggregation):
    """The list of ``of(value)``, in arrival order (the last ``limit`` only, if given)."""

    def __init__(self, of: Callable[[Any], Any] = _identity, *, limit: int | None = None) -> None:
        self.of = of
        self.limit = limit

    def initial(self) -> list[Any]:
        return []

    def fold(self, acc: list[Any], value: Any) -> list[Any]:
        acc = [*acc, self.of(value)]
        return acc[-self.limit :] if self.limit else acc

    def merge(self, left: list[Any], right: list[Any]) -> list[Any]:
        merged = left + right
        return merged[-self.limit :] if self.limit else merged


class Reduce(Aggregation):
    """``fn(previous, value)`` over the values; the first value as it is."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn

    def initial(self) -> Any:
        return None

    def fold(self, acc: Any, value: Any) -> Any:
        return value if acc is None else self.fn(acc, value)

    def merge(self, left: Any, right: Any) -> Any:
        return right if left is None else left if right is None else self.fn(left, right)


class Fold(Aggregation):
    """A user aggregation: an initial accumulator (a value, or a function making one) and
    ``fold(acc, value)``; ``merge`` is optional."""

    def __init__(
        self,
        initial: Any,
        fold: Callable[[Any, Any], Any],
        merge: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self._initial = initial
        self._fold = fold
        self._merge = merge

    def initial(self) -> Any:
        return self._initial() if callable(self._initial) else self._initial

    def fold(self, acc: Any, value: Any) -> Any:
        return self._fold(acc, value)

    @property
    def can_merge(self) -> bool:
        return self._merge is not None

    @property
    def order_free(self) -> bool:
        """Given a ``merge``, taken as the user's word that it combines partials in any
        order."""
        return self._merge is not None

    def merge(self, left: Any, right: Any) -> Any:
        if self._merge is None:
            return super().merge(left, right)
        return self._merge(left, right)


class Many(Aggregation):
    """Several aggregations at once, by name: results come as a dict."""

    def __init__(self, parts: Mapping[str, Aggregation]) -> None:
        self.parts = dict(parts)

    def initial(self) -> dict[str, Any]:
        return {name: part.initial() for name, part in self.parts.items()}

    def fold(self, acc: dict[str, Any], value: Any) -> dict[str, Any]:
        return {name: part.fold(acc[name], value) for name, part in self.parts.items()}

    def result(self, acc: dict[str, Any]) -> dict[str, Any]:
        return {name: part.result(acc[name]) for name, part in self.parts.items()}

    @property
    def can_merge(self) -> bool:
        return all(part.can_merge for part in self.parts.values())

    @property
    def order_free(self) -> bool:
        return all(part.order_free for part in self.parts.values())

    def merge(self, left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
        return {name: part.merge(left[name], right[name]) for name, part in self.parts.items()}


def as_aggregation(spec: Aggregation | Mapping[str, Aggregation]) -> Aggregation:
    """An aggregation from an aggregation or a dict of named ones."""
    if isinstance(spec, Aggregation):
        return spec
    if isinstance(spec, Mapping) and all(isinstance(a, Aggregation) for a in spec.values()):
        return Many(spec)
    raise TypeError(
        f"expected an Aggregation (Count(), Sum(...), ...) or a dict of them, got {spec!r}"
    )
