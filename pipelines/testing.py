"""Test pipelines without any infrastructure: run them on the ``memory`` backend.

::

    from pipelines.testing import run_pipeline

    result = run_pipeline(pipeline, inputs={"clicks": [{"user": "ann", "url": "/p/1"}]})
    assert result.values("sink.stdout") == [...]

``inputs`` replaces the connector of a source step (by step id) with the given values, keyed
and timed by the replaced source's ``key=`` and ``timestamp=`` functions if it has them (a value
they cannot read gets no key, as in a file source, and the time of reading); every
sink of the pipeline is replaced by an in-memory collector, so ``result`` holds what each sink
would have received. Records that failed go to the dead-letter topic as they would in
production: ``result.dead_letters``. Works in plain Python, pytest and inside Jupyter (where an
event loop is already running): use :func:`run_pipeline_async` from async code.

A source that never ends (a generator that keeps yielding, a file followed) needs a stop:
``count=`` stops once the sinks received at least that many records (the batches in flight
finish, so a few more may arrive), ``timeout=`` after that many seconds; ``result.stopped_by``
says which ("count", "timeout", "stop" for the ``stop`` event of :func:`run_pipeline_async`,
"interrupt" for an interrupted notebook cell, or None: the input ran out).
``result.to_pandas(name)`` gives a sink's records, an inspected step's or a topic's as a
DataFrame (with ``headwater[notebook]``), and a result or a pipeline shows itself as a table
in a notebook.

``inspect=`` names steps (or ``True``: every step) whose output is kept as well, so what flows
out of a step in the middle of the pipeline can be looked at: ``result.inspect("parse")``.

``topics=`` writes records to topics of the pipeline before it starts: ``(key, value)`` pairs
per topic name, serialised with the topic's serdes and placed on the partition of their key.
That is how a table a ``join_table`` reads is there in full before the first record of the
stream: ``run_pipeline(p, inputs={...}, topics={"customers": [("c1", {...})]})``.

An operator of your own (a subclass of :class:`operators.Operator`) is tested on its own with
:class:`OperatorHarness`: batches in, the watermark moved by hand, its state checkpointed and
restored in a fresh operator, and what it emitted, rejected and found late kept for the test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from html import escape
from typing import Any

from connectors.memory import Collect
from connectors.memory import Iterable as IterableSource
from operators.base import Operator
from pipelines.batch import Batch
from pipelines.errors import ErrorPolicy, PipelineDefinitionError, RecordError
from pipelines.log.base import FetchedBatch, RawBatch, TopicPartition
from pipelines.log.memory import MemoryLog
from pipelines.partitioner import partition_for
from pipelines.pipeline import OUT, Pipeline
from pipelines.record import Record, from_millis, to_millis
from pipelines.runtime.deadletters import Group, summary
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.runtime.watermarks import END_OF_TIME, split_markers
from pipelines.state.api import DEFAULT_NAMESPACE, State
from pipelines.state.store import KeyValueStore
from pipelines.state.table import TableStore
from pipelines.steps import Port, SinkStep, SourceStep, Step, WriteStep
from pipelines.topic import Topic

__all__ = [
    "Checkpoint",
    "OperatorHarness",
    "Rejection",
    "TestResult",
    "run_pipeline",
    "run_pipeline_async",
]


@dataclass(slots=True)
class TestResult:
    """What each sink received, and what ended up on the log."""

    __test__ = False  # not a pytest test class

    sinks: dict[str, Collect]
    log: MemoryLog
    pipeline: Pipeline
    stopped_by: str | None = None
    """``"count"`` or ``"timeout"`` when a stop ended the run; None when the input ran out."""
    inspected: dict[Port, Collect] = field(default_factory=dict)
    """What flowed out of each inspected step's outputs."""
    dead_letter_groups: list[Group] = field(default_factory=list)
    """The dead letters counted by step and error type, with the first one's error."""

    def __repr__(self) -> str:
        sinks = ", ".join(f"{name}: {len(sink)}" for name, sink in sorted(self.sinks.items()))
        stop = f", stopped by {self.stopped_by}" if self.stopped_by else ""
        return (
            f"<TestResult of {self.pipeline.name!r}: {sinks or 'no sinks'}; "
            f"{len(self.dead_letters)} dead letters{stop}>"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{escape(name)}</td><td>{len(sink):,}</td>"
            f"<td>{escape(_preview(sink.values))}</td></tr>"
            for name, sink in sorted(self.sinks.items())
        )
        stop = f"; stopped by {escape(self.stopped_by)}" if self.stopped_by else ""
        return (
            f"<b>{escape(self.pipeline.name)}</b>: {len(self.dead_letters):,} dead letters{stop}"
            f"<table><tr><th>sink</th><th>records</th><th>first values</th></tr>{rows}</table>"
        )

    def to_pandas(self, name: str) -> Any:
        """The records of sink step ``name``, of inspected step ``name`` (see :meth:`inspect`)
        or of topic ``name`` (decoded) as a pandas DataFrame: ``key``, ``timestamp``, the
        value's fields as columns when values are dicts or models (else ``value``), and the
        ``topic``, ``partition`` and ``offset`` each was read from."""
        try:
            import pandas as pd  # noqa: PLC0415 (pandas, an optional dependency)
        except ImportError:
            raise ImportError("to_pandas needs pandas: pip install 'headwater[notebook]'") from None
        if name in self.sinks:
            records = self.records(name)
        elif any(step_id == name for step_id, _ in self.inspected):
            records = self.inspect(name)
        elif name in self._topics():
            records = self.topic(name, decode=True)
        else:
            raise KeyError(
                f"{name!r} is no sink step, inspected step or topic of the run; sinks: "
                f"{sorted(self.sinks)}, inspected: {sorted(p for p, _ in self.inspected)}, "
                f"topics: {sorted(self._topics())}"
            )
        values = [_fields(r.value) for r in records]
        if values and all(isinstance(v, dict) for v in values):
            frame = pd.DataFrame.from_records(values)
        else:
            frame = pd.DataFrame({"value": values})
        for column, data in (
            ("offset", [r.offset for r in records]),
            ("partition", [r.partition for r in records]),
            ("topic", [r.topic for r in records]),
            ("timestamp", [r.timestamp for r in records]),
            ("key", [r.key for r in records]),
        ):
            if column not in frame.columns:
                frame.insert(0, column, data)
        return frame

    def values(self, sink_step: str) -> list[Any]:
        """The values sink step ``sink_step`` received, in arrival order."""
        return list(self._sink(sink_step).values)

    def records(self, sink_step: str) -> list[Record]:
        """The records sink step ``sink_step`` received."""
        return list(self._sink(sink_step).records)

    def inspect(self, step_id: str, port: str | None = None) -> list[Record]:
        """The records that flowed out of step ``step_id`` (of its output ``port``: the first
        it declares by default; a branch has ``"matched"`` and ``"rest"``), when the run was
        asked to inspect it."""
        if port is None:  # the inspected outputs of a step are kept in their declared order
            port = next((p for s, p in self.inspected if s == step_id), OUT)
        try:
            return list(self.inspected[(step_id, port)].records)
        except KeyError:
            known = sorted(f"{s}:{p}" if p != OUT else s for s, p in self.inspected)
            raise KeyError(
                f"step {step_id!r} (output {port!r}) was not inspected; run with "
                f"inspect=[{step_id!r}] or inspect=True (inspected: {known})"
            ) from None

    def _topics(self) -> dict[str, Topic]:
        """Every topic of the run by name, with the serdes that read it: a late-data topic
        holds the bytes its step's records were read with, so it reads with that topic's."""
        topology = compile_pipeline(self.pipeline)
        found = {t.name: t for t in (*topology.topics, self.pipeline.dead_letter_topic)}
        for sub in topology.subtopologies:
            for step in sub.steps:
                late = topology.late_topics.get(step.step_id)
                if late is not None and sub.topics:
                    read = sub.topics[0]
                    found[late.name] = Topic(late.name, key=read.key_serde, value=read.value_serde)
        return found

    def _sink(self, step_id: str) -> Collect:
        try:
            return self.sinks[step_id]
        except KeyError:
            raise KeyError(
                f"no sink step {step_id!r}; the pipeline's sinks are {sorted(self.sinks)}"
            ) from None

    def topic(self, name: str, *, decode: bool = False) -> list[Record]:
        """Every record on topic ``name``, partition by partition (not the watermark markers
        among them): keys and values as bytes, or with ``decode=True`` as the topic's serdes
        read them (a record they cannot read keeps its bytes)."""
        found: list[Record] = []
        for partition in range(self.log.spec(name).partitions):
            fetched = self.log.read_now(TopicPartition(name, partition), 0, 1 << 62)
            fetched, _ = split_markers(fetched)
            raw = fetched.records
            found += [
                Record(
                    key=raw.keys[i],
                    value=raw.values[i],
                    timestamp=from_millis(raw.timestamps[i]),
                    headers=raw.header_at(i),
                    topic=name,
                    partition=partition,
                    offset=fetched.offsets[i],
                )
                for i in range(len(raw))
            ]
        return _decoded(found, self._topics()[name]) if decode else found

    @property
    def dead_letters(self) -> list[Record]:
        """Records that failed: original bytes, with the error and step in their headers."""
        return self.topic(self.pipeline.dead_letter_topic.name)


