"""A task: one sub-topology of a pipeline processing one partition, a batch at a time.

:meth:`Task.process` takes a batch fetched from one of the sub-topology's input topics,
deserialises it once, pushes it through the steps (each operator called once per batch) and
hands what leaves the sub-topology to the worker's :class:`~pipelines.runtime.outbox.Outbox`
(repartition and output topics, the dead-letter topic) or to its sink writers. It never awaits:
the worker that owns the consume loop does the I/O.

The task runs every operator the same way, by what it declares (:class:`operators.base.Ports`),
never by its class: it wires each step once, when the task starts, to the steps each of its
outputs feeds and to the input of theirs it feeds. An operator with one input and one output
gets ``process(batch)`` and its batch goes on by its one output; any other gets
``process_ports(input, batch)`` and each batch it returns goes on by its output. What a step
needs prepared comes through its context (:class:`_StepContext`): its keyed state, as a view
per namespace of its store (``state(name)``), and a join's table.

Event time: the task keeps what it knows of its inputs' progress
(:class:`~pipelines.runtime.watermarks.InputMarks`), fed by the markers it reads and by the
event times of the records it reads (or that a step of it sets). :meth:`Task.advance` tells
the steps when the smallest mark over the inputs moves, and :meth:`Task.write_markers` passes
it on to every partition of the internal topics the task writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.base import SinkWriter, UnwritableValue
from operators.base import Operator, call_each
from operators.stateful import stamped
from pipelines.batch import Batch
from pipelines.errors import ErrorPolicy, RecordError, RecordSource
from pipelines.log.base import FetchedBatch, LogBackend, RawBatch, TopicPartition
from pipelines.record import Headers
from pipelines.runtime.hotkeys import KeySampler
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.state import TaskState
from pipelines.runtime.topology import SubTopology, Topology
from pipelines.runtime.watchdog import activity
from pipelines.runtime.watermarks import (
    END_OF_TIME,
    MARKS_STORE,
    NO_WATERMARK,
    Clock,
    InputMarks,
    SystemClock,
    is_marker_batch,
    marker_batch,
    split_markers,
)
from pipelines.state.api import DEFAULT_NAMESPACE, State
from pipelines.state.store import KeyValueStore
from pipelines.state.table import TableStore
from pipelines.steps import EntryStep, KeyByStep, OperatorStep, Port, Step, WriteStep
from pipelines.topic import Topic

__all__ = ["StepStats", "Task", "error_headers"]

_MARKS_KEY = ("marks",)
_SENT_KEY = ("sent",)  # the mark of the markers last written, with the marks they follow


@dataclass(slots=True)
class StepStats:
    """Counters of one step in one worker."""

    records_in: int = 0
    records_out: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    late: int = 0
    first_error: str | None = None
    """What went wrong with the first record the step rejected, and where it was read."""

    def as_list(self) -> list[int]:
        return [self.records_in, self.records_out, self.skipped, self.dead_lettered, self.late]


def error_headers(error: RecordError) -> Headers:
    """The headers a dead-letter record carries to say what went wrong, where."""
    headers = [
        ("headwater.error", str(error.message).encode()),
        ("headwater.error.type", type(error.__cause__ or error).__name__.encode()),
    ]
    if error.step is not None:
        headers.append(("headwater.step", error.step.encode()))
    if error.source is not None:
        headers += source_headers(error.source)
    return tuple(headers)


def source_headers(source: RecordSource) -> Headers:
    """The headers that say where a record was read from."""
    return (
        ("headwater.source.topic", source.topic.encode()),
        ("headwater.source.partition", str(source.partition).encode()),
        ("headwater.source.offset", str(source.offset).encode()),
    )


class _StepContext:
    """The :class:`~operators.base.StepContext` of one step in one task."""

    __slots__ = ("_store", "_table", "_task", "partition", "policy", "stats", "step_id")

    def __init__(self, task: Task, step: Step, stats: StepStats) -> None:
        self._task = task
        self.step_id = step.step_id
        self.partition = task.partition
        self.policy = step.error_policy or task.topology.pipeline.error_policy
        self.stats = stats
        self._store = task.state.stores.get(step.step_id)
        self._table = task.state.tables.get(step.step_id)

    def state(self, name: str = DEFAULT_NAMESPACE) -> State:
        return self._keyed().namespace(name)

    @property
    def store(self) -> State:
        return self._keyed()

    def _keyed(self) -> KeyValueStore:
        if self._store is None:
            raise RuntimeError(f"step {self.step_id!r} is not stateful: it has no store")
        return self._store

    @property
    def table(self) -> TableStore:
        if self._table is None:
            raise RuntimeError(f"step {self.step_id!r} is no join_table: it has no table")
        return self._table

    def reject(self, batch: Batch, index: int, error: RecordError) -> None:
        if self.policy is ErrorPolicy.FAIL:
            raise error
        if self.stats.first_error is None:
            self.stats.first_error = str(error)
        if self.policy is ErrorPolicy.SKIP:
            self.stats.skipped += 1
            return
        self.stats.dead_lettered += 1
        self._task.outbox.add(
            self._task.topology.pipeline.dead_letter_topic,
            [batch.raw_key_at(index)],
            [batch.raw_value_at(index)],
            [batch.timestamps[index]],
            [batch.headers_at(index) + error_headers(error)],
        )

    def late(self, batch: Batch, index: int) -> None:
        self.stats.late += 1
        source = batch.source_of(index)
        self._task.outbox.add(
            self._task.topology.late_topic(self.step_id),
            [batch.raw_key_at(index)],
            [batch.raw_value_at(index)],
            [batch.timestamps[index]],
            [
                (
                    *batch.headers_at(index),
                    ("headwater.late", self.step_id.encode()),
                    *source_headers(source),
                )
            ],
        )

    def observe(self, batch: Batch) -> None:
        self._task.marks.observe(batch.fetched.topic_partition, batch.timestamps)


_Links = tuple[tuple["_Node", int], ...]
"""Where one output of a step goes in its task: each step it feeds, with the number of the
input of that step's operator it feeds."""


