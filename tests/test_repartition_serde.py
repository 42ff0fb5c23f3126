"""key_by picks the repartition topic's value serde so that values survive the trip."""

from __future__ import annotations

from support.values import PageClick, repartition_topic

from connectors.memory import Collect, Iterable
from pipelines import Json, Model, Pipeline, Topic
from pipelines.testing import run_pipeline

CLICKS = [{"user": f"u{i % 3}", "url": f"/p/{i}"} for i in range(30)]


def _source() -> Pipeline:
    return Pipeline("p").source(
        Iterable(CLICKS), into=Topic("clicks", partitions=2, value=PageClick)
    )


def test_untouched_values_keep_their_model() -> None:
    pipeline = _source().filter("f", lambda c: c.url != "/p/0").key_by("k", lambda c: c.user)
    assert isinstance(repartition_topic(pipeline, "k").value_serde, Model)
    out = run_pipeline(pipeline.sink(Collect(), step_id="out")).values("out")
    assert sorted(c.url for c in out) == sorted(c["url"] for c in CLICKS[1:])
    assert all(isinstance(c, PageClick) for c in out)


def test_mapped_values_travel_as_json() -> None:
    pipeline = _source().map("m", lambda c: {"who": c.user}).key_by("k", lambda v: v["who"])
    assert isinstance(repartition_topic(pipeline, "k").value_serde, Json)
    out = run_pipeline(pipeline.sink(Collect(), step_id="out")).values("out")
    assert sorted(v["who"] for v in out) == sorted(c["user"] for c in CLICKS)


def test_value_serde_can_be_given() -> None:
    pipeline = (
        _source()
        .map("m", lambda c: PageClick(user=c.user.upper(), url=c.url))
        .key_by("k", lambda c: c.user, value=PageClick)
        .sink(Collect(), step_id="out")
    )
    out = run_pipeline(pipeline).values("out")
    assert {c.user for c in out} == {"U0", "U1", "U2"}
    assert all(isinstance(c, PageClick) for c in out)
