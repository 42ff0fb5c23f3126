"""The Pipeline DSL (declaring a graph) and ``compile_pipeline`` (cutting it into pieces)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.values import PageClick, from_values, repartition_topic

from connectors.memory import Collect, Iterable
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic
from pipelines.errors import ErrorPolicy, PipelineDefinitionError
from pipelines.runtime.topology import compile_pipeline
from pipelines.serde import Bytes, Json, Model, Str
from pipelines.steps import ReadStep, WriteStep


def _identity(value: Any) -> Any:
    return value


# -- immutability and the shape of the chain ------------------------------------------------


def test_adding_a_step_returns_a_new_pipeline_and_leaves_the_original_unchanged() -> None:
    base = from_values()
    steps_before = base.steps
    tail_before = base.tail

    mapped = base.map("double", lambda v: v * 2)

    assert mapped is not base
    assert base.steps is steps_before
    assert [s.step_id for s in base.steps] == ["in"]
    assert base.tail == tail_before == ("in", "out")
    assert [s.step_id for s in mapped.steps] == ["in", "double"]
    assert mapped.tail == ("double", "out")
    assert mapped.steps[0] is base.steps[0]  # shared, not copied


def test_two_extensions_of_one_pipeline_do_not_see_each_other() -> None:
    base = from_values()
    left = base.map("left", _identity)
    right = base.filter("right", bool)

    assert [s.step_id for s in left.steps] == ["in", "left"]
    assert [s.step_id for s in right.steps] == ["in", "right"]
    # the same id may be reused on a separate extension, since each pipeline is its own value
    assert [s.step_id for s in base.map("right", _identity).steps] == ["in", "right"]


def test_chain_links_each_step_to_the_previous_tail() -> None:
    pipeline = (
        from_values()
        .map("m", _identity)
        .filter("f", bool)
        .flat_map("fm", lambda v: [v])
        .peek("pk", print)
        .key_by("k", str)
    )
    inputs = {s.step_id: s.inputs for s in pipeline.steps}
    kinds = {s.step_id: s.kind for s in pipeline.steps}

    assert inputs == {
        "in": (),
        "m": (("in", "out"),),
        "f": (("m", "out"),),
        "fm": (("f", "out"),),
        "pk": (("fm", "out"),),
        "k": (("pk", "out"),),
    }
    assert kinds == {
        "in": "source",
        "m": "operator",
        "f": "operator",
        "fm": "operator",
        "pk": "operator",
        "k": "key_by",
    }


def test_a_sink_does_not_move_the_tail_so_a_stream_can_feed_several_sinks() -> None:
    pipeline = from_values().map("m", _identity).sink(Collect(), step_id="one")
    assert pipeline.tail == ("m", "out")
    both = pipeline.sink(Collect(), step_id="two")
    assert both.step("one").inputs == both.step("two").inputs == (("m", "out"),)


def test_sink_step_ids_default_to_the_connector_or_topic_name() -> None:
    pipeline = from_values().sink(Collect()).sink(LogTopic(Topic("out")))
    assert [s.step_id for s in pipeline.steps] == ["in", "sink.collect", "to.out"]
    written = pipeline.step("to.out")
    assert isinstance(written, WriteStep)
    assert written.topic.name == "out"


def test_step_lookup_of_an_unknown_id_raises_key_error() -> None:
    with pytest.raises(KeyError):
        from_values().step("nope")


def test_error_policy_is_kept_along_the_chain_and_on_error_is_stored_per_step() -> None:
    pipeline = (
        Pipeline("p", error_policy="skip")  # type: ignore[arg-type]
        .source(Iterable([1]), into=Topic("in"))
        .map("m", _identity, on_error=ErrorPolicy.FAIL)
        .filter("f", bool)
    )
    assert pipeline.error_policy is ErrorPolicy.SKIP
    assert pipeline.step("m").error_policy is ErrorPolicy.FAIL
    assert pipeline.step("f").error_policy is None
    assert Pipeline("q").error_policy is ErrorPolicy.DEAD_LETTER


# -- mistakes raise PipelineDefinitionError naming the step ----------------------------------


def test_duplicate_step_id_raises_naming_the_step() -> None:
    pipeline = from_values().map("enrich", _identity)
    with pytest.raises(PipelineDefinitionError, match="used twice") as caught:
        pipeline.filter("enrich", bool)
    assert caught.value.step == "enrich"
    assert "'enrich'" in str(caught.value)
    assert "'p'" in str(caught.value)


def test_operator_reusing_the_source_step_id_is_a_duplicate() -> None:
    with pytest.raises(PipelineDefinitionError, match="used twice") as caught:
        from_values(topic="clicks").map("clicks", _identity)
    assert caught.value.step == "clicks"


BAD_IDS = [
    "",
    "-leading-dash",
    ".leading-dot",
    "_leading-underscore",
    "has space",
    "a/b",
    "a:b",
    "ünïcode",
    "x" * 101,
    "trailing-newline\n",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_step_ids_are_refused(bad: str) -> None:
    with pytest.raises(PipelineDefinitionError, match="step id") as caught:
        from_values().map(bad, _identity)
    assert caught.value.step == bad


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_pipeline_names_are_refused(bad: str) -> None:
    with pytest.raises(PipelineDefinitionError, match="pipeline name"):
        Pipeline(bad)


@pytest.mark.parametrize(
    "bad", ["", "has space", "a/b", "ünïcode", "x" * 201, "trailing-newline\n"]
)
def test_bad_topic_names_are_refused(bad: str) -> None:
    with pytest.raises(PipelineDefinitionError, match="topic name"):
        Topic(bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_topic_partitions_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(PipelineDefinitionError, match="positive number of partitions"):
        Topic("t", partitions=bad)


@pytest.mark.parametrize("good", ["a", "A", "9", "a.b_c-D", "x" * 100])
def test_good_step_ids_and_pipeline_names_are_accepted(good: str) -> None:
    assert Pipeline(good).name == good
    assert from_values().map(good, _identity).steps[-1].step_id == good


OPERATORS: dict[str, Callable[[Pipeline, str, Any], Pipeline]] = {
    "map": lambda p, s, f: p.map(s, f),
    "filter": lambda p, s, f: p.filter(s, f),
    "flat_map": lambda p, s, f: p.flat_map(s, f),
    "peek": lambda p, s, f: p.peek(s, f),
    "key_by": lambda p, s, f: p.key_by(s, f),
    "branch": lambda p, s, f: p.branch(s, f, then=lambda m: m),
}


@pytest.mark.parametrize("method", sorted(OPERATORS))
def test_operator_before_a_source_is_refused(method: str) -> None:
    with pytest.raises(PipelineDefinitionError, match=r"start the pipeline with \.source") as e:
        OPERATORS[method](Pipeline("p"), "early", _identity)
    assert e.value.step == "early"


def test_sink_and_merge_before_a_source_are_refused() -> None:
    with pytest.raises(PipelineDefinitionError, match="no input") as caught:
        Pipeline("p").sink(Collect(), step_id="out")
    assert caught.value.step == "out"
    with pytest.raises(PipelineDefinitionError, match="no input") as caught:
        Pipeline("p").merge("mg", from_values())
    assert caught.value.step == "mg"


@pytest.mark.parametrize("method", sorted(OPERATORS))
@pytest.mark.parametrize("not_a_function", [42, "v * 2", None])
def test_non_callable_function_is_refused(method: str, not_a_function: object) -> None:
    with pytest.raises(PipelineDefinitionError, match="needs a function") as caught:
        OPERATORS[method](from_values(), "step", not_a_function)
    assert caught.value.step == "step"
    assert type(not_a_function).__name__ in str(caught.value)


def test_source_without_into_is_refused_with_a_hint() -> None:
    with pytest.raises(PipelineDefinitionError, match="into=") as caught:
        Pipeline("p").source(Iterable([1]))
    assert "Topic(" in str(caught.value)
    assert "'iterable'" in str(caught.value)


def test_source_that_is_not_a_source_is_refused() -> None:
    with pytest.raises(PipelineDefinitionError, match="needs a connectors Source, got list"):
        Pipeline("p").source([1, 2], into=Topic("in"))  # type: ignore[arg-type]


def test_log_topic_source_with_into_is_refused() -> None:
    with pytest.raises(PipelineDefinitionError, match="leave out into=") as caught:
        Pipeline("p").source(LogTopic(Topic("events")), into=Topic("other"))
    assert caught.value.step == "events"


def test_log_topic_source_reads_its_own_topic() -> None:
    topic = Topic("events", partitions=3)
    pipeline = Pipeline("p").source(LogTopic(topic))
    step = pipeline.step("events")
    assert isinstance(step, ReadStep)
    assert step.kind == "read"
    assert step.topic is topic
    assert pipeline.tail == ("events", "out")


@pytest.mark.parametrize("not_a_sink", [[], print, "stdout", Collect])
def test_sink_with_something_that_is_not_a_sink_is_refused(not_a_sink: object) -> None:
    with pytest.raises(PipelineDefinitionError, match="needs a connectors Sink or LogTopic") as e:
        from_values().sink(not_a_sink)  # type: ignore[arg-type]
    assert type(not_a_sink).__name__ in str(e.value)


@pytest.mark.parametrize(
    "then",
    [
        lambda matched: None,
        lambda matched: "a pipeline",
        lambda matched: Pipeline("p"),
        lambda matched: from_values().map("x", _identity),
    ],
    ids=["none", "string", "new-pipeline", "unrelated-chain"],
)
def test_branch_then_must_return_the_pipeline_it_was_given(
    then: Callable[[Pipeline], Any],
) -> None:
    with pytest.raises(PipelineDefinitionError, match="then= must return") as caught:
        from_values().branch("split", bool, then=then)
    assert caught.value.step == "split"


def test_branch_wires_matched_into_then_and_continues_with_the_rest() -> None:
    pipeline = (
        from_values()
        .branch("split", lambda v: v > 1, then=lambda m: m.map("big", _identity))
        .map("small", _identity)
    )
    assert pipeline.step("split").kind == "branch"
    assert pipeline.step("big").inputs == (("split", "matched"),)
    assert pipeline.step("small").inputs == (("split", "rest"),)
    assert pipeline.tail == ("small", "out")


def test_merge_of_pipelines_with_different_names_is_refused() -> None:
    ours = from_values(name="p")
    theirs = from_values(name="q", topic="other")
    with pytest.raises(PipelineDefinitionError, match="cannot merge") as caught:
        ours.merge("mg", theirs)
    assert caught.value.step == "mg"
    assert "'q'" in str(caught.value)
    assert "'p'" in str(caught.value)


def test_merge_of_chains_whose_step_ids_mean_different_steps_is_refused() -> None:
    one = Pipeline("p").source(Iterable([1]), into=Topic("x"))
    two = Pipeline("p").source(Iterable([2]), into=Topic("x"))
    with pytest.raises(PipelineDefinitionError, match="'x' means different steps") as caught:
        one.merge("mg", two)
    assert caught.value.step == "mg"


def test_merge_joins_tails_and_keeps_shared_steps_once() -> None:
    base = from_values()
    left = base.map("left", _identity)
    right = base.map("right", _identity)
    merged = left.merge("mg", right)
    assert [s.step_id for s in merged.steps] == ["in", "left", "right", "mg"]
    assert merged.step("mg").inputs == (("left", "out"), ("right", "out"))
    assert merged.tail == ("mg", "out")


# -- key_by and its repartition topic ----------------------------------------------------------


def test_key_by_creates_the_repartition_topic_named_after_pipeline_and_step() -> None:
    pipeline = (
        Pipeline("clicks")
        .source(Iterable([]), into=Topic("raw", partitions=4, value=PageClick))
        .key_by("by-user", lambda c: c.user)
    )
    topic = repartition_topic(pipeline, "by-user")
    assert topic.name == "clicks.by-user"
    assert topic.partitions == 4
    assert isinstance(topic.value_serde, Model)
    assert topic.value_serde.model is PageClick
    assert isinstance(topic.key_serde, Str)


def test_key_by_partitions_and_key_serde_can_be_given() -> None:
    pipeline = from_values(partitions=4).key_by("k", _identity, partitions=7, key=bytes)
    topic = repartition_topic(pipeline, "k")
    assert topic.partitions == 7
    assert isinstance(topic.key_serde, Bytes)
    assert isinstance(topic.value_serde, Json)


def test_key_by_defaults_to_the_largest_topic_feeding_a_merge() -> None:
    small = from_values(partitions=2, topic="small")
    large = small.source(Iterable([]), into=Topic("large", partitions=6))
    merged = small.merge("mg", large).key_by("k", str)  # declared only: not compiled
    assert repartition_topic(merged, "k").partitions == 6


def _independent_chains() -> Pipeline:
    big = from_values(partitions=8, topic="big").sink(Collect(), step_id="big-out")
    return big.source(Iterable([]), into=Topic("small", partitions=2)).key_by("k", str)


def _key_by_after_key_by() -> Pipeline:
    return from_values(partitions=8).key_by("first", str, partitions=2).key_by("k", str)


@pytest.mark.parametrize(
    "build", [_independent_chains, _key_by_after_key_by], ids=["independent", "rekeyed"]
)
def test_key_by_default_partitions_come_from_its_own_input_topic(
    build: Callable[[], Pipeline],
) -> None:
    """The stream reaching ``k`` is read from a 2-partition topic; an 8-partition topic that
    this stream is not read from (another chain's, or one before an earlier key_by) must not
    decide the partition count of ``k``'s repartition topic."""
    assert repartition_topic(build(), "k").partitions == 2


# -- compile_pipeline ---------------------------------------------------------------------------


def test_pipeline_without_source_does_not_compile() -> None:
    with pytest.raises(PipelineDefinitionError, match="'empty' has no source"):
        compile_pipeline(Pipeline("empty"))


def test_merge_of_topics_with_different_partition_counts_is_refused_at_compile_time() -> None:
    two = from_values(partitions=2, topic="two")
    three = two.source(Iterable([]), into=Topic("three", partitions=3))
    merged = two.merge("mg", three).sink(Collect(), step_id="out")  # declaring is fine

    with pytest.raises(PipelineDefinitionError, match="different partition counts") as caught:
        compile_pipeline(merged)
    message = str(caught.value)
    assert caught.value.step == "mg"
    assert "'two': 2" in message
    assert "'three': 3" in message
    assert "same number of partitions" in message  # how to fix it
    assert "key_by before merging" in message


def test_merge_after_key_by_to_equal_partitions_compiles_into_one_sub_topology() -> None:
    two = from_values(partitions=2, topic="two").key_by("rekeyed", str, partitions=3)
    three = two.source(Iterable([]), into=Topic("three", partitions=3))
    topology = compile_pipeline(two.merge("mg", three).sink(Collect(), step_id="out"))

    merged_sub = topology.by_topic["three"]
    assert topology.by_topic["p.rekeyed"] is merged_sub
    assert sorted(t.name for t in merged_sub.topics) == ["p.rekeyed", "three"]
    assert merged_sub.partitions == 3
    assert [s.step_id for s in merged_sub.steps] == ["three", "mg", "out"]


def test_topic_declared_twice_with_different_partition_counts_is_refused() -> None:
    pipeline = from_values(partitions=2, topic="shared").sink(
        LogTopic(Topic("shared", partitions=3))
    )
    with pytest.raises(PipelineDefinitionError, match="'shared'") as caught:
        compile_pipeline(pipeline)
    assert "2" in str(caught.value)
    assert "3" in str(caught.value)


def test_topic_clashing_with_the_dead_letter_topic_is_refused() -> None:
    pipeline = from_values().sink(LogTopic(Topic("p.dead-letters", partitions=4)))
    with pytest.raises(PipelineDefinitionError, match=r"'p\.dead-letters'"):
        compile_pipeline(pipeline)


def test_topic_declared_twice_alike_is_listed_once() -> None:
    pipeline = from_values(partitions=2).sink(LogTopic(Topic("out", partitions=5)))
    pipeline = pipeline.source(LogTopic(Topic("out", partitions=5)), step_id="reread")
    topology = compile_pipeline(pipeline.sink(Collect(), step_id="sink"))
    names = [t.name for t in topology.topics]
    # and the changelog of each sub-topology's input marks
    assert names == ["in", "out", "p.dead-letters", "p.marks-0.changelog", "p.marks-1.changelog"]


def test_compile_cuts_sub_topologies_at_the_key_by() -> None:
    pipeline = (
        from_values(partitions=3)
        .map("a", _identity)
        .filter("f", bool)
        .key_by("k", str)
        .map("b", _identity)
        .sink(Collect(), step_id="out")
    )
    topology = compile_pipeline(pipeline)

    assert len(topology.subtopologies) == 2
    first, second = topology.subtopologies
    assert [first.index, second.index] == [0, 1]

    assert [t.name for t in first.topics] == ["in"]
    assert [s.step_id for s in first.steps] == ["in", "a", "f", "k"]  # key_by runs upstream
    assert {name: s.step_id for name, s in first.entries.items()} == {"in": "in"}

    assert [t.name for t in second.topics] == ["p.k"]
    assert [s.step_id for s in second.steps] == ["b", "out"]
    assert {name: s.step_id for name, s in second.entries.items()} == {"p.k": "k"}
    assert second.entries["p.k"] is pipeline.step("k")  # and is the entry downstream
    assert second.partitions == first.partitions == 3

    assert sorted(topology.by_topic) == ["in", "p.k"]
    assert topology.by_topic["in"] is first
    assert topology.by_topic["p.k"] is second
    assert [t.name for t in topology.input_topics] == ["in", "p.k"]
    assert [t.name for t in topology.topics] == [
        "in",
        "p.k",
        "p.dead-letters",
        "p.marks-0.changelog",
        "p.marks-1.changelog",
    ]
    assert topology.children[("k", "out")] == [pipeline.step("b")]
    assert topology.children[("in", "out")] == [pipeline.step("a")]
    assert [s.step_id for s in topology.source_steps] == ["in"]
    assert [s.step_id for s in topology.sink_steps] == ["out"]
    assert topology.group == "p"


def test_compile_keeps_both_branches_in_one_sub_topology() -> None:
    pipeline = (
        from_values(partitions=2)
        .branch("split", bool, then=lambda m: m.sink(Collect(), step_id="yes"))
        .sink(Collect(), step_id="no")
    )
    topology = compile_pipeline(pipeline)
    assert len(topology.subtopologies) == 1
    assert [s.step_id for s in topology.subtopologies[0].steps] == ["in", "split", "yes", "no"]
    assert topology.children[("split", "matched")] == [pipeline.step("yes")]
    assert topology.children[("split", "rest")] == [pipeline.step("no")]


def test_compile_gives_each_unrelated_source_its_own_sub_topology() -> None:
    first = from_values(partitions=2, topic="a").sink(Collect(), step_id="a-out")
    both = first.source(Iterable([]), into=Topic("b", partitions=5)).sink(
        Collect(), step_id="b-out"
    )
    topology = compile_pipeline(both)
    assert [[t.name for t in s.topics] for s in topology.subtopologies] == [["a"], ["b"]]
    assert [s.partitions for s in topology.subtopologies] == [2, 5]


# -- the dead-letter topic -------------------------------------------------------------------


def test_dead_letter_topic_name_and_format() -> None:
    topic = Pipeline("orders").dead_letter_topic
    assert topic.name == "orders.dead-letters"
    assert topic.partitions == 1
    assert isinstance(topic.value_serde, Bytes)
    assert isinstance(topic.key_serde, Bytes)
    compiled = compile_pipeline(from_values(name="orders"))
    assert "orders.dead-letters" in [t.name for t in compiled.topics]
    assert "orders.dead-letters" not in [t.name for t in compiled.input_topics]
