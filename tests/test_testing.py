"""The test harness: ``run_pipeline`` on the memory backend and what its result gives access to."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.files import JsonLines
from connectors.memory import Collect, Iterable
from connectors.topic import LogTopic
from operators import Operator
from operators.aggregations import Count
from operators.joins import StreamJoin
from operators.routing import Branch
from operators.stateful import EventTime
from operators.windowed import WindowedAggregate
from operators.windows import Tumbling
from pipelines import Batch, Pipeline, Record, Topic
from pipelines.errors import ErrorPolicy, PipelineDefinitionError, StepError
from pipelines.log.base import TopicPartition
from pipelines.partitioner import partition_for
from pipelines.runtime.watermarks import END_OF_TIME
from pipelines.serde import Json
from pipelines.state.store import KeyValueStore
from pipelines.testing import OperatorHarness, run_pipeline, run_pipeline_async


def two_sources() -> Pipeline:
    clicks = Pipeline("p").source(
        Iterable(["declared click"]), into=Topic("clicks"), step_id="clicks"
    )
    views = clicks.source(Iterable(["declared view"]), into=Topic("views"), step_id="views")
    return clicks.merge("all", views).map("upper", str.upper).sink(Collect(), step_id="out")


# -- inputs= ---------------------------------------------------------------------------------------


def test_inputs_replace_a_source_by_step_id_and_leave_the_others() -> None:
    result = run_pipeline(two_sources(), inputs={"clicks": ["a", "b"]})
    assert sorted(result.values("out")) == ["A", "B", "DECLARED VIEW"]


def test_inputs_can_replace_every_source() -> None:
    result = run_pipeline(two_sources(), inputs={"clicks": ["a"], "views": ("v1", "v2")})
    assert sorted(result.values("out")) == ["A", "V1", "V2"]


def test_inputs_may_be_a_one_shot_generator() -> None:
    result = run_pipeline(two_sources(), inputs={"clicks": (c for c in "xyz"), "views": []})
    assert sorted(result.values("out")) == ["X", "Y", "Z"]


def test_inputs_are_keyed_as_the_replaced_source_keys_its_records(tmp_path: Path) -> None:
    """A file source's ``key=`` carries over to the values given in its place: each lands on
    the partition its key hashes to, and a count per key sees them as one key."""
    source = JsonLines(tmp_path / "unused.jsonl", key=lambda e: e["user"])
    pipeline = (
        Pipeline("p")
        .source(source, into=Topic("clicks", partitions=4), step_id="clicks")
        .count("per-user")
        .sink(Collect(), step_id="out")
    )
    clicks = [{"user": u} for u in ["ann", "bob", "ann", "cid", "ann"]] + [b"not json"]
    result = run_pipeline(pipeline, inputs={"clicks": clicks})
    on_log = result.topic("clicks")
    keyed = [r for r in on_log if r.key is not None]
    assert len(keyed) == 5  # the malformed value gets no key, as in the file
    for record in keyed:
        assert record.partition == partition_for(record.key, 4)
    finals = {record.key: record.value for record in result.records("out")}
    assert finals == {"ann": 3, "bob": 1, "cid": 1}


def test_without_inputs_the_declared_sources_are_read() -> None:
    assert sorted(run_pipeline(two_sources()).values("out")) == ["DECLARED CLICK", "DECLARED VIEW"]


def test_inputs_naming_an_unknown_step_raise_with_the_source_steps() -> None:
    with pytest.raises(PipelineDefinitionError) as caught:
        run_pipeline(two_sources(), inputs={"click": ["a"], "upper": ["b"], "views": []})
    message = str(caught.value)
    assert "['click', 'upper']" in message  # the unknown ids; a map step is not a source
    assert "['clicks', 'views']" in message  # and what would have been accepted


def test_run_pipeline_does_not_touch_the_declared_sinks() -> None:
    declared = Collect()
    pipeline = Pipeline("p").source(Iterable([1, 2]), into=Topic("in")).sink(declared, step_id="o")
    result = run_pipeline(pipeline)
    assert result.values("o") == [1, 2]
    assert declared.values == []
    assert result.sinks["o"] is not declared


# -- what the result holds -------------------------------------------------------------------------


def keyed_pipeline() -> Pipeline:
    return (
        Pipeline("p")
        .source(Iterable([{"user": "ann", "n": 1}, {"user": "bob", "n": 2}]), into=Topic("in"))
        .sink(Collect(), step_id="raw")
        .key_by("by-user", lambda v: v["user"], partitions=2)
        .map("n", lambda v: v["n"])
        .sink(Collect(), step_id="numbers")
        .sink(LogTopic(Topic("numbers", partitions=1)))
    )


def test_result_values_and_records_per_sink() -> None:
    result = run_pipeline(keyed_pipeline())

    assert result.values("raw") == [{"user": "ann", "n": 1}, {"user": "bob", "n": 2}]
    raw = result.records("raw")
    assert [(r.topic, r.partition, r.offset, r.key) for r in raw] == [
        ("in", 0, 0, None),
        ("in", 0, 1, None),
    ]
    assert sorted(result.values("numbers")) == [1, 2]
    numbers = {r.key: r for r in result.records("numbers")}
    assert sorted(numbers) == ["ann", "bob"]
    for key, record in numbers.items():
        assert record.topic == "p.by-user"
        assert record.partition == partition_for(key.encode(), 2)
    assert sorted(result.sinks) == ["numbers", "raw"]  # LogTopic sinks are not collected


def test_result_topic_lists_the_raw_records_of_a_topic() -> None:
    result = run_pipeline(keyed_pipeline())

    inputs = result.topic("in")
    assert [r.value for r in inputs] == [b'{"user":"ann","n":1}', b'{"user":"bob","n":2}']
    assert [(r.topic, r.partition, r.offset) for r in inputs] == [("in", 0, 0), ("in", 0, 1)]

    repartitioned = result.topic("p.by-user")
    assert sorted(r.key for r in repartitioned if r.key is not None) == [b"ann", b"bob"]
    assert [r.partition for r in repartitioned] == sorted(r.partition for r in repartitioned)

    written = result.topic("numbers")
    assert sorted((r.key, Json().deserialize(r.value)) for r in written) == [
        (b"ann", 1),
        (b"bob", 2),
    ]
    assert result.dead_letters == []


def test_result_dead_letters_is_the_dead_letter_topic() -> None:
    pipeline = (
        Pipeline("p")
        .source(Iterable([1, 0]), into=Topic("in"))
        .map("inverse", lambda v: 1 / v)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.dead_letters == result.topic("p.dead-letters")
    assert [r.value for r in result.dead_letters] == [b"0"]


def test_unknown_sink_id_raises_key_error_listing_the_sinks() -> None:
    result = run_pipeline(keyed_pipeline())
    with pytest.raises(KeyError, match=r"no sink step 'nummbers'") as caught:
        result.values("nummbers")
    assert "['numbers', 'raw']" in str(caught.value)
    with pytest.raises(KeyError, match="no sink step 'by-user'"):
        result.records("by-user")  # a step, but not a sink


# -- event loops -----------------------------------------------------------------------------------


async def test_run_pipeline_works_inside_a_running_event_loop() -> None:
    threads: list[threading.Thread] = []

    def remember_thread(_: Any) -> None:
        threads.append(threading.current_thread())

    pipeline = (
        Pipeline("p")
        .source(Iterable([1, 2, 3]), into=Topic("in"))
        .peek("where", remember_thread)
        .map("double", lambda v: v * 2)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)  # synchronous call from a coroutine

    assert result.values("out") == [2, 4, 6]
    assert len(threads) == 3
    assert all(t is not threading.current_thread() for t in threads)  # ran in a helper thread


async def test_run_pipeline_inside_an_event_loop_raises_the_pipeline_error() -> None:
    pipeline = (
        Pipeline("p", error_policy=ErrorPolicy.FAIL)
        .source(Iterable([1, 0]), into=Topic("in"))
        .map("inverse", lambda v: 1 / v)
        .sink(Collect(), step_id="out")
    )
    with pytest.raises(StepError) as caught:
        run_pipeline(pipeline)
    assert caught.value.step == "inverse"


def test_run_pipeline_from_plain_code_runs_in_the_calling_thread() -> None:
    threads: list[threading.Thread] = []
    pipeline = (
        Pipeline("p")
        .source(Iterable([1]), into=Topic("in"))
        .peek("where", lambda _: threads.append(threading.current_thread()))
        .sink(Collect(), step_id="out")
    )
    assert run_pipeline(pipeline).values("out") == [1]
    assert threads == [threading.current_thread()]


async def test_run_pipeline_async_from_async_code() -> None:
    result = await run_pipeline_async(two_sources(), inputs={"clicks": ["q"], "views": []})
    assert result.values("out") == ["Q"]


# -- endless sources, DataFrames, notebook tables ----------------------------------------------


def endless() -> Pipeline:
    def numbers() -> Any:
        n = 0
        while True:
            yield {"n": n, "even": n % 2 == 0}
            n += 1

    return (
        Pipeline("p")
        .source(Iterable(numbers), into=Topic("in", partitions=2))
        .filter("even", lambda v: v["even"])
        .sink(Collect(), step_id="out")
    )


def test_count_stops_an_endless_source_once_the_sinks_have_that_many() -> None:
    result = run_pipeline(endless(), count=50)
    assert result.stopped_by == "count"
    values = result.values("out")
    assert len(values) >= 50
    assert all(v["even"] for v in values)
    assert sorted(v["n"] for v in values)[:50] == list(range(0, 100, 2))


def test_timeout_stops_an_endless_source() -> None:
    started = time.monotonic()
    result = run_pipeline(endless(), timeout=0.3)
    assert result.stopped_by == "timeout"
    assert time.monotonic() - started < 30  # it stopped: an endless run never returns
    assert len(result.values("out")) > 0


async def test_an_interrupted_notebook_cell_stops_the_run_instead_of_leaving_it_running() -> None:
    def interrupt() -> None:
        time.sleep(0.5)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # Jupyter's kernel runs cells with Python's own SIGINT handler (KeyboardInterrupt), where
    # pytest's loop runner would cancel its task instead
    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt).start()
        result = run_pipeline(endless())  # from a running loop, as in Jupyter: a helper thread
    finally:
        signal.signal(signal.SIGINT, default)
    assert result.stopped_by == "interrupt"
    assert len(result.values("out")) > 0
    assert not [t for t in threading.enumerate() if t.name == "headwater-testing"]


async def test_run_pipeline_async_stops_when_its_stop_event_is_set() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    result = await run_pipeline_async(endless(), stop=stop)
    assert result.stopped_by == "stop"


def test_a_finite_input_is_not_stopped() -> None:
    result = run_pipeline(two_sources(), count=1000, timeout=60)
    assert result.stopped_by is None
    assert len(result.values("out")) == 2


@pytest.mark.parametrize(("count", "timeout"), [(0, None), (None, 0), (None, -1.0)])
def test_stops_must_be_positive(count: int | None, timeout: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        run_pipeline(two_sources(), count=count, timeout=timeout)


def test_to_pandas_gives_the_fields_and_where_each_record_came_from() -> None:
    clicks = [{"user": "ann", "n": 1}, {"user": "bob", "n": 2}]
    pipeline = (
        Pipeline("p")
        .source(Iterable(clicks, key=lambda c: c["user"]), into=Topic("clicks", partitions=3))
        .sink(Collect(), step_id="out")
    )
    frame = run_pipeline(pipeline).to_pandas("out").sort_values("n")
    assert list(frame.columns) == ["key", "timestamp", "topic", "partition", "offset", "user", "n"]
    assert list(frame["user"]) == ["ann", "bob"]
    assert list(frame["key"]) == ["ann", "bob"]
    assert set(frame["topic"]) == {"clicks"}
    assert list(frame["partition"]) == [partition_for(u.encode(), 3) for u in ("ann", "bob")]
    plain = run_pipeline(two_sources()).to_pandas("out")
    assert sorted(plain["value"]) == ["DECLARED CLICK", "DECLARED VIEW"]


def test_a_result_and_a_pipeline_show_themselves_as_tables() -> None:
    result = run_pipeline(two_sources(), inputs={"clicks": ["<a>"]})
    assert repr(result) == "<TestResult of 'p': out: 2; 0 dead letters>"
    table = result._repr_html_()
    assert "<td>out</td><td>2</td>" in table
    assert "&lt;A&gt;" in table  # values are escaped
    steps = two_sources()._repr_html_()
    for cell in ("<td>clicks</td>", "<td>merge</td>", "<td>upper</td>", "<td>clicks (1)</td>"):
        assert cell in steps, steps


# -- inspect=, decoded topics, dead-letter groups ---------------------------------------------


def branched() -> Pipeline:
    """numbers -> parse (int) -> branch even -> two sinks; "x" fails to parse."""
    parsed = (
        Pipeline("b")
        .source(Iterable(["1", "2", "x", "3", "4"]), into=Topic("numbers"), step_id="numbers")
        .map("parse", int)
    )
    rest = parsed.branch("even", lambda n: n % 2 == 0, lambda e: e.sink(Collect(), step_id="evens"))
    return rest.map("tenfold", lambda n: n * 10).sink(Collect(), step_id="odds")


def test_inspect_keeps_what_flows_out_of_a_step_in_the_middle() -> None:
    result = run_pipeline(branched(), inspect=["parse", "even"])
    assert sorted(r.value for r in result.inspect("parse")) == [1, 2, 3, 4]
    assert sorted(r.value for r in result.inspect("even")) == [2, 4]
    assert sorted(r.value for r in result.inspect("even", "rest")) == [1, 3]
    assert sorted(result.values("odds")) == [10, 30]  # the sinks still get their records
    frame = result.to_pandas("parse")
    assert sorted(frame["value"]) == [1, 2, 3, 4]
    assert set(frame["topic"]) == {"numbers"}
    with pytest.raises(KeyError, match="was not inspected"):
        result.inspect("tenfold")


def test_inspect_true_keeps_every_step_but_the_sinks() -> None:
    result = run_pipeline(branched(), inspect=True)
    assert sorted(r.value for r in result.inspect("tenfold")) == [10, 30]
    assert sorted(r.value for r in result.inspect("numbers")) == ["1", "2", "3", "4", "x"]


@pytest.mark.parametrize(
    ("inspect", "message"), [(["nope"], "inspect names no step"), (["odds"], "is a sink")]
)
def test_inspect_refuses_what_it_cannot_inspect(inspect: list[str], message: str) -> None:
    with pytest.raises(PipelineDefinitionError, match=message):
        run_pipeline(branched(), inspect=inspect)


def test_a_topic_reads_decoded_with_its_serdes_and_to_pandas_takes_a_topic() -> None:
    clicks = [{"user": "ann", "n": 1}, {"user": "bob", "n": 2}]
    pipeline = (
        Pipeline("p")
        .source(Iterable(clicks, key=lambda c: c["user"]), into=Topic("clicks", partitions=3))
        .key_by("by-n", lambda c: c["n"], key=Json())
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert {r.value for r in result.topic("clicks")} == {
        b'{"user":"ann","n":1}',
        b'{"user":"bob","n":2}',
    }
    decoded = result.topic("clicks", decode=True)
    assert sorted((r.key, r.value["n"]) for r in decoded) == [("ann", 1), ("bob", 2)]
    frame = result.to_pandas("p.by-n").sort_values("n")
    assert list(frame["key"]) == [1, 2]
    assert list(frame["user"]) == ["ann", "bob"]
    with pytest.raises(KeyError, match="no sink step, inspected step or topic"):
        result.to_pandas("nothing")


def test_dead_letters_are_counted_by_step_and_error_type() -> None:
    result = run_pipeline(branched())
    [group] = result.dead_letter_groups
    assert (group.step, group.error_type, group.count) == ("parse", "ValueError", 1)
    assert "invalid literal" in group.example


def test_a_late_data_topic_reads_decoded_with_the_serdes_its_records_were_read_with() -> None:
    """3,000 events in one minute, then one a day earlier: its window is long closed."""
    on_time = [{"id": i, "at": 86_400_000 + i} for i in range(3000)]
    late = {"id": -1, "at": 0}
    pipeline = (
        Pipeline("late")
        .source(
            Iterable([*on_time, late], key=lambda v: "k", timestamp=lambda v: v["at"]),
            into=Topic("events", value=Json()),
            step_id="events",
        )
        .window("minutes", Tumbling(timedelta(minutes=1)), lateness=timedelta(seconds=1))
        .count("count")
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline, inputs={"events": [*on_time, late]})
    [record] = result.topic("late.count.late", decode=True)
    assert record.value == late  # timed by the replaced source's timestamp=, so late
    assert result.to_pandas("late.count.late")["id"].tolist() == [-1]


def test_topics_are_written_before_the_run_so_a_table_is_whole_for_the_first_record() -> None:
    customers = Topic("customers", partitions=3, compacted=True)
    orders = [{"n": n, "customer": f"c{n % 7}"} for n in range(200)]
    table = {f"c{i}": {"tier": "gold" if i % 2 else "plain"} for i in range(5)}  # c5, c6: none
    pipeline = (
        Pipeline("shop")
        .source(Iterable([]), into=Topic("orders", partitions=3), step_id="orders")
        .key_by("by-customer", lambda o: o["customer"], partitions=3)
        .join_table("tiers", customers, lambda o, c: {**o, "tier": c["tier"]})
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(
        pipeline, inputs={"orders": orders}, topics={"customers": list(table.items())}
    )
    expected = [{**o, **table[o["customer"]]} for o in orders if o["customer"] in table]
    assert sorted(result.values("out"), key=lambda o: o["n"]) == expected
    with pytest.raises(PipelineDefinitionError, match="topics= names no topic"):
        run_pipeline(pipeline, topics={"nope": []})


# -- OperatorHarness -------------------------------------------------------------------------------


class RunningMax(Operator):
    """A keyed operator of the kind a user writes: it passes on ``(key, max so far)`` whenever a
    key's maximum grows, keeps the maxima in its state, rejects values that are not numbers,
    sends records behind the watermark to the late-data topic and, as time passes, emits the
    keys whose maximum has not grown since (``("quiet", key)``)."""

    def process(self, batch: Batch) -> Batch:
        keep, values = [], []
        for i, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
            if not isinstance(value, int):
                error = StepError(f"{value!r} is no number", step=self.step_id)
                error.source = batch.source_of(i)
                self.ctx.reject(batch, i, error)
            elif self.watermark is not None and batch.timestamps[i] < self.watermark:
                self.ctx.late(batch, i)
            elif value > self.ctx.store.get(key, value - 1):
                self.ctx.store.put(key, value)
                self.ctx.store.put(("grew", key), True)
                keep.append(i)
                values.append((key, value))
        return batch.take(keep).with_values(values)

    @property
    def watermark(self) -> int | None:
        return self.ctx.store.get(("watermark",))

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        stamp = self.watermark or 0  # the results are of the time up to the mark before
        if mark <= stamp:  # told again after a restore: nothing new
            return batch
        self.ctx.store.put(("watermark",), mark)
        quiet = sorted(k for k, _ in self.ctx.store.items() if isinstance(k, str))
        quiet = [k for k in quiet if not self.ctx.store.get(("grew", k))]
        for key, _ in list(self.ctx.store.items()):
            if isinstance(key, tuple) and key[0] == "grew":
                self.ctx.store.delete(key)
        return Batch(
            quiet,
            [("quiet", k) for k in quiet],
            [stamp] * len(quiet),
            [-1] * len(quiet),
            batch.fetched,
        )


def test_the_harness_passes_batches_through_the_operator_and_keeps_what_it_emits() -> None:
    harness = OperatorHarness(lambda: RunningMax("max"))
    out = harness.send([3, 5, 4], keys=["a", "a", "b"], timestamps=[10, 20, 30])
    assert out.values == [("a", 3), ("a", 5), ("b", 4)]
    assert out.keys == ["a", "a", "b"]
    harness.send_records([Record("b", 9, datetime(2026, 1, 1, tzinfo=UTC))])
    assert [(r.value, r.offset) for r in harness.emitted] == [
        (("a", 3), 0),
        (("a", 5), 1),
        (("b", 4), 2),
        (("b", 9), 3),  # read at the next offset of the input partition
    ]
    assert harness.emitted[-1].timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert harness.store.get("a") == 5 and harness.store.get("b") == 9


def test_the_harness_keeps_what_the_operator_rejects_with_where_it_was_read() -> None:
    harness = OperatorHarness(RunningMax("max"), topic="numbers", partition=3)
    assert harness.send([1, "two", 3], keys=["k", "k", "k"]).values == [("k", 1), ("k", 3)]
    [rejection] = harness.rejected
    assert rejection.record.value == "two"
    assert (rejection.record.topic, rejection.record.partition, rejection.record.offset) == (
        "numbers",
        3,
        1,
    )
    assert rejection.error.step == "max"
    assert str(rejection.error.source) == "numbers[3]@1"


def test_under_the_fail_policy_a_rejection_raises_out_of_send() -> None:
    harness = OperatorHarness(RunningMax("max"), error_policy=ErrorPolicy.FAIL)
    with pytest.raises(StepError, match="'x' is no number"):
        harness.send([1, "x"], keys=["k", "k"])
    assert [r.record.value for r in harness.rejected] == ["x"]


def test_the_watermark_moves_only_forward_and_by_default_to_the_largest_time_seen() -> None:
    harness = OperatorHarness(lambda: RunningMax("max"))
    with pytest.raises(ValueError, match="no event time seen yet"):
        harness.advance()
    harness.send([1, 2], keys=["a", "b"], timestamps=[500, 100])
    assert harness.advance().values == []  # both grew in the batch before
    assert harness.watermark == 500
    harness.send([5], keys=["a"], timestamps=[600])
    assert harness.advance(400).values == []  # behind the watermark: the operator is not told
    assert harness.watermark == 500
    assert harness.advance(700).values == [("quiet", "b")]
    harness.send([7, 8], keys=["b", "a"], timestamps=[650, 900])  # 650 is behind 700: late
    assert [(r.key, r.value) for r in harness.late] == [("b", 7)]
    assert harness.finish().values == [("quiet", "b")]
    assert harness.watermark == END_OF_TIME
    assert [r.value for r in harness.emitted if r.value[0] == "quiet"] == [
        ("quiet", "b"),
        ("quiet", "b"),
    ]


def test_a_checkpoint_restores_the_state_and_watermark_in_a_fresh_operator() -> None:
    first = OperatorHarness(lambda: RunningMax("max"))
    first.send([5, 3], keys=["a", "b"], timestamps=[100, 100])
    first.advance(100)
    saved = first.checkpoint()
    first.send([9], keys=["a"], timestamps=[200])  # after the checkpoint: lost in the crash

    given = KeyValueStore("max", 0)  # a store of the test's own: the restore fills it
    again = OperatorHarness(lambda: RunningMax("max"), checkpoint=saved, store=given)
    assert again.store is given
    assert again.watermark == 100
    assert again.store.get("a") == 5 and again.store.get("b") == 3
    out = again.send([9, 4], keys=["a", "b"], timestamps=[200, 200])  # read again, and more
    assert out.values == [("a", 9), ("b", 4)]
    assert [r.offset for r in again.emitted] == [2, 3]  # after the checkpoint's positions
    assert again.checkpoint().positions == {TopicPartition("input", 0): 4}


def test_the_harness_drives_built_in_operators_with_several_ports_and_windows() -> None:
    join = OperatorHarness(
        lambda: StreamJoin("pair", lambda a, b: [a, b], how="inner", within_ms=10, grace_ms=0)
    )
    assert join.send(["L"], keys=["k"], timestamps=[100]).values == []
    assert join.send(["R"], keys=["k"], timestamps=[105], input="right").values == [["L", "R"]]
    assert join.send(["R2"], keys=["k"], timestamps=[108], input=1).values == [["L", "R2"]]
    assert [r.offset for r in join.emitted] == [0, 1]  # each input is a topic of its own
    with pytest.raises(ValueError, match=r"input 1: RunningMax has inputs \['in'\]"):
        OperatorHarness(RunningMax("max")).send([1], input=1)

    branch = OperatorHarness(Branch("small", lambda n: n < 10))
    assert branch.send([3, 30, 4]).values == [3, 4]
    assert [r.value for r in branch.output("rest")] == [30]
    assert branch.output("matched") is branch.emitted

    windows = OperatorHarness(
        WindowedAggregate(
            "minute",
            Tumbling(timedelta(minutes=1)),
            Count(),
            emit="close",
            grace_ms=0,
            lateness_ms=0,
        )
    )
    windows.send(["x", "y", "z"], keys=["a", "a", "b"], timestamps=[0, 59_999, 60_000])
    assert windows.pending == 2
    assert [(r.key, r.value.value) for r in windows.advance(60_000).records()] == [("a", 2)]
    assert [(r.key, r.value.value) for r in windows.finish().records()] == [("b", 1)]


def test_the_default_mark_follows_the_event_times_an_operator_sets() -> None:
    harness = OperatorHarness(EventTime("time", lambda v: v["at"]))
    read_at = datetime(2030, 1, 1, tzinfo=UTC)  # the time of reading: not the event time
    harness.send([{"at": 1_000}, {"at": 3_000}], timestamps=[read_at, read_at])
    assert harness.advance().values == []
    assert harness.watermark == 3_000
