"""Pipelines of given values, a model of such values, the topic a ``key_by`` of a pipeline
repartitions through, and values in a form to compare as multisets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from pydantic import BaseModel

from connectors.memory import Iterable as IterableSource
from pipelines import Pipeline, Topic
from pipelines.errors import ErrorPolicy
from pipelines.steps import KeyByStep

__all__ = ["PageClick", "from_values", "repartition_topic", "sorted_json"]


class PageClick(BaseModel):
    """A user's click on a page."""

    user: str
    url: str


def from_values(
    values: Iterable[Any] = (1, 2, 3),
    *,
    name: str = "p",
    topic: str = "in",
    partitions: int = 1,
    step_id: str | None = None,
    error_policy: ErrorPolicy = ErrorPolicy.DEAD_LETTER,
    **source: Any,
) -> Pipeline:
    """Pipeline ``name`` whose source (step ``step_id``, by default named after its topic) reads
    ``values`` into ``topic``; ``source``: more options of the ``Iterable`` source."""
    return Pipeline(name, error_policy=error_policy).source(
        IterableSource(list(values), **source),
        into=Topic(topic, partitions=partitions),
        step_id=step_id,
    )


def repartition_topic(pipeline: Pipeline, step_id: str) -> Topic:
    """The topic ``key_by`` step ``step_id`` of ``pipeline`` repartitions through."""
    step = pipeline.step(step_id)
    assert isinstance(step, KeyByStep), f"step {step_id!r} is no key_by: {step!r}"
    return step.topic


def sorted_json(value: Any) -> bytes:
    """A hashable form of a JSON value in which key order does not matter, to compare
    multisets."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
