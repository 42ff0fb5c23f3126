"""Log backends: ``memory``, ``embedded`` (the default) and ``kafka``."""

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
from pipelines.settings import KafkaSettings

__all__ = [
    "BACKENDS",
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

BackendName = Literal["memory", "embedded", "kafka"]
BACKENDS: tuple[BackendName, ...] = ("embedded", "memory", "kafka")


def open_log(
    backend: str = "embedded",
    *,
    data_dir: Path | str = DEFAULT_DATA_DIR,
    kafka: KafkaSettings | None = None,
) -> LogBackend:
    """The log backend called ``backend`` (``kafka`` connects lazily, on first use)."""
    if backend == "memory":
        return MemoryLog()
    if backend == "embedded":
        return EmbeddedLog(data_dir)
    if backend == "kafka":
        from pipelines.log.kafka import KafkaLog  # noqa: PLC0415 (aiokafka only when Kafka is used)

        return KafkaLog(kafka)
    raise PipelineDefinitionError(
        f"unknown log backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    )
