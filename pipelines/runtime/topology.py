"""A pipeline compiled for running: its sub-topologies, topics and the links between steps.

As in Kafka Streams, the graph is cut into sub-topologies at every topic it reads: the topic a
source writes into, a ``LogTopic`` it reads, and each ``key_by`` repartition topic. A *task* is
one sub-topology on one partition number; it reads that partition of each of the
sub-topology's input topics (more than one only where ``merge`` joins streams from different
topics, which must then have equal partition counts).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from operators.base import OUT
from pipelines.errors import PipelineDefinitionError
from pipelines.pipeline import Pipeline
from pipelines.steps import (
    EntryStep,
    HasLateData,
    HasStore,
    KeyByStep,
    Port,
    ReadStep,
    SinkStep,
    SourceStep,
    Step,
    StreamJoinStep,
    TableJoinStep,
    WindowStep,
    topic_of,
)
from pipelines.topic import Topic

__all__ = ["SubTopology", "Topology", "compile_pipeline"]


@dataclass(slots=True)
class SubTopology:
    """Steps that run together in one task, fed by ``topics``."""

    index: int
    topics: list[Topic] = field(default_factory=list)
    entries: dict[str, EntryStep] = field(default_factory=dict)  # topic name -> its reader
    steps: list[Step] = field(default_factory=list)

    @property
    def partitions(self) -> int:
        return self.topics[0].partitions


@dataclass(slots=True)
class Topology:
    """Everything the runtime needs to know about a pipeline's graph."""

    pipeline: Pipeline
    children: dict[Port, list[Step]]
    subtopologies: list[SubTopology]
    by_topic: dict[str, SubTopology]
    topics: list[Topic]
    """Every topic the pipeline writes or reads, in declaration (= topological) order."""
    input_topics: list[Topic]
    """The topics the workers consume, upstream first."""
    group: str
    """The consumer group of the pipeline's workers (the pipeline's name unless overridden)."""
    changelogs: dict[str, Topic] = field(default_factory=dict)
    """The changelog topic of each stateful step, one partition per task partition."""
    marks_changelogs: dict[int, Topic] = field(default_factory=dict)
    """Per sub-topology: the changelog of its tasks' input marks (see
    :mod:`pipelines.runtime.watermarks`)."""

    late_topics: dict[str, Topic] = field(default_factory=dict)
    """The late-data topic of each windowed step."""

    writers: dict[str, tuple[bool, frozenset[str]]] = field(default_factory=dict)
    """Per input topic: whether it is internal (a ``key_by`` topic, marked by the tasks that
    write it) and the writers whose markers count: those tasks, or the source steps whose
    end-of-time markers end a partition of an external topic."""
    marked: dict[int, list[Topic]] = field(default_factory=dict)
    """Per sub-topology: the internal topics its tasks write markers to."""
    stamps: dict[str, tuple[Callable[[Any], Any], WindowStep]] = field(default_factory=dict)
    """Per ``key_by`` step that sets the event time of a window downstream: the window's
    ``time`` function and the window step (whose error policy applies)."""
    stamped: frozenset[int] = frozenset()
    """The sub-topologies where a step sets the event time: their input partitions' marks
    come from that step, not from the timestamps records were read with."""
    idle_ms: int = 10_000
    """How long an external input may be quiet before its mark follows the wall clock."""

    def changelog_topic(self, step_id: str) -> Topic:
        return self.changelogs[step_id]

    def late_topic(self, step_id: str) -> Topic:
        return self.late_topics[step_id]

    @property
    def source_steps(self) -> list[SourceStep]:
        """The steps whose connector sources the runner reads."""
        return [s for s in self.pipeline.steps if isinstance(s, SourceStep)]

    @property
    def sink_steps(self) -> list[SinkStep]:
        """The steps that hand records to a connector sink (not those writing a topic)."""
        return [s for s in self.pipeline.steps if isinstance(s, SinkStep)]

    @property
    def positions_topic(self) -> Topic:
        """Where source steps keep their positions (key: step id, value: JSON position)."""
        return Topic(f"{self.pipeline.internal_prefix}source-positions", compacted=True, value=dict)


