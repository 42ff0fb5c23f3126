"""The ``Pipeline`` DSL: an immutable graph of steps, built fluently; nothing runs here.

Every method returns a new ``Pipeline`` that shares the steps declared so far and whose *tail*
is the step just added, so a chain reads top to bottom::

    pipeline = (
        Pipeline("clicks")
        .source(connectors.JsonLines("clicks.jsonl"), into=Topic("clicks", partitions=4))
        .filter("only-products", lambda c: c["url"].startswith("/p/"))
        .key_by("by-user", lambda c: c["user"])
        .sink(connectors.Stdout())
    )

Each step has a ``step_id`` unique in the pipeline; it names the step in metrics and errors and
names the internal topics a step owns (``key_by`` repartitions through ``<pipeline>.<step>``),
so it must keep its meaning across deployments. Every topic the pipeline names itself lives
under the prefix ``<pipeline>.`` (see :attr:`Pipeline.internal_prefix`), which the topics it is
given may not use. Mistakes in the graph raise :class:`~pipelines.errors.PipelineDefinitionError`
naming the step, when it is declared (or, for those only the whole graph shows, when it is
compiled).

A step's outputs are the ones its operator declares (:class:`operators.base.Ports`): ``"out"``
for most, ``"matched"`` and ``"rest"`` for a branch, the declared names for an operator of
one's own run with :meth:`Pipeline.apply`, whose other outputs, like a branch's matched records,
go down the chains ``then=`` builds. The steps are the immutable classes of
:mod:`pipelines.steps`, one per kind, each with only the fields its kind uses.
"""

from __future__ import annotations

import functools
import html
import inspect
import re
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Literal

from connectors.base import Sink, Source
from connectors.topic import LogTopic
from operators.aggregations import (
    Aggregation,
    Collect,
    Count,
    Fold,
    Max,
    Mean,
    Min,
    Reduce,
    Sum,
    as_aggregation,
)
from operators.base import OUT, Operator, describe_function
from operators.concurrent import DEFAULT_CONCURRENCY, Concurrent
from operators.joins import JoinHow, StreamJoin, TableJoin
from operators.routing import Branch, Merge
from operators.salted import (
    MAX_SALT,
    MergePartials,
    PartialAggregate,
    SaltedKey,
    SaltedKeyBy,
    Unsalt,
)
from operators.stateful import Aggregate, Dedupe, EventTime
from operators.stateless import Filter, FlatMap, KeyBy, Map, Peek
from operators.windowed import EmitMode, WindowedAggregate
from operators.windows import Windows
from pipelines.errors import ErrorPolicy, PipelineDefinitionError
from pipelines.runtime.watchdog import with_timeout
from pipelines.serde import Json, Model, Serde, Str, serde_for
from pipelines.steps import (
    BranchStep,
    EntryStep,
    KeyByStep,
    MergeStep,
    Port,
    ReadStep,
    SinkStep,
    SourceStep,
    StatefulStep,
    StatelessStep,
    Step,
    StreamJoinStep,
    TableJoinStep,
    WindowedAggregateStep,
    WindowSpec,
    WindowStep,
    WriteStep,
    topic_of,
)
from pipelines.topic import Topic

__all__ = ["OUT", "Pipeline"]

Guarantee = Literal["at_least_once", "exactly_once"]
"""``at_least_once`` (the default): a crash replays, never loses. ``exactly_once``: outputs to
the log, state changes and consumed offsets commit in one transaction per task."""