def _decoded(records: list[Record], topic: Topic) -> list[Record]:
    """``records`` with key and value read by ``topic``'s serdes, where they can be."""

    def read(serde: Any, data: bytes | None) -> Any:
        if data is None:
            return None
        try:
            return serde.deserialize(data)
        except Exception:  # shown as it is on the log
            return data

    return [
        replace(r, key=read(topic.key_serde, r.key), value=read(topic.value_serde, r.value))
        for r in records
    ]


def _fields(value: Any) -> Any:
    """A model's fields as a dict (for DataFrame columns); any other value as it is."""
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else value


def _preview(values: list[Any], shown: int = 3) -> str:
    text = ", ".join(repr(v) for v in values[:shown])
    return text + (", ..." if len(values) > shown else "")


def _as_replaced(source: object, attribute: str) -> Callable[[Any], Any] | None:
    """The ``key`` or ``timestamp`` function of a replaced source (``key=`` of JsonLines, Csv,
    Iterable...), made to give ``None`` for a value it does not fit instead of failing (a key
    the way a file source does; a timestamp then is the time of reading)."""
    function = getattr(source, attribute, None)
    if not callable(function):
        return None

    def applied(value: Any) -> Any:
        try:
            return function(value)
        except Exception:  # a malformed value: as the replaced source would treat it
            return None

    return applied