@dataclass(slots=True, eq=False)
class _Node:
    """One step as its task runs it, wired once (see the module docstring)."""

    step: Step
    ctx: _StepContext
    operator: Operator | None = None
    """None for a step that reads a topic, a sink, and a step that runs in another task (a
    ``key_by`` read here, a window whose event time is set here: their context is needed)."""
    single: bool = True
    """One input and one output: the task calls ``process``; else ``process_ports``."""
    outputs: tuple[_Links, ...] = ()
    """Per output of the step (``step.outputs``), the steps of this task it feeds."""

    def input_for(self, port: Port) -> int:
        """The number of the operator's input that ``port`` feeds: with one input, every
        stream the step reads goes into it; else the step reads one stream per input, in
        order."""
        if self.operator is None or len(self.operator.ports.inputs) == 1:
            return 0
        return self.step.inputs.index(port)


class Task:
    """One sub-topology on one partition (see the module docstring)."""

    def __init__(
        self,
        topology: Topology,
        sub: SubTopology,
        partition: int,
        outbox: Outbox,
        writers: dict[str, SinkWriter],
        stats: dict[str, StepStats],
        state_dir: Path | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.topology = topology
        self.sub = sub
        self.partition = partition
        self.outbox = outbox
        self.state = TaskState(topology, sub, partition, state_dir)
        self.positions: dict[TopicPartition, int] = {
            TopicPartition(t.name, partition): 0 for t in sub.topics
        }
        """The offset after the last record processed, per input partition."""
        self.samplers = {tp: KeySampler() for tp in self.positions}
        """The key load of each input partition (:mod:`pipelines.runtime.hotkeys`)."""
        self.marks = InputMarks(
            {tp: topology.writers[tp.topic] for tp in self.positions},
            idle_ms=topology.idle_ms,
            clock=clock or SystemClock(),
        )
        self.mark = NO_WATERMARK
        """The event-time mark the steps were last told (the smallest over the inputs)."""
        self._writer_id = f"{sub.index}.{partition}"
        self._marked = topology.marked.get(sub.index, [])
        self._sent = NO_WATERMARK  # the mark last written to the internal topics
        self._saved_sent = NO_WATERMARK
        self._resumed: int | None = None  # the mark an end of time dropped to, not yet sent
        self._saved_marks: dict[str, list[object]] = {}
        self._stamped = sub.index in topology.stamped
        self._writers = writers
        self._nodes: dict[str, _Node] = {}
        for step in sub.steps:
            stats.setdefault(step.step_id, StepStats())
            node = self._nodes[step.step_id] = _Node(
                step, _StepContext(self, step, stats[step.step_id])
            )
            if isinstance(step, OperatorStep):
                node.operator = step.operator()
                node.single = node.operator.ports.single
                node.operator.open(node.ctx)
        borrowed: list[Step] = [*sub.entries.values()]  # a key_by read here, run upstream
        borrowed += [
            topology.stamps[s.step_id][1] for s in sub.steps if s.step_id in topology.stamps
        ]
        for step in borrowed:  # and a window downstream whose event time is set here
            if step.step_id not in self._nodes:
                stats.setdefault(step.step_id, StepStats())
                self._nodes[step.step_id] = _Node(
                    step, _StepContext(self, step, stats[step.step_id])
                )
        here = {step.step_id: self._nodes[step.step_id] for step in sub.steps}
        for node in self._nodes.values():
            node.outputs = tuple(
                self._links(here, (node.step.step_id, name)) for name in node.step.outputs
            )
        self._running = [(n, n.operator) for n in here.values() if n.operator is not None]
        self._entries = {topic: self._nodes[step.step_id] for topic, step in sub.entries.items()}
        self._keyed_input = len(self.state.stores) > 1 or any(
            topology.writers[topic.name][0] for topic in sub.topics
        )
        """Whether the task's input is partitioned by key: a ``key_by`` topic, or one that a
        keyed stateful step of the task reads (its state relies on it)."""

    @property
    def partitions(self) -> frozenset[TopicPartition]:
        """The input partitions this task reads."""
        return frozenset(self.positions)

    async def restore(self, log: LogBackend, committed: Mapping[TopicPartition, int]) -> None:
        """Start from the committed offsets (where nothing is, the log's start) and the state
        they reflect."""
        fresh = [tp for tp in self.positions if tp not in committed]
        starts = await log.start_offsets(fresh) if fresh else {}
        for tp in self.positions:
            self.positions[tp] = committed.get(tp, starts.get(tp, 0))
        await self.state.restore(log, committed)
        store = self.state.stores[MARKS_STORE]
        self.marks.load(store.get(_MARKS_KEY))
        self._saved_marks = self.marks.dump()
        self._sent = self._saved_sent = store.get(_SENT_KEY, NO_WATERMARK)
        self.advance(idle=False)

    def _links(self, here: Mapping[str, _Node], port: Port) -> _Links:
        """The steps of this task (``here``) that ``port`` feeds, each with its input that
        ``port`` feeds (a ``key_by``'s output is read from its topic, by another task or by
        this one as an entry)."""
        children = self.topology.children.get(port, ())
        return tuple(
            (here[c.step_id], here[c.step_id].input_for(port))
            for c in children
            if c.step_id in here
        )

    def close(self) -> None:
        for _, operator in self._running:
            operator.close()
        self.state.close()

    @property
    def pending(self) -> int:
        """Results that wait for time to pass (open windows), over every step."""
        return sum(operator.pending for _, operator in self._running)

    def advance(self, *, idle: bool) -> bool:
        """Tell the steps the inputs' mark if it moved (``idle``: the worker has nothing to
        fetch, so quiet external inputs may follow the wall clock); whether it moved."""
        mark = self.marks.mark(idle=idle)
        if mark < self.mark == END_OF_TIME:  # an ended source resumed: the end is to come
            self._dropped(mark)
        if mark <= self.mark:
            return False
        self.mark = mark
        tp = next(iter(self.positions))
        nothing = FetchedBatch(tp.topic, tp.partition, RawBatch([], [], []), [], -1)
        empty = Batch([], [], [], [], nothing)
        try:
            for node, operator in self._running:
                activity.enter(node.step.step_id)
                out = operator.on_watermark(mark, empty)
                if len(out):  # by the first output (see operators.base)
                    node.ctx.stats.records_out += len(out)
                    self._emit(node.outputs[0], out)
        finally:
            activity.idle()
        return True

    def checkpoint_marks(self, now_ms: int, *, handing_over: bool = False) -> None:
        """Before a checkpoint: queue a marker of the task's mark for every partition of the
        internal topics it writes, if the mark moved since the last, and keep what the task
        knows of its inputs in its state, if that changed.

        The mark of the markers written is kept too: a restore applies only state whose
        checkpoint committed, and a checkpoint commits after its markers are on the log (in its
        transaction, under exactly-once), so the next owner writes markers only for a mark they
        do not carry yet, never again for one the downstream tasks have (unread, those would
        count as lag at the end of a run).

        ``handing_over`` (the task's partitions are revoked, or the worker stops): no markers;
        the next owner writes them at its first checkpoint."""
        resumed, self._resumed = self._resumed, None
        if self._marked and not handing_over:
            if resumed is not None and self._sent == END_OF_TIME:
                # the downstream tasks took this task's end for good: its mark goes back, the
                # records after the end are theirs to wait for, and the end comes again
                self._send_marker(resumed, now_ms)
            if self.mark not in (NO_WATERMARK, self._sent):
                self._send_marker(self.mark, now_ms)
        store = self.state.stores[MARKS_STORE]
        marks = self.marks.dump()
        if marks != self._saved_marks:
            store.put(_MARKS_KEY, marks)
            self._saved_marks = marks
        if self._sent != self._saved_sent:
            store.put(_SENT_KEY, self._sent)
            self._saved_sent = self._sent

    def _dropped(self, mark: int) -> None:
        """The task's mark goes back from the end of time to ``mark``."""
        self.mark = mark
        if self._resumed is None:
            self._resumed = mark

    def _send_marker(self, mark: int, now_ms: int) -> None:
        marker = marker_batch(self._writer_id, mark, now_ms)
        for topic in self._marked:
            for partition in range(topic.partitions):
                self.outbox.add_to_partition(topic.name, partition, marker)
        self._sent = mark

    def process(self, fetched: FetchedBatch) -> None:
        """Run one fetched batch through the sub-topology."""
        tp = fetched.topic_partition
        activity.reading(tp, self.positions[tp], fetched.next_offset - 1)
        self.positions[tp] = fetched.next_offset
        if is_marker_batch(fetched.records):
            # the records first: a batch ends with the markers written after them
            fetched, markers = split_markers(fetched)
            if len(fetched.records):
                self._process(tp, fetched)
                if self.mark == END_OF_TIME:  # records after an end: the steps hear it again
                    self.advance(idle=False)
            resumed = self.marks.marked(tp, markers)
            if resumed is not None and self.mark == END_OF_TIME:
                # an upstream task's sources resumed after the end (its records came before
                # these markers): the end is to come again, after them
                self._dropped(resumed)
            return
        self._process(tp, fetched)

    def _process(self, tp: TopicPartition, fetched: FetchedBatch) -> None:
        self.samplers[tp].sample(fetched.records.keys)
        node = self._entries[fetched.topic]
        entry, ctx = node.step, node.ctx
        assert isinstance(entry, EntryStep)
        batch = self._decode(ctx, entry, fetched)
        if not isinstance(entry, KeyByStep):
            ctx.stats.records_in += len(fetched.records)
        time = entry.topic.time
        if time is not None:
            batch = stamped(ctx, time, batch)
        if not self._stamped:
            self.marks.observe(tp, batch.timestamps)
        if not isinstance(entry, KeyByStep):
            ctx.stats.records_out += len(batch)
        try:
            self._emit(node.outputs[0], batch)
        finally:
            activity.idle()

    def _decode(self, ctx: _StepContext, entry: EntryStep, fetched: FetchedBatch) -> Batch:
        topic = entry.topic
        raw = fetched.records
        count = len(raw)
        batch = Batch([None] * count, [None] * count, raw.timestamps, list(range(count)), fetched)
        values, value_errors = topic.value_serde.deserialize_many(raw.values)
        keys, key_errors = (
            (batch.keys, {})
            if raw.keys.count(None) == count
            else topic.key_serde.deserialize_many(raw.keys)
        )
        batch = Batch(keys, values, raw.timestamps, batch.origins, fetched)
        errors = value_errors | key_errors
        if not errors:
            return batch
        for index, error in sorted(errors.items()):
            error.step = entry.step_id
            error.source = batch.source_of(index)
            ctx.reject(batch, index, error)
        return batch.take([i for i in range(count) if i not in errors])

    def _emit(self, links: _Links, batch: Batch) -> None:
        if not batch:
            return
        for node, into in links:
            self._run(node, batch, into)

    def _run(self, node: _Node, batch: Batch, into: int) -> None:
        """Run ``batch``, arriving on input number ``into``, through the step of ``node``."""
        step = node.step
        activity.enter(step.step_id)
        stats = node.ctx.stats
        stats.records_in += len(batch)
        operator = node.operator
        if operator is None:  # a sink: the one step without an operator that a stream feeds
            if isinstance(step, WriteStep):
                self._write_topic(step, step.topic, batch)
                stats.records_out += len(batch)
            else:
                stats.records_out += self._write_sink(step, batch)
            return
        if not node.single:
            outs = operator.process_ports(into, batch)
            if len(outs) != len(node.outputs):
                raise TypeError(
                    f"step {step.step_id!r}: {type(operator).__name__}.process_ports returned "
                    f"{len(outs)} batches for its {len(node.outputs)} outputs "
                    f"{list(step.outputs)}"
                )
            for links, out in zip(node.outputs, outs, strict=True):
                stats.records_out += len(out)
                self._emit(links, out)
            return
        out = operator.process(batch)
        stats.records_out += len(out)
        if isinstance(step, KeyByStep):
            stamp = self.topology.stamps.get(step.step_id)
            if stamp is not None:  # a window downstream reads its event time from here
                time, window = stamp
                out = stamped(self._nodes[window.step_id].ctx, time, out)
                self.marks.observe(out.fetched.topic_partition, out.timestamps)
            self._write_topic(step, step.topic, out)
        else:
            self._emit(node.outputs[0], out)

    def _write_topic(self, step: Step, topic: Topic, batch: Batch) -> None:
        """Serialise ``batch`` with ``topic``'s serdes into the outbox."""
        ctx = self._nodes[step.step_id].ctx
        values, failed = call_each(
            ctx,
            topic.value_serde.serialize,
            batch,
            name=f"the value serde {topic.value_serde!r} of topic {topic.name!r}",
        )
        keys: Sequence[Any] = batch.keys
        if batch.keys.count(None) != len(batch.keys):
            keys, failed_keys = call_each(
                ctx,
                _nullable(topic.key_serde.serialize),
                batch,
                keys,
                name=f"the key serde {topic.key_serde!r} of topic {topic.name!r}",
            )
            failed |= failed_keys
        kept = batch
        if failed:
            indices = [i for i in range(len(batch)) if i not in failed]
            kept = batch.take(indices)
            values = [values[i] for i in indices]
            keys = [keys[i] for i in indices]
        headers = None
        if batch.fetched.records.headers is not None:
            headers = [kept.headers_at(i) for i in range(len(kept))]
        # records without keys stay on this task's partition number: workers then write
        # disjoint partitions of the output (no re-reading each other's frames to append)
        keys = list(keys)
        if self._on_own_partition(topic, kept, keys):
            batch_out = RawBatch(keys, values, kept.timestamps, headers)
            self.outbox.add_to_partition(topic.name, self.partition, batch_out)
            return
        self.outbox.add(topic, keys, values, kept.timestamps, headers, sticky=self.partition)

    def _on_own_partition(self, topic: Topic, batch: Batch, keys: list[Any]) -> bool:
        """Whether every record of ``batch`` (serialised ``keys``) belongs on this task's
        partition of ``topic``: the topic has as many partitions as the task's input, the input
        is partitioned by key, and each record still has the key bytes it was read with (so no
        step changed keys). Then Kafka's partitioner would give each the partition it was read
        from, and the batch skips it: ``murmur2`` is pure Python, ~1.5 µs a key the
        partitioner has not cached, which at 1M keys (a key each record) was 1.7 µs of the 6.4
        µs a keyed count record cost in process; the check is one list comparison."""
        if topic.partitions != self.sub.partitions or not self._keyed_input:
            return False
        read = batch.fetched.records.keys
        origins = batch.origins
        if origins and min(origins) < 0:  # made on a timer: no key read
            return False
        return [read[i] for i in origins] == keys

    def _write_sink(self, step: Step, batch: Batch) -> int:
        """Hand ``batch`` to the step's sink writer; how many records it took.

        A writer refuses a whole batch holding a value it cannot write (:class:`UnwritableValue`,
        see :mod:`connectors.base`); the batch then goes again a record at a time, and each
        record refused again follows the step's error policy."""
        writer = self._writers[step.step_id]
        try:
            writer.write(batch)
        except UnwritableValue:
            return self._write_each(step, writer, batch)
        return len(batch)

    def _write_each(self, step: Step, writer: SinkWriter, batch: Batch) -> int:
        """Write ``batch`` a record at a time, rejecting those the writer refuses (the error
        names the sink step and the record); how many it took."""
        ctx = self._nodes[step.step_id].ctx
        written = 0
        for index in range(len(batch)):
            try:
                writer.write(batch.take([index]))
            except UnwritableValue as error:
                rejection = RecordError(
                    error.message, step=step.step_id, source=batch.source_of(index)
                )
                rejection.__cause__ = error
                ctx.reject(batch, index, rejection)
            else:
                written += 1
        return written


def _nullable(serialize: Any) -> Any:
    return lambda key: None if key is None else serialize(key)
