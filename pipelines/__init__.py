"""Headwater: declarative real-time stream processing pipelines.

The same pipeline runs in a notebook (``memory`` log), on one machine (``embedded`` durable log,
the default) and across machines (Apache Kafka)::

    from pipelines import Pipeline, Topic
    import connectors

    pipeline = (
        Pipeline("clicks")
        .source(connectors.JsonLines("clicks.jsonl"), into=Topic("clicks", partitions=4))
        .filter("only-products", lambda click: click["url"].startswith("/p/"))
        .sink(connectors.Stdout())
    )
"""

import pipelines._packages  # noqa: F401 - first: checks operators and connectors are ours
from pipelines.batch import Batch
from pipelines.errors import (
    ConnectorError,
    CorruptLogError,
    ErrorPolicy,
    InvalidRecord,
    LoadError,
    LogError,
    PipelineDefinitionError,
    PipelineError,
    RecordError,
    RecordSource,
    StepError,
    TopicError,
)
from pipelines.pipeline import Pipeline
from pipelines.record import Headers, Record
from pipelines.serde import Bytes, Json, Model, Serde, Str
from pipelines.topic import Topic

__all__ = [
    "Batch",
    "Bytes",
    "ConnectorError",
    "CorruptLogError",
    "ErrorPolicy",
    "Headers",
    "InvalidRecord",
    "Json",
    "LoadError",
    "LogError",
    "Model",
    "Pipeline",
    "PipelineDefinitionError",
    "PipelineError",
    "Record",
    "RecordError",
    "RecordSource",
    "Serde",
    "StepError",
    "Str",
    "Topic",
    "TopicError",
]