async def _prefill(
    log: MemoryLog, topology: Topology, topics: Mapping[str, Iterable[tuple[Any, Any]]]
) -> None:
    """Write the ``(key, value)`` pairs of ``topics`` to those topics of ``topology``."""
    declared = {t.name: t for t in topology.topics}
    unknown = sorted(set(topics) - set(declared))
    if unknown:
        raise PipelineDefinitionError(
            f"topics= names no topic of the pipeline: {unknown}; its topics are {sorted(declared)}"
        )
    await prepare_topics(log, topology)
    stamp = int(time.time() * 1000)
    for name, pairs in topics.items():
        topic = declared[name]
        batches: dict[int, RawBatch] = {}
        for key, value in pairs:
            raw_key = None if key is None else topic.key_serde.serialize(key)
            partition = 0 if raw_key is None else partition_for(raw_key, topic.partitions)
            batch = batches.setdefault(partition, RawBatch([], [], [], None))
            batch.keys.append(raw_key)
            batch.values.append(None if value is None else topic.value_serde.serialize(value))
            batch.timestamps.append(stamp)
        for partition, batch in sorted(batches.items()):
            log.append(TopicPartition(name, partition), batch)


def _taps(pipeline: Pipeline, inspect: Iterable[str] | bool) -> dict[Port, SinkStep]:
    """A collecting sink step on each output of each inspected step."""
    ids = {s.step_id: s for s in pipeline.steps}
    wanted = (
        [s.step_id for s in pipeline.steps if not isinstance(s, SinkStep | WriteStep)]
        if inspect is True
        else list(inspect or ())
    )
    unknown = [name for name in wanted if name not in ids]
    if unknown:
        raise PipelineDefinitionError(
            f"inspect names no step: {unknown}; the steps are {sorted(ids)}"
        )
    taps: dict[Port, SinkStep] = {}
    for name in wanted:
        step = ids[name]
        if isinstance(step, SinkStep | WriteStep):
            raise PipelineDefinitionError(
                f"step {name!r} is a sink: result.values({name!r}) has what it received",
                step=name,
            )
        for port in step.outputs:
            taps[(name, port)] = SinkStep(
                f"{name}.inspect.{port}", Collect(), inputs=((name, port),)
            )
    return taps


