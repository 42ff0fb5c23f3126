"""Reserved topic names: ``Topic`` refuses names Kafka refuses, and ``compile_pipeline`` refuses a
topic given to a pipeline whose name starts with ``<pipeline>.``, where the topics the pipeline
names itself live (dead letters, source positions, key_by topics, changelogs, late data)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from support.values import from_values

from connectors.memory import Collect, Iterable
from connectors.topic import LogTopic
from operators.windows import Tumbling
from pipelines import Pipeline, Topic
from pipelines.errors import PipelineDefinitionError
from pipelines.runtime.topology import compile_pipeline
from pipelines.testing import run_pipeline


def refused(pipeline: Pipeline) -> PipelineDefinitionError:
    with pytest.raises(PipelineDefinitionError) as caught:
        compile_pipeline(pipeline)
    return caught.value


def _pair(value: Any, row: Any) -> Any:
    return [value, row]


# -- names Topic(...) refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("", ["empty", "1-200"]),
        (".", ["'.'", "refused by Kafka"]),
        ("..", ["'..'", "refused by Kafka"]),
        ("a b", ["Kafka refuses", "' '", "ASCII letters"]),
        ("a/b", ["Kafka refuses", "'/'"]),
        ("orders:v2", ["Kafka refuses", "':'"]),
        ("ünï", ["Kafka refuses", "'ï', 'ü'"]),
        ("tab\there", ["Kafka refuses", "'\\t'"]),
        ("trailing-newline\n", ["Kafka refuses", "'\\n'"]),
        ("x" * 201, ["201 characters long", "at most 200"]),
    ],
)
def test_topic_refuses_names_kafka_refuses_and_says_why(bad: str, words: list[str]) -> None:
    with pytest.raises(PipelineDefinitionError, match="topic name") as caught:
        Topic(bad)
    for word in words:
        assert word in str(caught.value)


def test_topic_refuses_a_name_that_is_not_a_string() -> None:
    with pytest.raises(PipelineDefinitionError, match="must be a string, got int"):
        Topic(7)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["a", "-", "_", "orders.v2", "a-b_c.D9", "...", "x" * 200])
def test_topic_takes_every_name_kafka_takes_up_to_200_characters(good: str) -> None:
    assert Topic(good).name == good


# -- names in the pipeline's own namespace ----------------------------------------------------


def test_a_source_into_the_dead_letter_topic_is_refused_naming_the_step() -> None:
    error = refused(
        from_values(topic="p.dead-letters", step_id="raw").sink(Collect(), step_id="out")
    )
    message = str(error)
    assert error.step == "raw"
    assert "topic 'p.dead-letters' is the dead-letter topic of pipeline 'p'" in message
    assert "names starting with 'p.' are reserved" in message
    assert "e.g. 'p-dead-letters'" in message  # what to do instead


def test_a_log_topic_source_reading_the_dead_letter_topic_is_refused() -> None:
    topic = Topic("p.dead-letters", key=bytes, value=bytes)
    error = refused(Pipeline("p").source(LogTopic(topic)).sink(Collect(), step_id="out"))
    assert error.step == "p.dead-letters"
    assert "dead-letter topic" in str(error)


def test_a_sink_into_the_source_positions_topic_is_refused() -> None:
    pipeline = from_values().sink(LogTopic(Topic("p.source-positions", value=dict)))
    error = refused(pipeline)
    assert error.step == "to.p.source-positions"
    assert "is where the sources of pipeline 'p' keep their positions" in str(error)


def test_a_source_into_a_key_by_topic_is_refused() -> None:
    keyed = from_values().key_by("by-user", str)
    error = refused(keyed.source(Iterable([3]), into=Topic("p.by-user"), step_id="sneaky"))
    assert error.step == "sneaky"
    assert "the topic key_by 'by-user' of pipeline 'p' repartitions through" in str(error)


def test_reading_or_writing_a_key_by_topic_as_a_log_topic_is_refused() -> None:
    keyed = from_values().key_by("by-user", str)
    reread = keyed.source(LogTopic(Topic("p.by-user")), step_id="reread")
    assert refused(reread).step == "reread"
    written = keyed.sink(LogTopic(Topic("p.by-user")), step_id="write-back")
    assert refused(written).step == "write-back"


def test_sinks_into_changelog_marks_and_late_topics_are_refused() -> None:
    counted = from_values().key_by("k", str).window("minute", Tumbling(minutes=1)).count("count")
    cases = {
        "p.count.changelog": "is named like a state changelog of pipeline 'p'",
        "p.marks-0.changelog": "is named like a state changelog of pipeline 'p'",
        "p.count.late": "is named like a late-data topic of pipeline 'p'",
    }
    for name, words in cases.items():
        error = refused(counted.sink(LogTopic(Topic(name)), step_id="out"))
        assert error.step == "out"
        assert words in str(error)
        assert f"e.g. {name.replace('p.', 'p-', 1)!r}" in str(error)


def test_any_name_under_the_prefix_is_refused_even_one_the_pipeline_does_not_use_yet() -> None:
    error = refused(from_values(topic="p.raw").sink(Collect(), step_id="out"))
    assert error.step == "p.raw"
    assert "topic 'p.raw' is named in the internal namespace of pipeline 'p'" in str(error)
    assert "e.g. 'p-raw'" in str(error)


def test_a_join_table_under_the_prefix_is_refused_naming_the_join() -> None:
    stream = from_values().key_by("k", str)
    error = refused(stream.join_table("enrich", Topic("p.users"), _pair))
    assert error.step == "enrich"  # not the reader the join adds for its table
    assert "'p.users'" in str(error)


def test_a_table_join_with_a_key_by_topic_of_the_pipeline_is_allowed_and_runs() -> None:
    users = (
        Pipeline("p")
        .source(Iterable([]), into=Topic("users"))
        .key_by("users-by-id", lambda u: u["id"])
    )
    orders = users.source(Iterable([]), into=Topic("orders")).key_by(
        "orders-by-user", lambda o: o["user"]
    )
    table = Topic("p.users-by-id")
    joined = orders.join_table("enrich", table, _pair, how="left").sink(Collect(), step_id="out")
    assert "enrich.table" not in [s.step_id for s in joined.steps]  # read where key_by writes
    result = run_pipeline(
        joined,
        {"users": [{"id": "u1", "tier": "gold"}], "orders": [{"user": "u2", "n": 1}]},
    )
    assert result.values("out") == [[{"user": "u2", "n": 1}, None]]  # u2 has no row


def test_the_check_runs_before_anything_runs() -> None:
    pipeline = from_values(topic="p.dead-letters").sink(Collect(), step_id="out")
    with pytest.raises(PipelineDefinitionError, match="dead-letter topic") as caught:
        run_pipeline(pipeline, {"p.dead-letters": [1]})
    assert caught.value.step == "p.dead-letters"


def test_the_prefix_is_the_pipeline_name_and_a_dot() -> None:
    dotted = Pipeline("shop.orders").source(Iterable([]), into=Topic("shop.orders.raw"))
    error = refused(dotted.sink(Collect(), step_id="out"))
    assert "names starting with 'shop.orders.' are reserved" in str(error)
    assert "e.g. 'shop.orders-raw'" in str(error)
    for name in ("shop.ordersx", "shop.other", "shop.orders", "shop.orders-raw"):
        compile_pipeline(
            Pipeline("shop.orders").source(Iterable([]), into=Topic(name)).sink(Collect())
        )


@pytest.mark.parametrize("name", ["p", "p-dead-letters", "pp.raw", "P.raw", "q.p.k", "in.p"])
def test_ordinary_names_still_compile(name: str) -> None:
    pipeline = (
        from_values(topic=name).key_by("k", str).sink(LogTopic(Topic(f"{name}-out")), step_id="o")
    )
    topology = compile_pipeline(pipeline)
    assert name in [t.name for t in topology.input_topics]


def test_another_pipeline_may_read_this_ones_internal_topics() -> None:
    dead_letters = Pipeline("p").dead_letter_topic
    reprocess = Pipeline("reprocess").source(LogTopic(dead_letters)).sink(Collect())
    assert dead_letters.name in [t.name for t in compile_pipeline(reprocess).input_topics]


def test_every_topic_the_pipeline_makes_itself_is_under_the_prefix() -> None:
    """The premise of the rule: internal topics all live under ``<pipeline>.``."""
    left = from_values(topic="clicks").key_by("clicks-by-user", str)
    right = left.source(Iterable([]), into=Topic("views")).key_by("views-by-user", str)
    pipeline = (
        left.join_stream("pair", right, timedelta(seconds=1), _pair)
        .window("minute", Tumbling(minutes=1))
        .count("count")
        .dedupe("once", timedelta(minutes=1))
        .sink(LogTopic(Topic("out")), step_id="to-out")
    )
    topology = compile_pipeline(pipeline)
    given = {"clicks", "views", "out"}
    made = [t.name for t in [*topology.topics, topology.positions_topic] if t.name not in given]
    assert pipeline.internal_prefix == "p."
    assert all(name.startswith("p.") for name in made), made
    assert sorted(name.removeprefix("p.") for name in made) == [
        "clicks-by-user",
        "count.changelog",
        "count.late",
        "dead-letters",
        "marks-0.changelog",
        "marks-1.changelog",
        "marks-2.changelog",
        "once.changelog",
        "pair.changelog",
        "pair.late",
        "source-positions",
        "views-by-user",
    ]
