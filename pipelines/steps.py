"""The nodes of a pipeline's graph: one small immutable class per kind of step.

A :class:`~pipelines.pipeline.Pipeline` is a tuple of steps. Every step has what
:class:`StepBase` holds (its id, the ports it reads, the names of its outputs, its error
policy); beyond that each class carries only what its kind uses, so a field is never set for
one kind and meaningless for another. :data:`Step` is the union of the classes, and whoever
reads a graph (the compiler, the task, the graph drawing, the test harness) dispatches on the
step's class, with ``match`` or ``isinstance``; what the step does to records is up to the
operator it builds, which the runtime never asks the class of.

======================  ==========  ===========================================================
class                   ``kind``    the step
======================  ==========  ===========================================================
SourceStep              source      a connector source, read into its topic (by the runner)
ReadStep                read        a topic on the log read as it is (a ``LogTopic``, a table)
KeyByStep               key_by      re-keys records and writes them to its repartition topic
StatelessStep           operator    map, filter, flat_map, peek; ``apply`` without state
StatefulStep            operator    keeps keyed state: aggregate, dedupe, ``apply(stateful=)``
WindowStep              window      cuts event time into windows for the aggregation after it
WindowedAggregateStep   operator    aggregates per key and window; late records go aside
TableJoinStep           operator    looks each key up in a table topic
StreamJoinStep          operator    joins two streams within a time bound; late records aside
BranchStep              branch      splits a stream in the records a predicate matches and not
MergeStep               merge       one stream of several
SinkStep                sink        hands records to a connector sink
WriteStep               sink        writes records to a topic on the log (a ``LogTopic``)
======================  ==========  ===========================================================

``kind`` is a class constant: what the graph, ``describe`` and error messages call the step.
The steps that run an operator in a task derive from :class:`OperatorStep`. The unions below
name what several classes share: :data:`EntryStep` (a task reads its topic),
:data:`HasStore` (keyed state with a changelog) and :data:`HasLateData` (a late-data topic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

from connectors.base import Sink, Source
from operators.base import OUT, Operator
from operators.windowed import EmitMode
from operators.windows import Windows
from pipelines.errors import ErrorPolicy
from pipelines.topic import Topic

__all__ = [
    "BranchStep",
    "EntryStep",
    "HasLateData",
    "HasStore",
    "KeyByStep",
    "MergeStep",
    "OperatorStep",
    "Port",
    "ReadStep",
    "SinkStep",
    "SourceStep",
    "StatefulStep",
    "StatelessStep",
    "Step",
    "StepBase",
    "StepKind",
    "StreamJoinStep",
    "TableJoinStep",
    "WindowSpec",
    "WindowStep",
    "WindowedAggregateStep",
    "WriteStep",
    "topic_of",
]

StepKind = Literal["source", "read", "operator", "key_by", "branch", "merge", "sink", "window"]
Port = tuple[str, str]
"""An output of a step: (step id, output name), a name its operator declares (most have
``OUT``; branches have "matched" and "rest")."""


@dataclass(frozen=True, slots=True, eq=False)
class StepBase:
    """What every step has. Steps compare by identity: two chains share a step by holding
    the same object (see ``Pipeline._absorb``)."""

    kind: ClassVar[StepKind]
    step_id: str
    inputs: tuple[Port, ...] = field(default=(), kw_only=True)
    """The outputs of other steps this one reads, in the order of its operator's inputs."""
    outputs: tuple[str, ...] = field(default=(OUT,), kw_only=True)
    """The names of the step's outputs, as its operator declares them (``ports.outputs``)."""
    error_policy: ErrorPolicy | None = field(default=None, kw_only=True)
    """What happens to a record the step cannot process; ``None``: the pipeline's policy."""


@dataclass(frozen=True, slots=True, eq=False)
class SourceStep(StepBase):
    """A connector source the runner reads into ``topic``; the tasks read the topic."""

    kind = "source"
    topic: Topic
    source: Source


@dataclass(frozen=True, slots=True, eq=False)
class ReadStep(StepBase):
    """A topic already on the log, read as it is: a ``LogTopic`` source, or the table of a
    ``join_table`` that nothing else of the pipeline reads."""

    kind = "read"
    topic: Topic


@dataclass(frozen=True, slots=True, eq=False)
class SinkStep(StepBase):
    """Hands the records it reads to a connector sink."""

    kind = "sink"
    sink: Sink


@dataclass(frozen=True, slots=True, eq=False)
class WriteStep(StepBase):
    """Writes the records it reads to ``topic`` on the log, with its serdes (a ``LogTopic``
    sink)."""

    kind = "sink"
    topic: Topic


