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

**Layers.** Each layer imports only the layers below it, so the packages import each other
without a cycle:

1. the base layer, in this package: records (:mod:`pipelines.record`), batches
   (:mod:`pipelines.batch`), errors, serdes, topics, the log interfaces
   (:mod:`pipelines.log.base`) and the state stores (:mod:`pipelines.state`);
2. the operators (``operators``) and the connectors (``connectors``);
3. the DSL (:mod:`pipelines.pipeline`), which makes steps (:mod:`pipelines.steps`) of
   operators and connectors;
4. the runtime (:mod:`pipelines.runtime`), which compiles and runs the DSL's pipelines, and the
   command line, notebook and test helpers on it. One runtime module is used lower down:
   :mod:`pipelines.runtime.watchdog` bounds the calls of a step function (``timeout=``) for
   the DSL, and imports only the base layer. The operators and connectors import nothing from
   the runtime: what an operator shares with it, such as the error of a call that overran its
   timeout, is in the base layer.

Importing a module of a package runs the package's ``__init__`` first: this one imports only
the base layer, so that the operators and connectors can import it at module level. The DSL's
``Pipeline`` is imported on first use, by the module ``__getattr__`` below (PEP 562):
``from pipelines import Pipeline`` and ``pipelines.Pipeline`` work as for any other name, and
type checkers see it through the ``TYPE_CHECKING`` import. ``tests/test_layers.py`` checks the
layers: no import cycle, a base layer that imports nothing above it, and operators and
connectors that import nothing from the DSL or the runtime.
"""

from typing import TYPE_CHECKING, Any

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
    StepTimeout,
    TopicError,
)
from pipelines.record import Headers, Record
from pipelines.serde import Bytes, Json, Model, Serde, Str
from pipelines.topic import Topic

if TYPE_CHECKING:  # imported on first use, by __getattr__: type checkers see it here
    from pipelines.pipeline import Pipeline

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
    "StepTimeout",
    "Str",
    "Topic",
    "TopicError",
]


def __getattr__(name: str) -> Any:
    """``Pipeline``, imported on first use (then kept here, as any other name)."""
    if name != "Pipeline":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pipelines.pipeline import Pipeline  # noqa: PLC0415 (the DSL is a layer above: first use)

    globals()[name] = Pipeline
    return Pipeline


def __dir__() -> list[str]:
    """What ``dir(pipelines)`` and completion show: ``Pipeline`` too, before its first use."""
    return sorted({*globals(), *__all__})
