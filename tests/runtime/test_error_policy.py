"""Bad records on the memory backend: dead letters, SKIP, FAIL and per-step overrides."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from connectors.memory import Collect, Iterable
from pipelines import Pipeline, Topic
from pipelines.errors import ErrorPolicy, InvalidRecord, RecordSource, StepError
from pipelines.log.base import TopicPartition
from pipelines.log.memory import MemoryLog
from pipelines.partitioner import partition_for
from pipelines.record import Record
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.serde import Json
from pipelines.steps import SinkStep
from pipelines.testing import TestResult, run_pipeline


class CountedClick(BaseModel):
    user: str
    n: int


EVENT_TIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MALFORMED = b'{"user": '
INPUT: list[Any] = [
    {"user": "ann", "n": 1},
    {"user": "bob", "n": 2},
    MALFORMED,  # offset 2
    {"user": "cid", "n": 0},  # offset 3: 1 / 0 in "inverse"
    {"user": "dee", "n": 4},
]


def header_texts(record: Record) -> dict[str, str]:
    headers = dict(record.headers)
    assert len(headers) == len(record.headers), "a header appears twice"
    return {name: value.decode() for name, value in headers.items()}


def inverse(click: dict[str, Any]) -> dict[str, Any]:
    return {**click, "inverse": 1 / click["n"]}


def pipeline_with(policy: ErrorPolicy = ErrorPolicy.DEAD_LETTER, **step: Any) -> Pipeline:
    return (
        Pipeline("p", error_policy=policy)
        .source(Iterable(INPUT), into=Topic("in"))
        .map("inverse", inverse, **step)
        .sink(Collect(), step_id="out")
    )


def assert_the_good_records_arrived(result: TestResult, good_offsets: list[int]) -> None:
    records = result.records("out")
    assert [r.offset for r in records] == good_offsets
    for record in records:
        original = INPUT[record.offset]  # type: ignore[index]
        assert record.value == inverse(original)
        assert (record.topic, record.partition) == ("in", 0)


# -- dead letters --------------------------------------------------------------------------------


def test_malformed_json_is_dead_lettered_with_its_original_bytes() -> None:
    result = run_pipeline(pipeline_with())

    assert_the_good_records_arrived(result, [0, 1, 4])
    malformed = [r for r in result.dead_letters if r.value == MALFORMED]
    assert len(malformed) == 1
    dead = malformed[0]
    assert dead.key is None
    headers = header_texts(dead)
    assert headers["headwater.error"].startswith("malformed JSON")
    assert headers["headwater.error.type"] in {"JSONDecodeError", "InvalidRecord"}
    assert headers["headwater.step"] == "in"  # the source step that read it
    assert headers["headwater.source.topic"] == "in"
    assert headers["headwater.source.partition"] == "0"
    assert headers["headwater.source.offset"] == "2"


def test_user_function_that_raises_is_dead_lettered_with_its_original_bytes() -> None:
    result = run_pipeline(pipeline_with())

    failed = [r for r in result.dead_letters if r.value != MALFORMED]
    assert len(failed) == 1
    dead = failed[0]
    assert dead.value == Json().serialize(INPUT[3])  # the bytes on the input topic
    assert dead.value == result.topic("in")[3].value
    headers = header_texts(dead)
    assert "ZeroDivisionError" in headers["headwater.error"]
    assert "inverse" in headers["headwater.error"]  # names the user function
    assert headers["headwater.error.type"] == "ZeroDivisionError"
    assert headers["headwater.step"] == "inverse"
    assert headers["headwater.source.topic"] == "in"
    assert headers["headwater.source.partition"] == "0"
    assert headers["headwater.source.offset"] == "3"
    assert [r.topic for r in result.dead_letters] == ["p.dead-letters"] * 2


def test_dead_letters_keep_the_original_key_and_event_time() -> None:
    values = [
        Record(key="k1", value=1, timestamp=EVENT_TIME),
        Record(key="k2", value=0, timestamp=EVENT_TIME),
    ]
    pipeline = (
        Pipeline("p")
        .source(Iterable(values), into=Topic("in"))
        .map("inverse", lambda v: 1 / v)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.values("out") == [1.0]
    (dead,) = result.dead_letters
    assert dead.key == b"k2"
    assert dead.value == b"0"
    assert dead.timestamp == EVENT_TIME


def test_record_failing_its_model_is_dead_lettered_and_the_rest_validate() -> None:
    bad = b'{"user": "bob", "n": "not a number"}'
    values: list[Any] = [{"user": "ann", "n": 1}, bad, {"user": "cid", "n": 3}, b'{"n": 4}']
    pipeline = (
        Pipeline("p")
        .source(Iterable(values), into=Topic("clicks", value=CountedClick))
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)

    assert result.values("out") == [CountedClick(user="ann", n=1), CountedClick(user="cid", n=3)]
    assert [r.offset for r in result.records("out")] == [0, 2]
    dead = result.dead_letters
    assert [r.value for r in dead] == [bad, b'{"n": 4}']
    first, second = (header_texts(r) for r in dead)
    assert first["headwater.error"].startswith("does not validate as CountedClick")
    assert "n:" in first["headwater.error"]
    assert "user" not in first["headwater.error"]
    assert "user: Field required" in second["headwater.error"]
    assert first["headwater.error.type"] in {"ValidationError", "InvalidRecord"}
    assert first["headwater.step"] == "clicks"
    assert (first["headwater.source.topic"], first["headwater.source.offset"]) == ("clicks", "1")
    assert (second["headwater.source.topic"], second["headwater.source.offset"]) == ("clicks", "3")
    assert first["headwater.source.partition"] == second["headwater.source.partition"] == "0"


def test_many_failures_in_one_batch_leave_every_other_record_in_order() -> None:
    values: list[Any] = []
    for i in range(300):
        if i % 37 == 0:
            values.append(b"{broken")
        else:
            values.append({"user": f"u{i}", "n": i % 5})  # n == 0 fails in "inverse"
    pipeline = (
        Pipeline("p")
        .source(Iterable(values, batch_size=1000), into=Topic("in"))
        .map("inverse", inverse)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)

    good = [i for i, v in enumerate(values) if isinstance(v, dict) and v["n"] != 0]
    records = result.records("out")
    assert [r.offset for r in records] == good
    assert [r.value for r in records] == [inverse(values[i]) for i in good]
    dead_offsets = sorted(
        int(header_texts(r)["headwater.source.offset"]) for r in result.dead_letters
    )
    assert dead_offsets == sorted(set(range(300)) - set(good))
    for dead in result.dead_letters:
        offset = int(header_texts(dead)["headwater.source.offset"])
        assert dead.value == result.topic("in")[offset].value


def test_failure_after_key_by_points_at_the_repartition_topic() -> None:
    values = [{"user": u, "n": n} for u, n in [("ann", 1), ("bob", 0), ("cid", 2), ("bob", 3)]]
    pipeline = (
        Pipeline("p")
        .source(Iterable(values), into=Topic("in", partitions=2))
        .key_by("by-user", lambda v: v["user"], partitions=3)
        .map("inverse", inverse)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)

    assert sorted(r.value["user"] for r in result.records("out")) == ["ann", "bob", "cid"]
    (dead,) = result.dead_letters
    headers = header_texts(dead)
    assert headers["headwater.step"] == "inverse"
    assert headers["headwater.source.topic"] == "p.by-user"
    partition = int(headers["headwater.source.partition"])
    assert partition == partition_for(b"bob", 3)
    assert dead.key == b"bob"
    on_topic = [
        r
        for r in result.topic("p.by-user")
        if r.partition == partition and r.offset == int(headers["headwater.source.offset"])
    ]
    assert [r.value for r in on_topic] == [dead.value]
    assert Json().deserialize(dead.value) == {"user": "bob", "n": 0}


def test_key_function_returning_a_non_str_is_dead_lettered_with_a_hint() -> None:
    values = [{"id": "a"}, {"id": 7}, {"id": "b"}]
    pipeline = (
        Pipeline("p")
        .source(Iterable(values), into=Topic("in"))
        .key_by("by-id", lambda v: v["id"], partitions=2)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)

    assert sorted((r.key, r.value["id"]) for r in result.records("out")) == [("a", "a"), ("b", "b")]
    (dead,) = result.dead_letters
    assert dead.value == Json().serialize({"id": 7})
    headers = header_texts(dead)
    assert headers["headwater.step"] == "by-id"
    assert headers["headwater.error.type"] == "TypeError"
    assert "return a str" in headers["headwater.error"]
    assert "key serde" in headers["headwater.error"]
    assert "int 7" in headers["headwater.error"]
    assert (headers["headwater.source.topic"], headers["headwater.source.offset"]) == ("in", "1")


# -- SKIP ------------------------------------------------------------------------------------------


async def test_skip_drops_bad_records_and_counts_them_per_step() -> None:
    pipeline = pipeline_with(ErrorPolicy.SKIP)
    topology = compile_pipeline(pipeline)
    log = MemoryLog()
    run = await run_in_process(topology, log)

    step = pipeline.step("out")
    assert isinstance(step, SinkStep) and isinstance(step.sink, Collect)
    sink = step.sink
    assert [r.offset for r in sink.records] == [0, 1, 4]
    assert sink.values == [inverse(INPUT[i]) for i in (0, 1, 4)]
    (report,) = run.reports.values()
    records_in, records_out, skipped, dead_lettered, late = report.steps["in"]
    assert (records_in, records_out, skipped, dead_lettered, late) == (5, 4, 1, 0, 0)
    assert report.steps["inverse"] == [4, 3, 1, 0, 0]
    assert report.steps["out"] == [3, 3, 0, 0, 0]
    end = await log.end_offsets([TopicPartition(pipeline.dead_letter_topic.name, 0)])
    assert list(end.values()) == [0]  # nothing dead-lettered


async def test_dead_letter_counts_are_reported_per_step() -> None:
    pipeline = pipeline_with()
    run = await run_in_process(compile_pipeline(pipeline), MemoryLog())
    (report,) = run.reports.values()
    assert report.steps["in"] == [5, 4, 0, 1, 0]
    assert report.steps["inverse"] == [4, 3, 0, 1, 0]


def test_skip_through_run_pipeline_leaves_no_dead_letters() -> None:
    result = run_pipeline(pipeline_with(ErrorPolicy.SKIP))
    assert_the_good_records_arrived(result, [0, 1, 4])
    assert result.dead_letters == []


# -- FAIL ------------------------------------------------------------------------------------------


def test_fail_raises_step_error_naming_the_step_and_the_record() -> None:
    values = [{"user": "ann", "n": 1}, {"user": "bob", "n": 0}, {"user": "cid", "n": 2}]
    pipeline = (
        Pipeline("p", error_policy=ErrorPolicy.FAIL)
        .source(Iterable(values), into=Topic("in"))
        .map("inverse", inverse)
        .sink(Collect(), step_id="out")
    )
    with pytest.raises(StepError) as caught:
        run_pipeline(pipeline)
    error = caught.value
    assert error.step == "inverse"
    assert error.source == RecordSource("in", 0, 1)
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert "step 'inverse'" in str(error)
    assert "in[0]@1" in str(error)


def test_fail_on_malformed_input_raises_invalid_record_naming_the_source_step() -> None:
    with pytest.raises(InvalidRecord) as caught:
        run_pipeline(pipeline_with(ErrorPolicy.FAIL))
    error = caught.value
    assert error.step == "in"
    assert error.source == RecordSource("in", 0, 2)
    assert "malformed JSON" in str(error)
    assert "in[0]@2" in str(error)


# -- per-step on_error -----------------------------------------------------------------------------


def test_on_error_dead_letter_overrides_a_fail_pipeline() -> None:
    values = [{"user": "ann", "n": 1}, {"user": "bob", "n": 0}, {"user": "cid", "n": 2}]
    pipeline = (
        Pipeline("p", error_policy=ErrorPolicy.FAIL)
        .source(Iterable(values), into=Topic("in"))
        .map("inverse", inverse, on_error=ErrorPolicy.DEAD_LETTER)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert [r.offset for r in result.records("out")] == [0, 2]
    (dead,) = result.dead_letters
    assert header_texts(dead)["headwater.step"] == "inverse"


def test_on_error_skip_overrides_a_dead_letter_pipeline_for_that_step_only() -> None:
    result = run_pipeline(pipeline_with(on_error=ErrorPolicy.SKIP))
    assert_the_good_records_arrived(result, [0, 1, 4])
    # the malformed record failed in the source step, which follows the pipeline's policy
    assert [r.value for r in result.dead_letters] == [MALFORMED]


def test_on_error_fail_overrides_a_skip_pipeline() -> None:
    with pytest.raises(StepError) as caught:
        run_pipeline(pipeline_with(ErrorPolicy.SKIP, on_error=ErrorPolicy.FAIL))
    assert caught.value.step == "inverse"
    assert caught.value.source == RecordSource("in", 0, 3)


def test_on_error_applies_to_key_by_serialisation_failures() -> None:
    pipeline = (
        Pipeline("p", error_policy=ErrorPolicy.DEAD_LETTER)
        .source(Iterable([{"id": "a"}, {"id": 7}]), into=Topic("in"))
        .key_by("by-id", lambda v: v["id"], on_error=ErrorPolicy.FAIL)
        .sink(Collect(), step_id="out")
    )
    with pytest.raises(StepError, match="return a str") as caught:
        run_pipeline(pipeline)
    assert caught.value.step == "by-id"
    assert caught.value.source == RecordSource("in", 0, 1)
