"""Log backends: ``memory``, ``embedded`` (the default) and, with its issue, ``kafka``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipelines.errors import PipelineDefinitionError
from pipelines.log.base import (
    Consumer,
    FetchedBatch,
    LogBackend,
    Producer,
    RawBatch,
    RebalanceListener,
    TopicPartition,
    TopicSpec,
)
from pipelines.log.embedded import DEFAULT_DATA_DIR, EmbeddedLog
from pipelines.log.memory import MemoryLog

__all__ = [
    "BackendName",
    "Consumer",
    "EmbeddedLog",
    "FetchedBatch",
    "LogBackend",
    "MemoryLog",
    "Producer",
    "RawBatch",
    "RebalanceListener",
    "TopicPartition",
    "TopicSpec",
    "open_log",
]

BackendName = Literal["memory", "embedded"]


def open_log(backend: str = "embedded", *, data_dir: Path | str = DEFAULT_DATA_DIR) -> LogBackend:
    """The log backend called ``backend``."""
    if backend == "memory":
        return MemoryLog()
    if backend == "embedded":
        return EmbeddedLog(data_dir)
    raise PipelineDefinitionError(f"unknown log backend {backend!r}; choose 'memory' or 'embedded'")