@dataclass(frozen=True, slots=True, eq=False)
class OperatorStep(StepBase):
    """A step that runs an operator in its task: ``operator()`` builds one per task."""

    operator: Callable[[], Operator]


@dataclass(frozen=True, slots=True, eq=False)
class KeyByStep(OperatorStep):
    """Re-keys each record and writes it to ``topic`` (``<pipeline>.<step>``), which the tasks
    downstream read: the task that runs the operator is not the one that reads its output."""

    kind = "key_by"
    topic: Topic
    salt: int | None = None
    """With ``salt=``: the sub-keys each key is spread over, which only an aggregation that
    merges partial results may follow (see :mod:`operators.salted`)."""


@dataclass(frozen=True, slots=True, eq=False)
class StatelessStep(OperatorStep):
    """An operator without state: map, filter, flat_map, peek, or one of one's own."""

    kind = "operator"
    transforms: bool = False
    """Whether the step replaces values (map, flat_map), so they may no longer fit the serde
    of the topic they were read from."""


@dataclass(frozen=True, slots=True, eq=False)
class StatefulStep(OperatorStep):
    """An operator with keyed state, a store the runtime keeps in a changelog topic: an
    aggregation, a dedupe, the steps of a salted aggregation, one's own with
    ``stateful=True``."""

    kind = "operator"
    transforms: bool = False
    """As :attr:`StatelessStep.transforms` (a dedupe passes its values on; the others do
    not)."""


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """How a ``window`` step cuts event time, for the ``aggregate`` that follows it."""

    windows: Windows
    lateness_ms: int
    grace_ms: int
    emit: EmitMode
    time: Callable[[Any], Any] | None = None
    """The event time of a value, evaluated once where the records get it (``stamp_at``)."""
    stamp_at: str | None = None
    """The ``key_by`` step whose task stamps the records with ``time`` before writing them,
    or ``None`` when the window's own task does."""


@dataclass(frozen=True, slots=True, eq=False)
class WindowStep(OperatorStep):
    """Cuts event time into windows; only a :class:`WindowedAggregateStep` may follow it."""

    kind = "window"
    window: WindowSpec
    idle_ms: int
    """How long an input may be quiet before its mark follows the wall clock."""


@dataclass(frozen=True, slots=True, eq=False)
class WindowedAggregateStep(OperatorStep):
    """Aggregates per key and window, in keyed state; records for a closed window go to its
    late-data topic. It replaces values."""

    kind = "operator"


@dataclass(frozen=True, slots=True, eq=False)
class TableJoinStep(OperatorStep):
    """Joins its first input with the rows of ``table``, the topic its second input reads,
    which each task keeps as a table. It replaces values."""

    kind = "operator"
    table: Topic


@dataclass(frozen=True, slots=True, eq=False)
class StreamJoinStep(OperatorStep):
    """Joins two streams within a time bound: records wait in keyed state, and late ones go
    to its late-data topic. It replaces values."""

    kind = "operator"
    idle_ms: int
    """How long an input may be quiet before its mark follows the wall clock."""


@dataclass(frozen=True, slots=True, eq=False)
class BranchStep(OperatorStep):
    """Sends the records its predicate matches to one output, the others to another."""

    kind = "branch"


@dataclass(frozen=True, slots=True, eq=False)
class MergeStep(OperatorStep):
    """One stream of the records of its inputs."""

    kind = "merge"


Step: TypeAlias = (
    SourceStep
    | ReadStep
    | KeyByStep
    | StatelessStep
    | StatefulStep
    | WindowStep
    | WindowedAggregateStep
    | TableJoinStep
    | StreamJoinStep
    | BranchStep
    | MergeStep
    | SinkStep
    | WriteStep
)
"""One node of the graph."""

EntryStep: TypeAlias = SourceStep | ReadStep | KeyByStep
"""The steps whose topic a task reads: the graph is cut into sub-topologies there."""
HasStore: TypeAlias = StatefulStep | WindowedAggregateStep | StreamJoinStep
"""The steps with keyed state: a store per task, kept in a changelog topic."""
HasLateData: TypeAlias = WindowedAggregateStep | StreamJoinStep
"""The steps that send records behind their watermark to a late-data topic."""


def topic_of(step: Step) -> Topic | None:
    """The topic ``step`` names: the one it reads or writes, or a join's table."""
    match step:
        case SourceStep(topic=topic) | ReadStep(topic=topic) | KeyByStep(topic=topic):
            return topic
        case WriteStep(topic=topic) | TableJoinStep(table=topic):
            return topic
    return None
