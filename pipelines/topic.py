"""A topic as a pipeline declares it: name, partitions, serdes and retention."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pipelines.errors import PipelineDefinitionError
from pipelines.log.base import TopicSpec
from pipelines.serde import Json, Serde, Str, serde_for

__all__ = ["Topic"]

_MAX_NAME = 200
"""Kafka takes 249 characters; the embedded log keeps room for the suffixes it adds to a topic's
name in file names (``<topic>.<partition>``, temporary copies)."""
_REFUSED = re.compile(r"[^A-Za-z0-9._-]")
_CHARACTERS = "ASCII letters, digits, '.', '_' or '-'"


def _check_name(name: str) -> None:
    """Refuse a topic name that Kafka or the embedded log cannot take, saying why."""
    if not isinstance(name, str):
        raise PipelineDefinitionError(
            f"topic name must be a string, got {type(name).__name__} {name!r}"
        )
    if not name:
        raise PipelineDefinitionError(
            f"topic name is empty: give the topic 1-{_MAX_NAME} {_CHARACTERS}"
        )
    if name in (".", ".."):
        raise PipelineDefinitionError(
            f"topic name {name!r} is refused by Kafka (and names a directory, not a topic, in "
            "the embedded log): use a name with a letter, digit, '_' or '-' in it"
        )
    if len(name) > _MAX_NAME:
        raise PipelineDefinitionError(
            f"topic name {name[:40]!r}... is {len(name)} characters long: use at most {_MAX_NAME}"
        )
    refused = sorted(set(_REFUSED.findall(name)))
    if refused:
        raise PipelineDefinitionError(
            f"topic name {name!r} has characters Kafka refuses in topic names "
            f"({', '.join(map(repr, refused))}): use only {_CHARACTERS}"
        )


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
        "retention_bytes",
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
        retention_bytes: int | None = None,
        time: Callable[[Any], Any] | None = None,
    ) -> None:
        _check_name(name)
        if not isinstance(partitions, int) or partitions < 1:
            raise PipelineDefinitionError(
                f"topic {name!r} needs a positive number of partitions, got {partitions!r}"
            )
        self.name = name
        self.partitions = partitions
        self.value_serde = serde_for(value, default=Json())
        self.key_serde = serde_for(key, default=Str())
        self.compacted = compacted
        for setting, limit in (
            ("retention_ms", retention_ms),
            ("retention_bytes", retention_bytes),
        ):
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise PipelineDefinitionError(
                    f"topic {name!r}: {setting}= needs a positive whole number or None (keep "
                    f"everything), got {limit!r}"
                )
        self.retention_ms = retention_ms
        self.retention_bytes = retention_bytes
        if time is not None and not callable(time):
            raise PipelineDefinitionError(
                f"topic {name!r}: time= needs a function of the value, got {time!r}"
            )
        self.time = time

    @property
    def spec(self) -> TopicSpec:
        """What the log needs to create this topic."""
        return TopicSpec(
            self.name, self.partitions, self.compacted, self.retention_ms, self.retention_bytes
        )

    def __repr__(self) -> str:
        return (
            f"Topic({self.name!r}, partitions={self.partitions}, "
            f"value={self.value_serde!r}, key={self.key_serde!r})"
        )