def compile_pipeline(pipeline: Pipeline, *, group: str | None = None) -> Topology:
    """Check ``pipeline`` as a whole and cut it into sub-topologies."""
    steps = pipeline.steps
    if not any(isinstance(s, SourceStep | ReadStep) for s in steps):
        raise PipelineDefinitionError(f"pipeline {pipeline.name!r} has no source")
    _check_given_topics(pipeline)
    children: dict[Port, list[Step]] = defaultdict(list)
    for step in steps:
        for port in step.inputs:
            children[port].append(step)

    # Union-find over the topic-reading steps: each starts a sub-topology; a step that takes
    # streams of several of them (merge) joins theirs into one.
    parent = {s.step_id: s.step_id for s in steps if isinstance(s, EntryStep)}

    def find(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    anchor: dict[str, str] = {}  # step id -> an entry step of the sub-topology it runs in

    def produced_in(step_id: str) -> str:
        """The sub-topology (an entry step id) whose task emits this step's output."""
        return step_id if step_id in parent else anchor[step_id]

    for step in steps:
        if isinstance(step, SourceStep | ReadStep):
            anchor[step.step_id] = step.step_id
            continue
        homes = [produced_in(upstream_id) for upstream_id, _ in step.inputs]
        for other in homes[1:]:
            parent[find(other)] = find(homes[0])
        anchor[step.step_id] = homes[0]

    subs: dict[str, SubTopology] = {}
    by_topic: dict[str, SubTopology] = {}
    for root in parent:
        subs.setdefault(find(root), SubTopology(len(subs)))
    for step in steps:
        subs[find(anchor[step.step_id])].steps.append(step)
        if isinstance(step, EntryStep):
            entry_sub = subs[find(step.step_id)]
            entry_sub.topics.append(step.topic)
            entry_sub.entries[step.topic.name] = step
            by_topic[step.topic.name] = entry_sub
    for sub in subs.values():
        counts = {t.name: t.partitions for t in sub.topics}
        if len(set(counts.values())) > 1:
            merge = next((s.step_id for s in sub.steps if len(s.inputs) > 1), None)
            raise PipelineDefinitionError(
                f"merged or joined streams come from topics with different partition counts "
                f"{counts}; give them the same number of partitions or key_by before merging",
                step=merge,
            )

    changelogs = {
        step.step_id: _changelog(f"{pipeline.internal_prefix}{step.step_id}", sub)
        for sub in subs.values()
        for step in sub.steps
        if isinstance(step, HasStore) and sub.topics
    }
    writers, marked = _writers(pipeline, subs, find, anchor)
    stamps, stamped = _stamps(pipeline, subs, find, anchor)
    _check_stamped([s for s in subs.values() if s.index in stamped], writers, stamps)
    idles = [s.idle_ms for s in steps if isinstance(s, WindowStep | StreamJoinStep)]
    late_topics = {
        step.step_id: Topic(
            f"{pipeline.internal_prefix}{step.step_id}.late", key=bytes, value=bytes
        )
        for step in steps
        if isinstance(step, HasLateData)
    }
    marks_changelogs = {
        sub.index: _changelog(f"{pipeline.internal_prefix}marks-{sub.index}", sub)
        for sub in subs.values()
        if sub.topics
    }
    topics = [
        *_declared_topics(pipeline),
        *changelogs.values(),
        *marks_changelogs.values(),
        *late_topics.values(),
    ]
    input_topics = [s.topic for s in steps if isinstance(s, EntryStep)]
    ordered = sorted(subs.values(), key=lambda s: s.index)
    return Topology(
        pipeline=pipeline,
        children=dict(children),
        subtopologies=ordered,
        by_topic=by_topic,
        topics=topics,
        input_topics=input_topics,
        group=group or pipeline.name,
        changelogs=changelogs,
        marks_changelogs=marks_changelogs,
        late_topics=late_topics,
        writers=writers,
        marked=marked,
        stamps=stamps,
        stamped=frozenset(stamped),
        idle_ms=min(idles, default=10_000),
    )


def _check_given_topics(pipeline: Pipeline) -> None:
    """Refuse a topic given to the pipeline whose name starts with its internal prefix, where
    the topics it names itself live: read back, its dead letters would loop forever; written
    to, a ``key_by`` topic would hold records its key function never saw, and a source's
    positions would reach a sink; and any such name may be one the pipeline takes tomorrow."""
    prefix = pipeline.internal_prefix
    for step, topic in _given_topics(pipeline):
        if not topic.name.startswith(prefix):
            continue
        suffix = topic.name.removeprefix(prefix)
        raise PipelineDefinitionError(
            f"topic {topic.name!r} {_internal_use(pipeline, suffix)}: names starting with "
            f"{prefix!r} are reserved for the topics the pipeline makes itself (key_by topics, "
            "dead letters, source positions, changelogs, late data); give this topic a name "
            f"outside that prefix, e.g. {pipeline.name + '-' + suffix!r} (a pipeline of another "
            "name may read these topics)",
            step=step.step_id,
        )


def _given_topics(pipeline: Pipeline) -> list[tuple[Step, Topic]]:
    """Each topic the pipeline was given, with the step that declares it: a source's ``into``,
    a ``LogTopic`` read or written, a ``join_table`` table. The reader a join adds for its
    table is left to the join, and a table that is one of the pipeline's ``key_by`` topics
    (the join then reads it where the ``key_by`` writes it) is no given topic."""
    tables = [(s.step_id, s.inputs[1][0]) for s in pipeline.steps if isinstance(s, TableJoinStep)]
    readers = {reader for join, reader in tables if reader == f"{join}.table"}
    given: list[tuple[Step, Topic]] = []
    for step in pipeline.steps:
        topic = topic_of(step)
        if topic is None or isinstance(step, KeyByStep) or step.step_id in readers:
            continue
        if isinstance(step, TableJoinStep) and isinstance(
            pipeline.step(step.inputs[1][0]), KeyByStep
        ):
            continue
        given.append((step, topic))
    return given


def _internal_use(pipeline: Pipeline, suffix: str) -> str:
    """What the topic ``<pipeline>.<suffix>`` is to the pipeline, as far as its name says."""
    name = pipeline.name
    if any(isinstance(s, KeyByStep) and s.step_id == suffix for s in pipeline.steps):
        return f"is the topic key_by {suffix!r} of pipeline {name!r} repartitions through"
    if suffix == "dead-letters":
        return f"is the dead-letter topic of pipeline {name!r}"
    if suffix == "source-positions":
        return f"is where the sources of pipeline {name!r} keep their positions"
    if suffix.endswith(".changelog"):
        return f"is named like a state changelog of pipeline {name!r}"
    if suffix.endswith(".late"):
        return f"is named like a late-data topic of pipeline {name!r}"
    return f"is named in the internal namespace of pipeline {name!r}"


def _changelog(prefix: str, sub: SubTopology) -> Topic:
    """A compacted changelog topic with a partition per task of ``sub``."""
    return Topic(
        f"{prefix}.changelog", partitions=sub.partitions, compacted=True, key=bytes, value=bytes
    )


def _writers(
    pipeline: Pipeline,
    subs: dict[str, SubTopology],
    find: Callable[[str], str],
    anchor: dict[str, str],
) -> tuple[dict[str, tuple[bool, frozenset[str]]], dict[int, list[Topic]]]:
    """Who writes each input topic (see :attr:`Topology.writers`), and the internal topics
    each sub-topology marks."""
    writers: dict[str, tuple[bool, frozenset[str]]] = {}
    marked: dict[int, list[Topic]] = defaultdict(list)
    for step in pipeline.steps:
        if not isinstance(step, EntryStep):
            continue
        topic = step.topic
        if isinstance(step, KeyByStep):
            upstream = subs[find(anchor[step.step_id])]
            tasks = frozenset(f"{upstream.index}.{p}" for p in range(upstream.partitions))
            writers[topic.name] = (True, tasks)
            marked[upstream.index].append(topic)
            continue
        sources = frozenset(
            s.step_id
            for s in pipeline.steps
            if isinstance(s, SourceStep) and s.topic.name == topic.name
        )
        writers.setdefault(topic.name, (False, sources))
    return writers, dict(marked)


def _check_stamped(
    stamped: list[SubTopology],
    writers: dict[str, tuple[bool, frozenset[str]]],
    stamps: dict[str, tuple[Callable[[Any], Any], WindowStep]],
) -> None:
    """Refuse a sub-topology that sets the event time and also reads a repartitioned topic,
    whose marks speak of the event time set upstream."""
    for sub in stamped:
        internal = [t.name for t in sub.topics if writers[t.name][0]]
        if not internal:
            continue
        at = next(s for s in sub.steps if isinstance(s, WindowStep) or s.step_id in stamps)
        raise PipelineDefinitionError(
            f"the event time is set in a task that also reads the repartitioned topics "
            f"{internal}, whose watermarks speak of the event time set upstream; set it "
            "where records enter (Topic(..., time=...))",
            step=at.step_id,
        )


def _stamps(
    pipeline: Pipeline,
    subs: dict[str, SubTopology],
    find: Callable[[str], str],
    anchor: dict[str, str],
) -> tuple[dict[str, tuple[Callable[[Any], Any], WindowStep]], set[int]]:
    """The ``key_by`` steps that set a window's event time, and the sub-topologies where a step
    sets the event time."""
    stamps: dict[str, tuple[Callable[[Any], Any], WindowStep]] = {}
    stamped: set[int] = set()
    for step in pipeline.steps:
        if not isinstance(step, WindowStep):
            continue
        spec = step.window
        if spec.time is None:
            continue
        at = spec.stamp_at or step.step_id
        stamped.add(subs[find(anchor[at])].index)
        if spec.stamp_at is not None:
            stamps[spec.stamp_at] = (spec.time, step)
    return stamps, stamped


def entry_port(step: Step) -> Port:
    """The port whose children receive what a topic-reading step reads."""
    return (step.step_id, OUT)


def _declared_topics(pipeline: Pipeline) -> list[Topic]:
    """Every topic of the pipeline once, refusing one name declared with two partition counts."""
    topics: dict[str, Topic] = {}
    declared = [topic for s in pipeline.steps if (topic := topic_of(s)) is not None]
    for topic in [*declared, pipeline.dead_letter_topic]:
        known = topics.setdefault(topic.name, topic)
        if known.partitions != topic.partitions:
            raise PipelineDefinitionError(
                f"topic {topic.name!r} is declared with {known.partitions} and with "
                f"{topic.partitions} partitions"
            )
    return list(topics.values())