def _prepared(
    pipeline: Pipeline, inputs: Mapping[str, Iterable[Any]]
) -> tuple[Pipeline, dict[str, Collect]]:
    sources = {s.step_id for s in pipeline.steps if isinstance(s, SourceStep)}
    unknown = sorted(set(inputs) - sources)
    if unknown:
        raise PipelineDefinitionError(
            f"inputs name no source step: {unknown}; the source steps are {sorted(sources)}"
        )
    sinks: dict[str, Collect] = {}
    steps: list[Step] = []
    for declared in pipeline.steps:
        step = declared
        if isinstance(step, SourceStep) and step.step_id in inputs:
            source = IterableSource(
                list(inputs[step.step_id]),
                key=_as_replaced(step.source, "key"),
                timestamp=_as_replaced(step.source, "timestamp"),
            )
            step = replace(step, source=source)
        elif isinstance(step, SinkStep):
            sinks[step.step_id] = Collect()
            step = replace(step, sink=sinks[step.step_id])
        steps.append(step)
    prepared = pipeline._derive(tuple(steps), pipeline.tail)
    return prepared, sinks


async def run_pipeline_async(
    pipeline: Pipeline,
    inputs: Mapping[str, Iterable[Any]] | None = None,
    *,
    workers: int = 1,
    count: int | None = None,
    timeout: float | None = None,
    inspect: Iterable[str] | bool = (),
    stop: asyncio.Event | None = None,
    topics: Mapping[str, Iterable[tuple[Any, Any]]] | None = None,
) -> TestResult:
    """Run ``pipeline`` on a fresh memory log until every input is processed, its sinks
    received ``count`` records, ``timeout`` seconds passed or ``stop`` is set, keeping what
    flows out of the ``inspect`` steps."""
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
    prepared, sinks = _prepared(pipeline, inputs or {})
    taps = _taps(prepared, inspect)
    if taps:
        prepared = prepared._derive((*prepared.steps, *taps.values()), prepared.tail)
    log = MemoryLog()
    stop = stop or asyncio.Event()
    inspected = {port: tap.sink for port, tap in taps.items() if isinstance(tap.sink, Collect)}
    result = TestResult(sinks=sinks, log=log, pipeline=prepared, inspected=inspected)

    async def watch() -> None:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            if count is not None and sum(len(s) for s in sinks.values()) >= count:
                result.stopped_by = "count"
                break
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                result.stopped_by = "timeout"
                break
            await asyncio.sleep(0.01)
        stop.set()

    watcher = asyncio.create_task(watch()) if count is not None or timeout is not None else None
    assert stop is not None
    topology = compile_pipeline(prepared)
    await _prefill(log, topology, topics or {})
    try:
        await run_in_process(topology, log, workers=workers, stop=stop)
    finally:
        if watcher is not None:
            watcher.cancel()
    if result.stopped_by is None and stop.is_set():
        result.stopped_by = "stop"
    result.dead_letter_groups = await summary(log, topology)
    return result


def run_pipeline(
    pipeline: Pipeline,
    inputs: Mapping[str, Iterable[Any]] | None = None,
    *,
    workers: int = 1,
    count: int | None = None,
    timeout: float | None = None,
    inspect: Iterable[str] | bool = (),
    topics: Mapping[str, Iterable[tuple[Any, Any]]] | None = None,
) -> TestResult:
    """:func:`run_pipeline_async` from synchronous code, also where a loop is already running
    (Jupyter): then the pipeline runs on its own loop in a helper thread, and interrupting the
    cell stops it (``result.stopped_by == "interrupt"``) instead of leaving it running."""
    options: dict[str, Any] = {
        "workers": workers,
        "count": count,
        "timeout": timeout,
        "inspect": inspect,
        "topics": topics,
    }
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_pipeline_async(pipeline, inputs, **options))
    return _OnItsOwnLoop(pipeline, inputs, options).result()


