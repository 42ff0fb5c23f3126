"""Routing operators: ``branch`` splits a stream in two, ``merge`` joins streams into one.

A branch is an operator with two outputs (:class:`~operators.base.Ports`): ``matched`` and
``rest``. A merge keeps the default ports: every stream it merges feeds its one input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from operators.base import Operator, Ports, call_each
from pipelines.batch import Batch

__all__ = ["Branch", "Merge"]


class Branch(Operator):
    """Send the records for which ``predicate(value)`` is true one way and the rest the other."""

    ports = Ports(outputs=("matched", "rest"))

    def __init__(self, step_id: str, predicate: Callable[[Any], object]) -> None:
        super().__init__(step_id)
        self.predicate = predicate

    def process_ports(self, input: int, batch: Batch) -> tuple[Batch, Batch]:
        """The matching records and the others (records whose predicate raised are in neither)."""
        flags, failed = call_each(self.ctx, self.predicate, batch)
        matched = [i for i, flag in enumerate(flags) if flag and i not in failed]
        rest = [i for i, flag in enumerate(flags) if not flag and i not in failed]
        return batch.take(matched), batch.take(rest)


class Merge(Operator):
    """Pass records from every input on, as one stream."""

    def process(self, batch: Batch) -> Batch:
        return batch
