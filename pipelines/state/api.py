"""What an operator sees of its state: :class:`State`, a small keyed map, one per namespace.

A stateful step has one store per partition (:class:`~pipelines.state.store.KeyValueStore`),
which the runtime restores, turns into changelog batches and copies to disk; an operator never
sees that side. It asks its context for a namespace, ``ctx.state("windows")``, and gets a
:class:`State` over the entries of that name only: keys of two namespaces never meet, so an
operator keeps different kinds of entries (its watermark, its open windows, the records a join
holds) apart by name, not by the shape of their keys. ``ctx.state()`` is the default
namespace, :data:`DEFAULT_NAMESPACE`, where a keyed aggregation keeps one entry per record key.

Keys and values are JSON-serialisable (a key read back from the changelog has its lists as
tuples, so keys are best kept as tuples, strings and numbers); a namespace's name is any string
without a NUL character.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["DEFAULT_NAMESPACE", "State"]

DEFAULT_NAMESPACE = "default"
"""The namespace of ``ctx.state()``."""


class State(Protocol):
    """One namespace of a step's keyed state on one partition."""

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        ...

    def put(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value`` (JSON-serialisable)."""
        ...

    def delete(self, key: Any) -> None:
        """Remove ``key`` (nothing happens if it is not there)."""
        ...

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) of the namespace; a scan of the whole store, for a step that
        rebuilds an index of its state after a restore, not for the path of each record."""
        ...

    def __len__(self) -> int:
        """How many entries the namespace holds (the default namespace of a store without
        other namespaces counts at no cost; any other count is a scan, as :meth:`items`)."""
        ...