class _OnItsOwnLoop:
    """A run on a loop of its own in a helper thread, which an interrupt stops cleanly."""

    def __init__(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Iterable[Any]] | None,
        options: dict[str, Any],
    ) -> None:
        self._args = (pipeline, inputs, options)
        self._stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._outcome: TestResult | BaseException | None = None
        self._started, self._finished = threading.Event(), threading.Event()
        # waited on rather than Thread.join: an interrupt landing inside join() can leave the
        # thread looking finished while it still runs
        threading.Thread(target=self._main, name="headwater-testing").start()

    def _main(self) -> None:
        try:
            self._outcome = asyncio.run(self._run())
        except BaseException as error:
            self._outcome = error
        finally:
            self._started.set()
            self._finished.set()

    async def _run(self) -> TestResult:
        pipeline, inputs, options = self._args
        stop = asyncio.Event()
        self._stop = (asyncio.get_running_loop(), stop)
        self._started.set()
        return await run_pipeline_async(pipeline, inputs, stop=stop, **options)

    def result(self) -> TestResult:
        interrupted = False
        try:
            self._finished.wait()
        except KeyboardInterrupt:
            interrupted = True
            self._started.wait()
            if self._stop is not None:
                loop, stop = self._stop
                with suppress(RuntimeError):  # the loop closed: the run has just ended
                    loop.call_soon_threadsafe(stop.set)
            self._finished.wait()
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        if interrupted:
            outcome.stopped_by = "interrupt"
        return outcome


