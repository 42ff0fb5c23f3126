"""A pipeline's graph as SVG (``pipelines.graph``): one box per step and topic, an arrow per
link, and the sub-topologies with their tasks, for notebooks."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import timedelta

from connectors.memory import Collect, Iterable
from operators.windows import Tumbling
from pipelines import Pipeline, Topic
from pipelines.graph import graph_of, svg
from pipelines.runtime.topology import compile_pipeline

SVG = "{http://www.w3.org/2000/svg}"


def keyed_window() -> Pipeline:
    """source -> filter -> key_by (a repartition topic) -> window count -> two sinks."""
    counted = (
        Pipeline("g")
        .source(Iterable([{"user": "a"}]), into=Topic("clicks", partitions=3), step_id="read")
        .filter("valid", lambda v: "user" in v)
        .key_by("by-user", lambda v: v["user"], partitions=4)
        .window("minutes", Tumbling(timedelta(minutes=1)))
        .count("count")
    )
    rest = counted.branch(
        "big", lambda v: v > 10, lambda big: big.sink(Collect(), step_id="alerts")
    )
    return rest.sink(Collect(), step_id="out")


def test_every_step_and_topic_is_a_box_and_every_link_an_arrow() -> None:
    pipeline = keyed_window()
    graph = graph_of(compile_pipeline(pipeline))
    steps = {n.label for n in graph.nodes.values() if n.kind != "topic"}
    topics = {n.label: n.detail for n in graph.nodes.values() if n.kind == "topic"}
    assert steps == {s.step_id for s in pipeline.steps}
    assert topics == {"clicks": "3 partitions", "g.by-user": "4 partitions"}
    labels = {(graph.nodes[a].label, graph.nodes[b].label) for a, b in graph.edges}
    assert {("read", "clicks"), ("clicks", "valid"), ("valid", "by-user")} <= labels
    assert {("by-user", "g.by-user"), ("g.by-user", "minutes"), ("big", "alerts")} <= labels
    assert ("by-user", "minutes") not in labels  # the window reads the topic, not the step

    document = ET.fromstring(svg(pipeline))
    assert document.tag == f"{SVG}svg"
    texts = [t.text for t in document.iter(f"{SVG}text")]
    assert steps | set(topics) <= set(texts)
    arrows = [p for p in document.iter(f"{SVG}path") if p.get("marker-end")]
    assert len(arrows) == len(graph.edges)


def test_sub_topologies_are_drawn_with_their_tasks_and_flow_left_to_right() -> None:
    pipeline = keyed_window()
    graph = graph_of(compile_pipeline(pipeline))
    assert graph.partitions == {0: 3, 1: 4}
    texts = [t.text for t in ET.fromstring(svg(pipeline)).iter(f"{SVG}text")]
    assert "sub-topology 0 · 3 tasks" in texts
    assert "sub-topology 1 · 4 tasks" in texts
    x = {n.label: n.x for n in graph.nodes.values()}
    assert x["read"] < x["clicks"] < x["valid"] < x["by-user"] < x["g.by-user"] < x["minutes"]
    assert x["count"] < x["big"] < x["alerts"]
    assert x["big"] < x["out"]


def test_a_pipeline_shows_its_graph_in_a_notebook() -> None:
    html = keyed_window()._repr_html_()
    assert "<svg" in html
    assert ">by-user<" in html


def test_a_pipeline_that_does_not_compile_says_why_instead_of_a_graph() -> None:
    html = Pipeline("empty")._repr_html_()
    assert "no graph" in html
    assert "no source" in html
