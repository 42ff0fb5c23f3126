"""A topic as a pipeline declares it: name, partitions, serdes and retention."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pipelines.errors import PipelineDefinitionError
from pipelines.log.base import TopicSpec
from pipelines.serde import Json, Serde, Str, serde_for

__all__ = ["Topic"]

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class Topic:
    """A partitioned topic on the log.

    ``value`` and ``key`` take a :class:`~pipelines.serde.Serde`, a pydantic model class (values
    are validated when read), ``dict`` (JSON), ``str`` or ``bytes``. Values default to JSON and
    keys to UTF-8 text.

    ``time(value)`` gives a record's event time where it enters the pipeline (read from this
    topic): a tz-aware datetime, an ISO-8601 string or epoch milliseconds. Without it, the
    record's timestamp on the log is its event time.
    """

    __slots__ = (
        "compacted",
        "key_serde",
        "name",
        "partitions",
        "retention_ms",
        "time",
        "value_serde",
    )

    def __init__(
        self,
        name: str,
        *,
        partitions: int = 1,
        value: Serde | type[Any] | None = None,
        key: Serde | type[Any] | None = None,
        compacted: bool = False,
        retention_ms: int | None = None,
        time: Callable[[Any], Any] | None = None,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise PipelineDefinitionError(
                f"topic name {name!r} must be 1-200 letters, digits, '.', '_' or '-'"
            )
        if not isinstance(partitions, int) or partitions < 1:
            raise PipelineDefinitionError(
                f"topic {name!r} needs a positive number of partitions, got {partitions!r}"
            )
        self.name = name
        self.partitions = partitions
        self.value_serde = serde_for(value, default=Json())
        self.key_serde = serde_for(key, default=Str())
        self.compacted = compacted
        self.retention_ms = retention_ms
        if time is not None and not callable(time):
            raise PipelineDefinitionError(
                f"topic {name!r}: time= needs a function of the value, got {time!r}"
            )
        self.time = time

    @property
    def spec(self) -> TopicSpec:
        """What the log needs to create this topic."""
        return TopicSpec(self.name, self.partitions, self.compacted, self.retention_ms)

    def __repr__(self) -> str:
        return (
            f"Topic({self.name!r}, partitions={self.partitions}, "
            f"value={self.value_serde!r}, key={self.key_serde!r})"
        )