# -- one operator, by hand -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record an operator rejected, and why (see :attr:`OperatorHarness.rejected`)."""

    record: Record
    error: RecordError


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a task keeps of one operator at a checkpoint: its state's changelog up to there,
    the input positions it reflects and the watermark the operator was last told. A harness
    built with ``checkpoint=`` starts from it, as the next owner of a partition does."""

    changelog: tuple[RawBatch, ...]
    positions: Mapping[TopicPartition, int]
    watermark: int | None


class _HarnessContext:
    """The :class:`~operators.base.StepContext` an :class:`OperatorHarness` gives its operator:
    it keeps what the operator rejects, sends late and observes."""

    __slots__ = ("_harness", "_store", "partition", "step_id")

    def __init__(
        self, harness: OperatorHarness, step_id: str, partition: int, store: KeyValueStore
    ) -> None:
        self._harness = harness
        self.step_id = step_id
        self.partition = partition
        self._store = store

    def state(self, name: str = DEFAULT_NAMESPACE) -> State:
        return self._store.namespace(name)

    @property
    def store(self) -> State:
        return self._store

    @property
    def table(self) -> TableStore:
        raise RuntimeError(
            f"step {self.step_id!r} has no table: the runtime prepares one for a join_table only"
        )

    def reject(self, batch: Batch, index: int, error: RecordError) -> None:
        self._harness.rejected.append(Rejection(batch.record(index), error))
        if self._harness.error_policy is ErrorPolicy.FAIL:
            raise error

    def late(self, batch: Batch, index: int) -> None:
        self._harness.late.append(batch.record(index))

    def observe(self, batch: Batch) -> None:
        self._harness._observed(batch.timestamps)


class OperatorHarness:
    """One operator (a subclass of :class:`operators.Operator`) driven by hand, in a step
    context as the runtime gives it for one partition: keyed state (:meth:`state`, each
    namespace as the operator's ``ctx.state(name)`` gives it, over :attr:`store`), records it
    rejects and late records kept for the test (:attr:`rejected`, :attr:`late`), and what it
    emits kept in order (:attr:`emitted`)::

        harness = OperatorHarness(lambda: MyOperator("mine"))
        out = harness.send([{"n": 1}, {"n": 2}], keys=["a", "b"], timestamps=[1000, 2000])
        harness.advance(5000)  # the watermark: what the operator emits as time passes
        assert [r.value for r in harness.emitted] == [...]

    ``send`` gives the operator one batch (``send_records`` a batch of
    :class:`~pipelines.record.Record`, ``send_batch`` a :class:`~pipelines.batch.Batch`), read
    from ``topic`` at the next offsets, and returns the batch it passes on by its first output.
    An operator with several inputs (:class:`operators.Ports`) is given a batch on the one
    ``input=`` names (by name or number); :meth:`output` has what left by any output.
    ``advance(mark)`` tells it the watermark moved (only forward: a mark at or below the last
    does nothing, as in the runtime); without a mark, to the largest event time it has seen
    (what the runtime's watermark is for one input partition); ``finish()`` tells it the input
    ended.

    ``checkpoint()`` is what a checkpoint keeps (the state's changes, the input positions, the
    watermark); ``OperatorHarness(factory, checkpoint=saved)`` restores it in a fresh operator,
    as the worker taking over after a crash does: what the operator did after the checkpoint is
    lost and its input comes again.

    Under ``error_policy=ErrorPolicy.FAIL`` a rejection raises its error out of ``send``, as
    it stops a run; under the others it is kept in :attr:`rejected` only. ``store=`` gives the
    operator a store of the test's own (a subclass that counts reads, say) instead of a fresh
    :class:`~pipelines.state.store.KeyValueStore`.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        operator: Operator | Callable[[], Operator],
        *,
        topic: str = "input",
        partition: int = 0,
        error_policy: ErrorPolicy = ErrorPolicy.DEAD_LETTER,
        checkpoint: Checkpoint | None = None,
        store: KeyValueStore | None = None,
    ) -> None:
        self.operator = operator if isinstance(operator, Operator) else operator()
        self.topic = topic
        self.partition = partition
        self.error_policy = ErrorPolicy(error_policy)
        self.rejected: list[Rejection] = []
        """Every record the operator rejected (its error policy routes it), with the error."""
        self.late: list[Record] = []
        """Every record the operator sent to its late-data topic."""
        self.watermark: int | None = None
        """The event-time mark the operator was last told (ms), None before the first."""
        self._outputs: dict[str, list[Record]] = {n: [] for n in self.operator.ports.outputs}
        step_id = self.operator.step_id
        store = KeyValueStore(step_id, partition) if store is None else store
        self._store = store
        self._ctx = _HarnessContext(self, step_id, partition, store)
        self._positions: dict[TopicPartition, int] = {}
        self._changelog: list[RawBatch] = []
        self._high: int | None = None  # the largest event time the operator has seen
        self._stamps_observed = False  # the operator sets event times (ctx.observe)
        if checkpoint is not None:
            self._changelog = list(checkpoint.changelog)
            self._positions = dict(checkpoint.positions)
            committed = {f"{tp.topic}/{tp.partition}": o for tp, o in self._positions.items()}
            for changes in self._changelog:
                self._store.apply(changes, committed)
        self.operator.open(self._ctx)
        if checkpoint is not None and checkpoint.watermark is not None:
            self.advance(checkpoint.watermark)  # as a restored task tells its steps

    @property
    def store(self) -> KeyValueStore:
        """The operator's keyed state on this partition: the store of all its namespaces,
        which is itself the default one."""
        return self._store

    def state(self, name: str = DEFAULT_NAMESPACE) -> State:
        """Namespace ``name`` of the operator's keyed state, as ``ctx.state(name)``."""
        return self._ctx.state(name)

    @property
    def pending(self) -> int:
        """Results the operator holds until time passes (open windows)."""
        return self.operator.pending

    @property
    def emitted(self) -> list[Record]:
        """Every record the operator passed on by its first output, in order: from batches
        and as time passed."""
        return self._outputs[self.operator.ports.outputs[0]]

    def output(self, name: str) -> list[Record]:
        """Every record the operator passed on by its output ``name``, in order."""
        if name not in self._outputs:
            raise KeyError(f"{name!r} is no output of the operator: {list(self._outputs)}")
        return self._outputs[name]

    def send(
        self,
        values: Iterable[Any],
        *,
        keys: Iterable[Any] | None = None,
        timestamps: Iterable[int | datetime] | None = None,
        input: int | str = 0,
    ) -> Batch:
        """One batch of ``values`` (with ``keys``, and event times in ms or as datetimes; by
        default no keys and time 0) through the operator; the batch it passes on."""
        values = list(values)
        count = len(values)
        keys = [None] * count if keys is None else list(keys)
        stamps = [0] * count if timestamps is None else [_millis(t) for t in timestamps]
        if not len(keys) == len(stamps) == count:
            raise ValueError(
                f"{count} values, {len(keys)} keys and {len(stamps)} timestamps: give one each"
            )
        index = self._input(input)
        return self.send_batch(self._batch(keys, values, stamps, index), input=index)

    def send_records(self, records: Iterable[Record], *, input: int | str = 0) -> Batch:
        """One batch of ``records`` (their keys, values and event times) through the operator;
        the batch it passes on."""
        records = list(records)
        return self.send(
            [r.value for r in records],
            keys=[r.key for r in records],
            timestamps=[r.timestamp for r in records],
            input=input,
        )

    def send_batch(self, batch: Batch, *, input: int | str = 0) -> Batch:
        """``batch`` through the operator, as the runtime calls it; the batch it passes on."""
        index = self._input(input)
        if batch.timestamps:
            self._seen(batch.timestamps)
        outs = self.operator.process_ports(index, batch)
        for name, out in zip(self.operator.ports.outputs, outs, strict=True):
            self._outputs[name] += out.records()
        return outs[0]

    def advance(self, mark: int | datetime | None = None) -> Batch:
        """Tell the operator every input has reached event time ``mark`` (by default the
        largest it has seen); what that lets it emit. Nothing happens unless the mark moves
        forward."""
        if mark is None:
            if self._high is None:
                raise ValueError("no event time seen yet: give the mark")
            mark = self._high
        millis = _millis(mark)
        if self.watermark is not None and millis <= self.watermark:
            return self._empty()
        self.watermark = millis
        out = self.operator.on_watermark(millis, self._empty())
        self.emitted.extend(out.records())
        return out

    def finish(self) -> Batch:
        """Tell the operator its input ended (every open window closes); what it emits."""
        return self.advance(END_OF_TIME)

    def checkpoint(self) -> Checkpoint:
        """What a checkpoint now keeps: the state's changes so far, the positions after the
        records sent and the watermark."""
        changes = self.store.changes(self._positions, now_ms=0)
        if changes is not None:
            self._changelog.append(changes)
        return Checkpoint(tuple(self._changelog), dict(self._positions), self.watermark)

    def close(self) -> None:
        """Close the operator, as its task ends."""
        self.operator.close()

    def _input(self, input: int | str) -> int:
        """The number of the operator's input ``input`` (a name or a number)."""
        inputs = self.operator.ports.inputs
        if isinstance(input, str):
            if input in inputs:
                return inputs.index(input)
        elif 0 <= input < len(inputs):
            return input
        raise ValueError(
            f"input {input!r}: {type(self.operator).__name__} has inputs {list(inputs)}"
        )

    def _batch(self, keys: list[Any], values: list[Any], stamps: list[int], index: int) -> Batch:
        """A batch read at the next offsets of input ``index`` (input 0 reads ``topic``, the
        others ``<topic>-<index>``)."""
        tp = TopicPartition(f"{self.topic}-{index}" if index else self.topic, self.partition)
        first = self._positions.get(tp, 0)
        count = len(values)
        self._positions[tp] = first + count
        raw = RawBatch([None] * count, [None] * count, stamps)
        offsets = list(range(first, first + count))
        fetched = FetchedBatch(tp.topic, tp.partition, raw, offsets, first + count)
        return Batch(keys, values, stamps, list(range(count)), fetched)

    def _empty(self) -> Batch:
        nothing = FetchedBatch(self.topic, self.partition, RawBatch([], [], []), [], -1)
        return Batch([], [], [], [], nothing)

    def _seen(self, stamps: list[int]) -> None:
        """Event times read with the records (unless the operator sets its own)."""
        if not self._stamps_observed:
            self._high = max([*stamps, *([] if self._high is None else [self._high])])

    def _observed(self, stamps: list[int]) -> None:
        """Event times the operator set (``ctx.observe``): they are what moves the mark."""
        if not self._stamps_observed:
            self._stamps_observed, self._high = True, None
        if stamps:
            self._high = max([*stamps, *([] if self._high is None else [self._high])])


def _millis(when: int | datetime) -> int:
    return when if isinstance(when, int) else to_millis(when)
