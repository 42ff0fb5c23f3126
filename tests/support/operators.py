"""Driving one operator by hand with :class:`pipelines.testing.OperatorHarness`: records given
as ``(key, event time in ms, value)`` triples, and what it rejected, checked to name its step
and the record's source."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.batch import Batch
from pipelines.errors import RecordSource, StepError
from pipelines.testing import OperatorHarness

__all__ = ["Keyed", "rejected_values", "send_keyed"]

Keyed = tuple[Any, int, Any]
"""(key, event time in ms, value) of one record."""


def send_keyed(harness: OperatorHarness, records: Iterable[Keyed], *, input: int = 0) -> Batch:
    """``records`` through the harness's operator as one batch (on its input ``input``); the
    batch it passes on."""
    records = list(records)
    return harness.send(
        [v for _, _, v in records],
        keys=[k for k, _, _ in records],
        timestamps=[t for _, t, _ in records],
        input=input,
    )


def rejected_values(harness: OperatorHarness) -> list[Any]:
    """The values of the records the operator rejected, in order, each rejection checked to be
    a :class:`~pipelines.errors.StepError` naming the operator's step and where its record was
    read."""
    for rejection in harness.rejected:
        error, record = rejection.error, rejection.record
        assert isinstance(error, StepError), error
        assert error.step == harness.operator.step_id
        assert error.source == RecordSource(record.topic, record.partition, record.offset)
    return [rejection.record.value for rejection in harness.rejected]
