"""branch and merge, run end to end on the memory backend."""

from __future__ import annotations

from collections import Counter

import pytest
from support.values import from_values

from connectors.memory import Collect, Iterable
from pipelines import Pipeline, Topic
from pipelines.serde import Json
from pipelines.testing import run_pipeline

# -- branch ----------------------------------------------------------------------------------------


def test_branch_sends_matching_records_down_then_and_the_rest_on() -> None:
    values = list(range(40))
    pipeline = (
        from_values(values)
        .branch(
            "big",
            lambda v: v >= 25,
            then=lambda big: big.map("label-big", lambda v: f"big {v}").sink(
                Collect(), step_id="big-out"
            ),
        )
        .map("label-small", lambda v: f"small {v}")
        .sink(Collect(), step_id="small-out")
    )
    result = run_pipeline(pipeline)
    assert result.values("big-out") == [f"big {v}" for v in values if v >= 25]
    assert result.values("small-out") == [f"small {v}" for v in values if v < 25]


def test_branch_predicate_is_judged_by_truthiness() -> None:
    values = ["", "a", "", "bc"]
    pipeline = (
        from_values(values)
        .branch("non-empty", len, then=lambda m: m.sink(Collect(), step_id="yes"))
        .sink(Collect(), step_id="no")
    )
    result = run_pipeline(pipeline)
    assert result.values("yes") == ["a", "bc"]
    assert result.values("no") == ["", ""]


def test_a_sink_before_a_branch_sees_every_record() -> None:
    values = list(range(10))
    pipeline = (
        from_values(values)
        .sink(Collect(), step_id="all")
        .branch("odd", lambda v: v % 2, then=lambda m: m.sink(Collect(), step_id="odd-out"))
        .sink(Collect(), step_id="even-out")
    )
    result = run_pipeline(pipeline)
    assert result.values("all") == values
    assert result.values("odd-out") == [1, 3, 5, 7, 9]
    assert result.values("even-out") == [0, 2, 4, 6, 8]


def test_branch_records_whose_predicate_raised_go_down_neither_path() -> None:
    values = [1, 0, 2, 0, 3]
    pipeline = (
        from_values(values)
        .branch("ratio", lambda v: 6 / v > 2, then=lambda m: m.sink(Collect(), step_id="yes"))
        .sink(Collect(), step_id="no")
    )
    result = run_pipeline(pipeline)
    assert result.values("yes") == [1, 2]
    assert result.values("no") == [3]
    dead = result.dead_letters
    assert [Json().deserialize(r.value) for r in dead] == [0, 0]
    assert all(dict(r.headers)["headwater.step"] == b"ratio" for r in dead)


def test_nested_branches_route_each_record_once() -> None:
    values = list(range(30))
    pipeline = (
        from_values(values)
        .branch(
            "fizz",
            lambda v: v % 3 == 0,
            then=lambda fizz: fizz.branch(
                "fizzbuzz",
                lambda v: v % 5 == 0,
                then=lambda fb: fb.sink(Collect(), step_id="fizzbuzz-out"),
            ).sink(Collect(), step_id="fizz-out"),
        )
        .sink(Collect(), step_id="other-out")
    )
    result = run_pipeline(pipeline)
    assert result.values("fizzbuzz-out") == [0, 15]
    assert result.values("fizz-out") == [v for v in values if v % 3 == 0 and v % 5]
    assert result.values("other-out") == [v for v in values if v % 3]


# -- merge -----------------------------------------------------------------------------------------


def _two_sources(partitions: int = 2) -> tuple[Pipeline, Pipeline]:
    web = from_values(
        [{"from": "web", "n": i} for i in range(30)], partitions=partitions, topic="web"
    )
    app = web.source(
        Iterable([{"from": "app", "n": i} for i in range(20)]),
        into=Topic("app", partitions=partitions),
    )
    return web, app


def test_merge_of_two_sources_delivers_the_records_of_both() -> None:
    web, app = _two_sources()
    pipeline = web.merge("all", app).sink(Collect(), step_id="out")
    records = run_pipeline(pipeline).records("out")

    assert sorted((r.value["from"], r.value["n"]) for r in records) == sorted(
        [("web", i) for i in range(30)] + [("app", i) for i in range(20)]
    )
    assert all(r.topic == r.value["from"] for r in records)  # each read from its own topic


def test_merge_continues_as_one_stream() -> None:
    web, app = _two_sources()
    pipeline = (
        web.merge("all", app)
        .filter("even", lambda v: v["n"] % 2 == 0)
        .map("label", lambda v: f"{v['from']}-{v['n']}")
        .sink(Collect(), step_id="out")
    )
    out = run_pipeline(pipeline).values("out")
    expected = [f"web-{i}" for i in range(0, 30, 2)] + [f"app-{i}" for i in range(0, 20, 2)]
    assert Counter(out) == Counter(expected)


def test_merge_of_the_two_paths_of_a_branch_gets_every_record_back() -> None:
    matched: dict[str, Pipeline] = {}

    def loud(chain: Pipeline) -> Pipeline:
        matched["chain"] = chain.map("shout", str.upper)
        return matched["chain"]

    values = ["a", "B", "c", "D", "e"]
    rest = from_values(values).branch("lower", str.islower, then=loud)
    pipeline = rest.map("quiet", lambda s: s.lower()).merge("joined", matched["chain"])
    result = run_pipeline(pipeline.sink(Collect(), step_id="out"))
    assert Counter(result.values("out")) == Counter(["A", "b", "C", "d", "E"])


def test_merge_of_three_streams() -> None:
    web, app = _two_sources(partitions=1)
    api = app.source(Iterable([{"from": "api", "n": 0}]), into=Topic("api"))
    pipeline = web.merge("all", app, api).sink(Collect(), step_id="out")
    out = run_pipeline(pipeline).values("out")
    assert Counter(v["from"] for v in out) == {"web": 30, "app": 20, "api": 1}


@pytest.mark.parametrize("workers", [1, 3])
def test_merge_then_key_by_is_complete_with_any_number_of_workers(workers: int) -> None:
    web, app = _two_sources(partitions=3)
    pipeline = (
        web.merge("all", app)
        .key_by("by-n", lambda v: str(v["n"] % 4), partitions=2)
        .sink(Collect(), step_id="out")
    )
    records = run_pipeline(pipeline, workers=workers).records("out")
    assert sorted((r.value["from"], r.value["n"]) for r in records) == sorted(
        [("web", i) for i in range(30)] + [("app", i) for i in range(20)]
    )
    assert all(r.key == str(r.value["n"] % 4) for r in records)