_STEP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Pipeline:
    """A declared pipeline: its name, its steps, and the tail new steps attach to.

    ``error_policy`` says what happens to a record a step cannot process (dead letter, skip,
    fail); ``max_dead_letter_ratio`` is the share of a step's records it may reject before
    ``headwater run`` fails the run (judged once the step has had 100 records): a typo in a
    function then stops the run instead of dead-lettering everything. ``standby_replicas=1``
    has another worker keep a warm copy of each task's state, which takes the task over when
    its owner dies (see :mod:`pipelines.runtime.standby`; the embedded log only, for now)."""

    __slots__ = (
        "_tail",
        "error_policy",
        "max_dead_letter_ratio",
        "name",
        "processing_guarantee",
        "standby_replicas",
        "steps",
    )

    def __init__(
        self,
        name: str,
        *,
        error_policy: ErrorPolicy = ErrorPolicy.DEAD_LETTER,
        processing_guarantee: Guarantee = "at_least_once",
        max_dead_letter_ratio: float = 0.5,
        standby_replicas: int = 0,
        _steps: tuple[Step, ...] = (),
        _tail: Port | None = None,
    ) -> None:
        if not _STEP_ID.fullmatch(name):
            raise PipelineDefinitionError(
                f"pipeline name {name!r} must start with a letter or digit and use only "
                "letters, digits, '.', '_' or '-' (at most 100)"
            )
        if processing_guarantee not in ("at_least_once", "exactly_once"):
            raise PipelineDefinitionError(
                f"processing_guarantee must be 'at_least_once' or 'exactly_once', "
                f"not {processing_guarantee!r}"
            )
        if isinstance(max_dead_letter_ratio, bool) or not (
            isinstance(max_dead_letter_ratio, int | float) and 0 <= max_dead_letter_ratio <= 1
        ):
            raise PipelineDefinitionError(
                f"max_dead_letter_ratio must be a number from 0 to 1 (the share of a step's "
                f"records it may reject), not {max_dead_letter_ratio!r}"
            )
        if isinstance(standby_replicas, bool) or standby_replicas not in (0, 1):
            raise PipelineDefinitionError(
                f"standby_replicas must be 0 or 1 (a warm copy of each task's state on one "
                f"other worker), not {standby_replicas!r}"
            )
        self.standby_replicas = standby_replicas
        self.name = name
        self.error_policy = ErrorPolicy(error_policy)
        self.max_dead_letter_ratio = float(max_dead_letter_ratio)
        self.processing_guarantee: Guarantee = processing_guarantee
        self.steps = _steps
        self._tail = _tail

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, steps={[s.step_id for s in self.steps]})"

    def _repr_html_(self) -> str:
        """For notebooks: the graph (:mod:`pipelines.graph`), then the steps as a table: each
        step's kind, what it reads from, and the topic it writes to or reads (with its
        partitions)."""
        from pipelines.graph import svg  # noqa: PLC0415 (a cycle: pipelines.graph imports this)

        rows = []
        for step in self.steps:
            match step:
                case SourceStep(source=connector) | SinkStep(sink=connector):
                    what = str(connector)
                case _:
                    what = step.kind
            topic = topic_of(step)
            shown = f"{topic.name} ({topic.partitions})" if topic is not None else ""
            inputs = ", ".join(name for name, _ in step.inputs)
            cells = (step.step_id, step.kind, what, inputs, shown)
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("step", "kind", "what", "from", "topic"))
        return (
            f"<b>Pipeline {html.escape(self.name)}</b> ({self.processing_guarantee}, errors: "
            f"{self.error_policy.value})<div>{svg(self)}</div>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        )

    @property
    def internal_prefix(self) -> str:
        """``<pipeline>.``: the prefix of every topic the pipeline names itself (its ``key_by``
        topics, dead letters, source positions, changelogs and late-data topics). A topic the
        pipeline is given (a source's ``into``, a ``LogTopic``, a table) may not start with it:
        ``compile_pipeline`` refuses one that does."""
        return f"{self.name}."

    @property
    def tail(self) -> Port | None:
        """The output the next step attaches to (``None`` before the first source)."""
        return self._tail

    def step(self, step_id: str) -> Step:
        """The step called ``step_id``."""
        for step in self.steps:
            if step.step_id == step_id:
                return step
        raise KeyError(step_id)

    # -- building ---------------------------------------------------------------------------

    def _with(self, step: Step, tail: Port | None = None, *, unsalts: bool = False) -> Pipeline:
        """This chain with ``step`` added, its tail at ``tail`` (default: the step's first
        output). ``unsalts``: the step is the partial aggregation of a salted ``key_by``, the
        one step other than an aggregation that may follow it."""
        pending = self._pending_window()
        if pending is not None and not isinstance(step, WindowedAggregateStep):
            raise PipelineDefinitionError(
                f"window {pending.step_id!r} must be followed by an aggregation "
                "(aggregate, count, sum, ...)",
                step=step.step_id,
            )
        if not unsalts:
            self._refuse_after_salt(self._tail, step.kind, step.step_id)
        if not _STEP_ID.fullmatch(step.step_id):
            raise PipelineDefinitionError(
                f"step id {step.step_id!r} must start with a letter or digit and use only "
                "letters, digits, '.', '_' or '-' (at most 100)",
                step=step.step_id,
            )
        if any(s.step_id == step.step_id for s in self.steps):
            raise PipelineDefinitionError(
                f"step id {step.step_id!r} is used twice in pipeline {self.name!r}; "
                "every step needs its own id",
                step=step.step_id,
            )
        default = (step.step_id, step.outputs[0])
        return self._derive((*self.steps, step), tail if tail is not None else default)

    def _derive(self, steps: tuple[Step, ...], tail: Port | None) -> Pipeline:
        """A pipeline like this one with other steps and tail."""
        return Pipeline(
            self.name,
            error_policy=self.error_policy,
            processing_guarantee=self.processing_guarantee,
            max_dead_letter_ratio=self.max_dead_letter_ratio,
            standby_replicas=self.standby_replicas,
            _steps=steps,
            _tail=tail,
        )

    def _pending_window(self) -> WindowStep | None:
        """The window step at the tail, which only an aggregation may follow."""
        if self._tail is None:
            return None
        step = self.step(self._tail[0])
        return step if isinstance(step, WindowStep) else None

    def _salted_at(self, port: Port | None) -> KeyByStep | None:
        """The salted ``key_by`` at ``port``, which only a mergeable aggregation may follow."""
        if port is None:
            return None
        step = self.step(port[0])
        return step if isinstance(step, KeyByStep) and step.salt is not None else None

    def _refuse_after_salt(self, port: Port | None, kind: str, step_id: str) -> None:
        """Refuse a step other than an aggregation after a salted ``key_by``: nothing else
        knows how to put a key's sub-keys back together."""
        salted = self._salted_at(port)
        if salted is not None:
            raise PipelineDefinitionError(
                f"key_by {salted.step_id!r} has salt={salted.salt}, so an aggregation that can "
                "merge partial results in any order must follow it (aggregate with Count, Sum, "
                "Min, Max, Mean or a dict of them; count, sum, min, max, mean); "
                f"{kind} {step_id!r} cannot (windows, joins, merges, dedupe and other steps "
                "are not supported after salt=)",
                step=step_id,
            )

    def _require_tail(self, step_id: str) -> Port:
        if self._tail is None:
            raise PipelineDefinitionError(
                f"step {step_id!r} has no input: start the pipeline with .source(...)",
                step=step_id,
            )
        return self._tail

    def source(
        self, source: Source | LogTopic, *, into: Topic | None = None, step_id: str | None = None
    ) -> Pipeline:
        """Read ``source`` into the topic ``into`` and continue from that topic.

        ``connectors.LogTopic(topic)`` reads a topic already on the log (no ``into``).
        """
        if isinstance(source, LogTopic):
            if into is not None:
                raise PipelineDefinitionError(
                    "a LogTopic source reads its own topic; leave out into=",
                    step=step_id or source.topic.name,
                )
            return self._with(ReadStep(step_id or source.topic.name, source.topic))
        if not isinstance(source, Source):
            raise PipelineDefinitionError(
                f"source() needs a connectors Source, got {type(source).__name__}",
                step=step_id,
            )
        if into is None:
            raise PipelineDefinitionError(
                f"source {source.name!r} needs a topic to write into: "
                "source(..., into=Topic('name', partitions=N))",
                step=step_id,
            )
        return self._with(SourceStep(step_id or into.name, into, source))

    def _operator(
        self,
        kind: type[StatelessStep | StatefulStep],
        step_id: str,
        build: Callable[[], Operator],
        policy: ErrorPolicy | None,
        *,
        transforms: bool = False,
    ) -> Pipeline:
        """This chain with a step of ``kind`` running what ``build`` makes on its tail."""
        tail = self._require_tail(step_id)
        return self._with(kind(step_id, build, transforms, inputs=(tail,), error_policy=policy))

    def map(
        self,
        step_id: str,
        fn: Callable[[Any], Any],
        *,
        on_error: ErrorPolicy | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> Pipeline:
        """Replace each value with ``fn(value)``. ``timeout``: seconds one call may take
        before it fails with :class:`~pipelines.errors.StepTimeout`, routed by the
        error policy (see :func:`~pipelines.runtime.watchdog.with_timeout`).

        ``fn`` may be an ``async def``: the calls of a batch then run concurrently, at most
        ``concurrency`` (default 100) at once, on one event loop of the process that every
        async step shares for the whole run (see :mod:`operators.concurrent`)."""
        fn, concurrent = _step_function(step_id, fn, timeout, concurrency)
        return self._operator(
            StatelessStep,
            step_id,
            lambda: Map(step_id, fn, concurrent=concurrent),
            on_error,
            transforms=True,
        )

    def filter(
        self,
        step_id: str,
        predicate: Callable[[Any], object],
        *,
        on_error: ErrorPolicy | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> Pipeline:
        """Keep the records for which ``predicate(value)`` is true (``timeout``, an async
        ``predicate`` and ``concurrency`` as for :meth:`map`)."""
        predicate, concurrent = _step_function(step_id, predicate, timeout, concurrency)
        return self._operator(
            StatelessStep,
            step_id,
            lambda: Filter(step_id, predicate, concurrent=concurrent),
            on_error,
        )

    def flat_map(
        self,
        step_id: str,
        fn: Callable[[Any], Iterable[Any] | Awaitable[Iterable[Any]] | AsyncIterable[Any]],
        *,
        on_error: ErrorPolicy | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> Pipeline:
        """Replace each value with every value of ``fn(value)`` (none, one or many;
        ``timeout`` as for :meth:`map`, bounding the call, not the iteration). An async ``fn``
        (``concurrency`` as for :meth:`map`) returns an iterable or is an async generator
        function; its ``timeout`` bounds the call and the iteration."""
        fn, concurrent = _step_function(step_id, fn, timeout, concurrency, generators=True)
        return self._operator(
            StatelessStep,
            step_id,
            lambda: FlatMap(step_id, fn, concurrent=concurrent),
            on_error,
            transforms=True,
        )

    def peek(
        self,
        step_id: str,
        fn: Callable[[Any], object],
        *,
        on_error: ErrorPolicy | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> Pipeline:
        """Call ``fn(value)`` for its side effect; records pass unchanged (``timeout``, an
        async ``fn`` and ``concurrency`` as for :meth:`map`)."""
        fn, concurrent = _step_function(step_id, fn, timeout, concurrency)
        return self._operator(
            StatelessStep, step_id, lambda: Peek(step_id, fn, concurrent=concurrent), on_error
        )

    def key_by(
        self,
        step_id: str,
        fn: Callable[[Any], Any],
        *,
        partitions: int | None = None,
        key: Serde | type[Any] | None = None,
        value: Serde | type[Any] | None = None,
        on_error: ErrorPolicy | None = None,
        salt: int | None = None,
    ) -> Pipeline:
        """Re-key each record with ``fn(value)`` and repartition by the new key.

        Records travel through the internal topic ``<pipeline>.<step_id>`` (``partitions``
        defaults to that of the topic the stream was read from), so every record with one key
        is processed by one task downstream. ``key`` and ``value`` are that topic's serdes: keys
        default to text, and values to the serde of the topic they were read from when no
        ``map``/``flat_map`` has changed them since, else to JSON (``value=SomeModel`` gives
        models back).

        ``salt=N`` (2 to 256) spreads each key over N sub-keys, so a hot key's records go to up
        to N partitions; the aggregation that must follow runs per sub-key, and its partial
        results are merged per key into the result it would give without salt (see
        :mod:`operators.salted`; it emits each key's result once per batch of partials, not
        once per record).
        """
        _check_callable(step_id, fn)
        tail = self._require_tail(step_id)
        salts = None if salt is None else _salts(step_id, salt)
        if salts is not None:
            key = SaltedKey(serde_for(key, default=Str()))

        def build() -> Operator:
            return KeyBy(step_id, fn) if salts is None else SaltedKeyBy(step_id, fn, salts)

        topic = Topic(
            f"{self.internal_prefix}{step_id}",
            partitions=partitions or self._partitions_at(tail),
            value=value or self._value_serde_at(tail),
            key=key,
        )
        return self._with(
            KeyByStep(step_id, build, topic, salt=salt, inputs=(tail,), error_policy=on_error)
        )

    # -- stateful steps ---------------------------------------------------------------------

    def aggregate(
        self,
        step_id: str,
        aggregation: Aggregation | Mapping[str, Aggregation] | None = None,
        *,
        initial: Any = None,
        fold: Callable[[Any, Any], Any] | None = None,
        merge: Callable[[Any, Any], Any] | None = None,
        ttl: timedelta | None = None,
        on_error: ErrorPolicy | None = None,
    ) -> Pipeline:
        """Fold each key's records into an accumulator kept in fault-tolerant state, and emit
        the key's new result for every record.

        Give an aggregation (``Count()``, ``Sum(lambda o: o.amount)``, ...), a dict of them
        (results come as a dict), or ``initial=`` and ``fold=(acc, value) -> acc`` (and
        ``merge=`` for session windows). Records need keys: ``key_by`` first. Accumulators are
        stored as JSON. After ``window(...)``, it aggregates per key and window. ``ttl`` forgets
        a key not updated for that long in event time (its next record starts afresh), without
        scanning the state.
        """
        if aggregation is None:
            if fold is None:
                raise PipelineDefinitionError(
                    "aggregate needs an aggregation, or initial= and fold=", step=step_id
                )
            _check_callable(step_id, fold)
            aggregation = Fold(initial, fold, merge)
        try:
            chosen = as_aggregation(aggregation)
        except TypeError as error:
            raise PipelineDefinitionError(str(error), step=step_id) from None
        salted = self._salted_at(self._tail)
        if salted is not None:
            return self._salted_aggregate(step_id, salted, chosen, ttl, on_error)
        window = self._pending_window()
        ttl_ms = None if ttl is None else _span_ms(step_id, "ttl", ttl)
        if window is None:
            return self._operator(
                StatefulStep,
                step_id,
                lambda: Aggregate(step_id, chosen, ttl_ms),
                on_error,
                transforms=True,
            )
        spec = window.window
        if ttl is not None:
            raise PipelineDefinitionError(
                "a windowed aggregation forgets each window when it closes: leave out ttl=",
                step=step_id,
            )
        if spec.windows.merging and not chosen.can_merge:
            raise PipelineDefinitionError(
                f"session windows merge accumulators, and {type(chosen).__name__} cannot: "
                "pass merge= with initial= and fold=",
                step=step_id,
            )

        def build() -> Operator:
            return WindowedAggregate(
                step_id,
                spec.windows,
                chosen,
                emit=spec.emit,
                grace_ms=spec.grace_ms,
                lateness_ms=spec.lateness_ms,
            )

        tail = self._require_tail(step_id)
        return self._with(
            WindowedAggregateStep(step_id, build, inputs=(tail,), error_policy=on_error)
        )

    def _salted_aggregate(
        self,
        step_id: str,
        salted: KeyByStep,
        aggregation: Aggregation,
        ttl: timedelta | None,
        on_error: ErrorPolicy | None,
    ) -> Pipeline:
        """``aggregate`` after a salted ``key_by``: partials per sub-key, a ``key_by`` back to
        the key, and their merge (see :mod:`operators.salted`)."""
        if not aggregation.order_free:
            raise PipelineDefinitionError(
                f"key_by {salted.step_id!r} has salt=, and {type(aggregation).__name__} cannot "
                "merge partial results into what it gives without salt (its result depends on "
                "the order of the records, or it has no merge): use Count, Sum, Min, Max or "
                "Mean (or a dict of them), a Fold with merge=, or leave out salt=",
                step=step_id,
            )
        if ttl is not None:
            raise PipelineDefinitionError(
                f"ttl= is not supported after a salted key_by ({salted.step_id!r}): leave out "
                "ttl= or salt=",
                step=step_id,
            )
        partial_id, by_key_id = f"{step_id}.partials", f"{step_id}.by-key"
        partials = self._with(
            StatefulStep(
                partial_id,
                lambda: PartialAggregate(partial_id, aggregation),
                transforms=True,
                inputs=(self._require_tail(step_id),),
                error_policy=on_error,
            ),
            unsalts=True,
        )
        assert isinstance(salted.topic.key_serde, SaltedKey)
        by_key = partials._with(
            KeyByStep(
                by_key_id,
                lambda: Unsalt(by_key_id),
                Topic(
                    f"{self.internal_prefix}{by_key_id}",
                    partitions=salted.topic.partitions,
                    key=salted.topic.key_serde.inner,
                ),
                inputs=((partial_id, OUT),),
                error_policy=on_error,
            )
        )
        return by_key._operator(
            StatefulStep,
            step_id,
            lambda: MergePartials(step_id, aggregation),
            on_error,
            transforms=True,
        )

    def count(self, step_id: str, *, ttl: timedelta | None = None) -> Pipeline:
        """The number of records per key so far (forgetting keys idle for ``ttl``)."""
        return self.aggregate(step_id, Count(), ttl=ttl)

    def sum(self, step_id: str, of: Callable[[Any], Any] = lambda v: v) -> Pipeline:
        """The sum of ``of(value)`` per key."""
        return self.aggregate(step_id, Sum(of))

    def min(self, step_id: str, of: Callable[[Any], Any] = lambda v: v) -> Pipeline:
        """The smallest ``of(value)`` per key."""
        return self.aggregate(step_id, Min(of))

    def max(self, step_id: str, of: Callable[[Any], Any] = lambda v: v) -> Pipeline:
        """The largest ``of(value)`` per key."""
        return self.aggregate(step_id, Max(of))

    def mean(self, step_id: str, of: Callable[[Any], Any] = lambda v: v) -> Pipeline:
        """The mean of ``of(value)`` per key."""
        return self.aggregate(step_id, Mean(of))

    def collect(
        self, step_id: str, of: Callable[[Any], Any] = lambda v: v, *, limit: int | None = None
    ) -> Pipeline:
        """The list of ``of(value)`` per key (the last ``limit``, if given)."""
        return self.aggregate(step_id, Collect(of, limit=limit))

    def reduce(self, step_id: str, fn: Callable[[Any, Any], Any]) -> Pipeline:
        """``fn(previous, value)`` over each key's values."""
        _check_callable(step_id, fn)
        return self.aggregate(step_id, Reduce(fn))

    def window(
        self,
        step_id: str,
        windows: Windows,
        *,
        time: Callable[[Any], Any] | None = None,
        lateness: timedelta = timedelta(0),
        grace: timedelta = timedelta(0),
        idle: timedelta = timedelta(seconds=10),
        emit: EmitMode = "close",
    ) -> Pipeline:
        """Cut the stream into event-time windows for the aggregation that must follow.

        ``time(value)`` gives a record's event time: a tz-aware datetime, an ISO-8601 string or
        epoch milliseconds (the record's timestamp by default). It is evaluated once, where the
        records enter the chain that leads here: when only ``key_by``, ``filter`` and ``peek``
        come in between, by the task that writes them to the first ``key_by`` topic, so the
        watermarks that task writes to that topic speak of the same event time.

        ``lateness`` is the bound on how far out of order records come. The watermark is the
        smallest event-time mark over every upstream writer (see
        :mod:`pipelines.runtime.watermarks`) minus ``lateness``; a window closes when the
        watermark reaches its end plus ``grace``, and records for closed windows go to
        ``<pipeline>.<step>.late``. When the sources are exhausted every window closes; an
        input quiet for ``idle`` (while its worker has nothing to fetch) follows the wall
        clock. ``emit="close"`` emits each window's final result once; ``emit="update"`` emits
        on every change.
        """
        if not isinstance(windows, Windows):
            raise PipelineDefinitionError(
                f"window() needs Tumbling, Hopping, Sliding or Session windows, got {windows!r}",
                step=step_id,
            )
        if emit not in ("close", "update"):
            raise PipelineDefinitionError(
                f"emit must be 'close' or 'update', not {emit!r}", step=step_id
            )
        tail = self._require_tail(step_id)
        stamp_at = None
        if time is not None:
            _check_callable(step_id, time)
            stamp_at = self._stamp_point(step_id, tail, time)
        spec = WindowSpec(
            windows,
            lateness_ms=_span_ms(step_id, "lateness", lateness),
            grace_ms=_span_ms(step_id, "grace", grace),
            emit=emit,
            time=time,
            stamp_at=stamp_at,
        )
        in_task = time if stamp_at is None else None
        return self._with(
            WindowStep(
                step_id,
                lambda: EventTime(step_id, in_task),
                spec,
                _span_ms(step_id, "idle", idle),
                inputs=(tail,),
            )
        )

    def _stamp_point(self, step_id: str, tail: Port, time: Callable[[Any], Any]) -> str | None:
        """Where the event time of window ``step_id`` is evaluated: the first ``key_by`` on the
        way back from ``tail`` through ``key_by``, ``filter`` and ``peek`` steps, or ``None``
        for the window's own task. Refuses a chain where that task reads a ``key_by`` topic:
        its marks would speak of another event time."""
        port, first_key_by = tail, None
        while True:
            step = self.step(port[0])
            if isinstance(step, KeyByStep):
                first_key_by = step
            elif not _keeps_values(step):
                break
            port = step.inputs[0]
        internal = {s.topic.name: s for s in self.steps if isinstance(s, KeyByStep)}
        for topic in self._read_from(port):
            if topic.time is not None:
                raise PipelineDefinitionError(
                    f"topic {topic.name!r} sets the event time already (Topic(..., time=...)); "
                    f"leave out time= here",
                    step=step_id,
                )
            repartitioned = internal.get(topic.name)
            if repartitioned is not None:
                raise PipelineDefinitionError(
                    f"time= would set the event time of values that step {port[0]!r} made "
                    f"after key_by {repartitioned.step_id!r}, where event time is already "
                    "fixed; give the time where records enter (Topic(..., time=...) on the "
                    "source's topic), or compute it before that key_by so the window only has "
                    "key_by, filter and peek steps before it",
                    step=step_id,
                )
        if first_key_by is None:
            return None
        for other in self.steps:
            if not isinstance(other, WindowStep):
                continue
            spec = other.window
            if spec.stamp_at == first_key_by.step_id and spec.time is not time:
                raise PipelineDefinitionError(
                    f"key_by {first_key_by.step_id!r} already carries the event time of window "
                    f"{other.step_id!r}; both windows need the same time= function",
                    step=step_id,
                )
        return first_key_by.step_id

    def dedupe(
        self,
        step_id: str,
        within: timedelta,
        *,
        key: Callable[[Any], Any] | None = None,
    ) -> Pipeline:
        """Drop a record if one with the same key passed whose event time is less than
        ``within`` away from its own, in whatever order they arrive. A passed record is
        remembered until the event-time mark of every upstream writer is ``within`` past it.
        ``key`` dedupes by ``key(value)`` instead of the record key (a ``key_by``)."""
        chain = self.key_by(f"{step_id}.by-key", key) if key is not None else self
        horizon = within // timedelta(milliseconds=1)
        if horizon <= 0:
            raise PipelineDefinitionError("dedupe needs a positive horizon", step=step_id)
        return chain._operator(StatefulStep, step_id, lambda: Dedupe(step_id, horizon), None)

    # -- joins --------------------------------------------------------------------------------

    def join_table(
        self,
        step_id: str,
        table: Topic,
        merge: Callable[[Any, Any], Any],
        *,
        how: JoinHow = "inner",
        on_error: ErrorPolicy | None = None,
    ) -> Pipeline:
        """Join each record with the row of its key in ``table``: ``merge(value, row)``.

        ``table`` is a topic on the log read as a table: the latest value of each key, a
        ``None`` value deleting the key (keep the topic compacted). The stream must be keyed
        like the table (``key_by`` first: a key finds its row when it serialises to the same
        bytes with the table topic's key serde) and co-partitioned with it (the same number of
        partitions). Each task reads the whole table partition when it starts, then applies
        the table records it receives, in order. ``how="inner"`` drops records whose key has
        no row; ``how="left"`` emits ``merge(value, None)`` for them. Results keep the
        record's key and timestamp.
        """
        _check_callable(step_id, merge)
        _check_how(step_id, how)
        if not isinstance(table, Topic):
            raise PipelineDefinitionError(
                f"join_table needs the table as a Topic, got {type(table).__name__}",
                step=step_id,
            )
        tail = self._input_tail(step_id, "join")
        chain = self
        table_port, table = self._table_input(step_id, table)
        if table_port == tail:
            raise PipelineDefinitionError(
                f"the stream is topic {table.name!r} itself: a stream cannot be joined with "
                "its own topic as a table",
                step=step_id,
            )
        stream_topics = self._read_from(tail)
        _check_copartitioned(
            step_id,
            ("the stream", stream_topics),
            ("the table", [table]),
            f"re-key the stream with key_by(..., partitions={table.partitions}) before the "
            f"join, or give topic {table.name!r} the stream's number of partitions",
        )
        if table_port is None:
            reader = ReadStep(f"{step_id}.table", table)
            chain = self._with(reader, tail=tail)
            table_port = (reader.step_id, OUT)
        return chain._with(
            TableJoinStep(
                step_id,
                lambda: TableJoin(step_id, merge, how),
                table,
                inputs=(tail, table_port),
                error_policy=on_error,
            )
        )

    def join_stream(
        self,
        step_id: str,
        other: Pipeline,
        within: timedelta,
        merge: Callable[[Any, Any], Any],
        *,
        how: JoinHow = "inner",
        grace: timedelta = timedelta(0),
        idle: timedelta = timedelta(seconds=10),
        on_error: ErrorPolicy | None = None,
    ) -> Pipeline:
        """Join this stream with ``other``: ``merge(left, right)`` for every pair of records
        with equal keys whose event times (record timestamps) differ by at most ``within``.

        ``other`` is another chain of this pipeline (say from another ``source(...)`` and a
        ``key_by``); both streams must be keyed alike and co-partitioned. Records wait in
        fault-tolerant state, as JSON, until the partition's watermark (the smallest event-time
        mark over every upstream writer of both sides) passes their time + ``within`` +
        ``grace``. Each pair is emitted once, at the later of the two timestamps, whichever
        side comes first. ``how="left"`` also emits ``merge(left, None)`` for a left record
        that expires unmatched. A record whose time + ``grace`` is behind the watermark is
        late: it goes to ``<pipeline>.<step>.late``. An input quiet for ``idle`` follows the
        wall clock. See
        :mod:`operators.joins` for what ``merge`` receives (JSON forms of the values).
        """
        _check_callable(step_id, merge)
        _check_how(step_id, how)
        if not isinstance(other, Pipeline):
            raise PipelineDefinitionError(
                f"join_stream needs another chain of this pipeline, got {type(other).__name__}",
                step=step_id,
            )
        joined = self._absorb(step_id, (other,), "join")
        left, right = self._input_tail(step_id, "join"), other._input_tail(step_id, "join")
        if left == right:
            raise PipelineDefinitionError(
                "join_stream needs two different streams; to join a stream with itself, "
                "make a second chain from it first (e.g. with map)",
                step=step_id,
            )
        within_ms = _span_ms(step_id, "within", within)
        grace_ms = _span_ms(step_id, "grace", grace)
        idle_ms = _span_ms(step_id, "idle", idle)
        _check_copartitioned(
            step_id,
            ("the left stream", self._read_from(left)),
            ("the right stream", other._read_from(right)),
            "re-key both streams to the same number of partitions before the join, "
            "with key_by(..., partitions=N) on each",
        )
        models = (_model_of(joined._value_serde_at(left)), _model_of(joined._value_serde_at(right)))

        def build() -> Operator:
            return StreamJoin(
                step_id,
                merge,
                how=how,
                within_ms=within_ms,
                grace_ms=grace_ms,
                models=models,
            )

        return joined._with(
            StreamJoinStep(step_id, build, idle_ms, inputs=(left, right), error_policy=on_error)
        )

    def _input_tail(self, step_id: str, kind: str) -> Port:
        """The tail, as an input of the ``kind`` step ``step_id`` (a join, an operator of one's
        own): neither a salted ``key_by`` nor a window may be there."""
        tail = self._require_tail(step_id)
        self._refuse_after_salt(tail, kind, step_id)
        window = self._pending_window()
        if window is not None:
            raise PipelineDefinitionError(
                f"window {window.step_id!r} must be followed by an aggregation, not "
                f"{kind} {step_id!r}",
                step=step_id,
            )
        return tail

    def _absorb(self, step_id: str, others: Iterable[Pipeline], kind: str) -> Pipeline:
        """This chain, its tail kept, with the steps of ``others`` (chains of this pipeline)
        it lacks: the steps the ``kind`` step ``step_id`` that all of them feed needs."""
        steps = list(self.steps)
        known = {s.step_id: s for s in steps}
        for other in others:
            if other.name != self.name:
                raise PipelineDefinitionError(
                    f"cannot {kind} a chain of pipeline {other.name!r} into {self.name!r}",
                    step=step_id,
                )
            for step in other.steps:
                mine = known.get(step.step_id)
                if mine is None:
                    steps.append(step)
                    known[step.step_id] = step
                elif mine is not step:
                    raise PipelineDefinitionError(
                        f"step id {step.step_id!r} means different steps in the chains of "
                        f"{kind} {step_id!r}",
                        step=step_id,
                    )
        return self._derive(tuple(steps), self._tail)

    def _then(self, step_id: str, port: Port, build: Callable[[Pipeline], Pipeline]) -> Pipeline:
        """The chain ``build`` makes of this one with its tail at ``port`` (an output of step
        ``step_id``), checked to extend it."""
        built = build(self._derive(self.steps, port))
        if not isinstance(built, Pipeline) or built.steps[: len(self.steps)] != self.steps:
            raise PipelineDefinitionError(
                "then= must return the pipeline it was given, extended with more steps",
                step=step_id,
            )
        return built

    def _table_input(self, step_id: str, table: Topic) -> tuple[Port | None, Topic]:
        """The port that already reads ``table`` in this chain (a source, a LogTopic or a
        key_by topic) and the topic as declared there, or ``None`` and ``table``."""
        for step in self.steps:
            if not isinstance(step, EntryStep) or step.topic.name != table.name:
                continue
            known = step.topic
            if (known.partitions, repr(known.key_serde), repr(known.value_serde)) != (
                table.partitions,
                repr(table.key_serde),
                repr(table.value_serde),
            ):
                raise PipelineDefinitionError(
                    f"step {step.step_id!r} already reads topic {table.name!r} as {known!r}; "
                    f"the table is declared as {table!r}: declare it the same way",
                    step=step_id,
                )
            return (step.step_id, OUT), known
        return None, table

    def branch(
        self,
        step_id: str,
        predicate: Callable[[Any], object],
        then: Callable[[Pipeline], Pipeline],
        *,
        on_error: ErrorPolicy | None = None,
    ) -> Pipeline:
        """Send the records matching ``predicate`` down the chain ``then`` builds; the chain
        this returns goes on with the records that did not match."""
        _check_callable(step_id, predicate)
        tail = self._require_tail(step_id)
        matched, rest = Branch.ports.outputs
        split = self._with(
            BranchStep(
                step_id,
                lambda: Branch(step_id, predicate),
                inputs=(tail,),
                outputs=Branch.ports.outputs,
                error_policy=on_error,
            )
        )
        built = split._then(step_id, (step_id, matched), then)
        return built._derive(built.steps, (step_id, rest))

    def apply(
        self,
        step_id: str,
        operator: Callable[[str], Operator],
        *others: Pipeline,
        then: Mapping[str, Callable[[Pipeline], Pipeline]] | None = None,
        stateful: bool = False,
        on_error: ErrorPolicy | None = None,
    ) -> Pipeline:
        """Run an operator of one's own: the subclass of :class:`operators.Operator` that
        ``operator(step_id)`` builds (the class itself, or a function of the step id), once
        per task.

        Its inputs (``ports.inputs``, see :mod:`operators.base`) are fed by this chain and by
        ``others``, other chains of this pipeline, in that order: one chain per input. Chains
        read from different topics need equal partition counts, and keys alike if the
        operator relies on the records of a key meeting in one task. The chain this returns
        goes on from the operator's first output; ``then`` maps the name of another output to
        a function that builds its chain, like :meth:`branch`'s ``then`` (records of an output
        no step reads are dropped). ``stateful=True`` gives the operator keyed state,
        ``ctx.store``, kept in a changelog topic like any stateful step's. The operator may
        replace values: a ``key_by`` after it writes JSON values unless given ``value=``.
        """
        _require_callable(step_id, operator)
        try:
            built = operator(step_id)
        except Exception as error:  # the user's class or function: say which step it is for
            raise PipelineDefinitionError(
                f"{describe_function(operator)}({step_id!r}) raised {type(error).__name__}: "
                f"{error}",
                step=step_id,
            ) from error
        if not isinstance(built, Operator) or built.step_id != step_id:
            what = f"operator {built.step_id!r}" if isinstance(built, Operator) else built
            raise PipelineDefinitionError(
                f"apply needs a subclass of operators.Operator, or a function of the step id "
                f"that builds one for step {step_id!r}; {describe_function(operator)} "
                f"built {what!r}",
                step=step_id,
            )
        ports = built.ports
        chains = (self, *others)
        if len(chains) != len(ports.inputs):
            raise PipelineDefinitionError(
                f"{type(built).__name__} has the inputs {list(ports.inputs)}: apply needs a "
                f"chain for each, this one and {len(ports.inputs) - 1} more, got {len(chains)}",
                step=step_id,
            )
        first, *rest = ports.outputs
        unknown = sorted(set(then or {}) - set(rest))
        if unknown:
            raise PipelineDefinitionError(
                f"then= names {unknown}, which are no outputs of {type(built).__name__} other "
                f"than {first!r} (the chain apply returns goes on from it): it has "
                f"{list(ports.outputs)}",
                step=step_id,
            )
        joined = self._absorb(step_id, others, "apply")
        tails = tuple(chain._input_tail(step_id, "apply") for chain in chains)
        kind = StatefulStep if stateful else StatelessStep
        chain = joined._with(
            kind(
                step_id,
                lambda: operator(step_id),
                transforms=True,
                inputs=tails,
                outputs=ports.outputs,
                error_policy=on_error,
            )
        )
        for name, build in (then or {}).items():
            chain = chain._then(step_id, (step_id, name), build)
        return chain._derive(chain.steps, (step_id, first))

    def merge(self, step_id: str, *others: Pipeline) -> Pipeline:
        """One stream of the records of this chain and of each of ``others``."""
        tails = [self._require_tail(step_id)]
        merged = self._absorb(step_id, others, "merge")
        for other in others:
            tails.append(other._require_tail(step_id))
            other._refuse_after_salt(other.tail, "merge", step_id)
        self._refuse_after_salt(self._tail, "merge", step_id)
        return merged._derive(merged.steps, None)._with(
            MergeStep(step_id, lambda: Merge(step_id), inputs=tuple(tails))
        )

    def sink(self, sink: Sink | LogTopic, *, step_id: str | None = None) -> Pipeline:
        """Send the stream to ``sink``; the chain goes on, so a stream can feed several sinks.

        ``connectors.LogTopic(topic)`` writes to a topic on the log, with its serdes.
        """
        if isinstance(sink, LogTopic):
            step_id = step_id or f"to.{sink.topic.name}"
            tail = self._require_tail(step_id)
            return self._with(WriteStep(step_id, sink.topic, inputs=(tail,)), tail=tail)
        step_id = step_id or f"sink.{getattr(sink, 'name', 'sink')}"
        if not isinstance(sink, Sink):
            raise PipelineDefinitionError(
                f"sink() needs a connectors Sink or LogTopic, got {type(sink).__name__}",
                step=step_id,
            )
        tail = self._require_tail(step_id)
        return self._with(SinkStep(step_id, sink, inputs=(tail,)), tail=tail)

    # -- graph facts --------------------------------------------------------------------------

    def _read_from(self, port: Port) -> list[Topic]:
        """The topics the records at ``port`` were last read from."""
        step = self.step(port[0])
        if isinstance(step, EntryStep):
            return [step.topic]
        return [topic for p in step.inputs for topic in self._read_from(p)]

    def _partitions_at(self, port: Port) -> int:
        return max(t.partitions for t in self._read_from(port))

    def _value_serde_at(self, port: Port) -> Serde:
        """The serde that fits the values at ``port``: the serde of the topic they were read
        from, unless a step has replaced them since (then JSON)."""
        step = self.step(port[0])
        if isinstance(step, EntryStep):
            return step.topic.value_serde
        if _replaces_values(step):
            return Json()
        found = {id(serde): serde for serde in (self._value_serde_at(p) for p in step.inputs)}
        return next(iter(found.values())) if len(found) == 1 else Json()

    @property
    def dead_letter_topic(self) -> Topic:
        """Where records go that fail under the ``DEAD_LETTER`` policy: original bytes, and the
        error, step and source position in headers."""
        return Topic(f"{self.internal_prefix}dead-letters", value=bytes, key=bytes)


def _salts(step_id: str, salt: object) -> int:
    if isinstance(salt, bool) or not isinstance(salt, int) or not 2 <= salt <= MAX_SALT:
        raise PipelineDefinitionError(
            f"step {step_id!r}: salt must be a whole number of sub-keys from 2 to {MAX_SALT}, "
            f"not {salt!r}",
            step=step_id,
        )
    return salt


def _check_how(step_id: str, how: str) -> None:
    if how not in ("inner", "left"):
        raise PipelineDefinitionError(f"how must be 'inner' or 'left', not {how!r}", step=step_id)


def _check_copartitioned(
    step_id: str, first: tuple[str, list[Topic]], second: tuple[str, list[Topic]], fix: str
) -> None:
    """Refuse a join whose inputs could put one key in two tasks: topics with different
    partition counts, or (with several partitions) keys serialised by different serdes."""

    def described(topics: list[Topic]) -> str:
        listed = ", ".join(f"{t.name!r} ({t.partitions} partitions)" for t in topics)
        return f"topic{'s' if len(topics) > 1 else ''} {listed}"

    (first_name, first_topics), (second_name, second_topics) = first, second
    topics = [*first_topics, *second_topics]
    if len({t.partitions for t in topics}) > 1:
        raise PipelineDefinitionError(
            f"join {step_id!r} needs {first_name} and {second_name} co-partitioned (the same "
            f"number of partitions), but {first_name} is read from {described(first_topics)} "
            f"and {second_name} from {described(second_topics)}; {fix}",
            step=step_id,
        )
    if topics[0].partitions > 1 and len({t.key_serde.partitioning for t in topics}) > 1:
        serdes = ", ".join(f"{t.name!r} {t.key_serde!r}" for t in topics)
        raise PipelineDefinitionError(
            f"join {step_id!r} needs {first_name} and {second_name} keyed alike, but their "
            f"topics serialise keys differently ({serdes}), so one key could land on different "
            "partitions; give key_by(..., key=...) the same key serde as the other side",
            step=step_id,
        )


def _model_of(serde: Serde) -> Any:
    return serde.model if isinstance(serde, Model) else None


def _span_ms(step_id: str, what: str, span: timedelta) -> int:
    millis = span // timedelta(milliseconds=1)  # exact: no float rounding
    if millis < 0:
        raise PipelineDefinitionError(f"{what} cannot be negative, got {span}", step=step_id)
    return millis


def _replaces_values(step: Step) -> bool:
    """Whether ``step`` replaces the values it gets, so they may no longer fit the serde of the
    topic they were read from."""
    match step:
        case StatelessStep(transforms=transforms) | StatefulStep(transforms=transforms):
            return transforms
        case WindowedAggregateStep() | TableJoinStep() | StreamJoinStep():
            return True
    return False


def _keeps_values(step: Step) -> bool:
    """Whether ``step`` passes the values it gets on unchanged and in one stream (filter,
    peek): an event time computed before it is the one computed after it."""
    return isinstance(step, StatelessStep) and not step.transforms and len(step.inputs) == 1


def _step_function(
    step_id: str,
    fn: Callable[[Any], Any],
    timeout: float | None,
    concurrency: int | None,
    *,
    generators: bool = False,
) -> tuple[Callable[[Any], Any], Concurrent | None]:
    """``fn``, checked, and how its calls run: a plain function's one after the other, each
    limited to ``timeout`` seconds by a timer if one is given; an async function's
    concurrently (:class:`~operators.concurrent.Concurrent`). ``generators``: the step also
    takes an async generator function (``flat_map``: its items are the step's values)."""
    _require_callable(step_id, fn)
    seconds = None if timeout is None else _seconds(step_id, timeout)
    if not _is_async(fn):
        if concurrency is not None:
            raise PipelineDefinitionError(
                f"step {step_id!r}: concurrency= is for async functions, and "
                f"{describe_function(fn)} is a plain one, called once per record in turn. "
                "Drop concurrency=, or make the function an async def",
                step=step_id,
            )
        return (fn if seconds is None else with_timeout(fn, seconds)), None
    if not generators and inspect.isasyncgenfunction(_call_of(fn)):
        raise PipelineDefinitionError(
            f"step {step_id!r}: {describe_function(fn)} is an async generator function, "
            "whose calls give an iterator, not a result to await. Only flat_map takes one (its "
            "items become the step's values); here, return the result from an async def",
            step=step_id,
        )
    return fn, Concurrent(_concurrency(step_id, concurrency), seconds)


def _seconds(step_id: str, timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise PipelineDefinitionError(
            f"step {step_id!r}: timeout must be a positive number of seconds, not {timeout!r}",
            step=step_id,
        )
    return float(timeout)


def _concurrency(step_id: str, concurrency: object) -> int:
    if concurrency is None:
        return DEFAULT_CONCURRENCY
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise PipelineDefinitionError(
            f"step {step_id!r}: concurrency must be a positive whole number of calls in "
            f"flight at once, not {concurrency!r}",
            step=step_id,
        )
    return concurrency


def _require_callable(step_id: str, fn: object) -> Callable[..., Any]:
    if not callable(fn):
        raise PipelineDefinitionError(
            f"step {step_id!r} needs a function, got {type(fn).__name__} {fn!r}", step=step_id
        )
    return fn


def _check_callable(step_id: str, fn: object) -> None:
    """``fn`` is a plain function: the steps that take no async function call this."""
    function = _require_callable(step_id, fn)
    if _is_async(function):
        raise PipelineDefinitionError(
            f"step {step_id!r}: {describe_function(function)} is an async function. This "
            "step calls its functions synchronously, so what it returns (a coroutine, never "
            "awaited) would be taken for its result. Make it a plain def (blocking calls are "
            "fine), or do the asynchronous work in a step before it: map, filter, flat_map and "
            "peek take an async def.",
            step=step_id,
        )


def _is_async(fn: object) -> bool:
    """``fn`` is an ``async def`` (or an object whose ``__call__`` is), a partial of one, or
    an async generator function."""
    call = _call_of(fn)
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _call_of(fn: object) -> object:
    """What calling ``fn`` runs: ``fn`` itself (a function, a method, a partial) or the
    ``__call__`` of an object."""
    call = fn if inspect.isroutine(fn) or isinstance(fn, functools.partial) else None
    return call or getattr(fn, "__call__", None)  # noqa: B004 - the method itself is wanted
