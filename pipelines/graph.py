"""A pipeline's graph drawn as SVG, for notebooks: no graphviz or browser library needed.

Steps are boxes, topics are rounded boxes between them, and the sub-topologies (the steps one
task runs, see :mod:`pipelines.runtime.topology`) are shaded areas labelled with their number
and partition count. Layout is the simplest that reads well for stream graphs: left to right
in columns by the longest path from a source, each column ordered by where its inputs are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape

from pipelines.errors import PipelineDefinitionError
from pipelines.pipeline import Pipeline
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.steps import (
    KeyByStep,
    Port,
    ReadStep,
    SinkStep,
    SourceStep,
    StatefulStep,
    Step,
    StreamJoinStep,
    TableJoinStep,
    WindowedAggregateStep,
    WriteStep,
)
from pipelines.topic import Topic

__all__ = ["Graph", "graph_of", "svg"]

_CHAR = 7.3  # px per character of the 12px monospace font
_PAD = 10.0
_HEIGHT = 38.0
_ROW = 58.0
_GAP = 46.0
_MARGIN = 16.0


@dataclass(slots=True)
class Node:
    """A box: a step (``kind`` is its kind) or a topic (``kind`` is ``"topic"``)."""

    key: str
    label: str
    detail: str
    kind: str
    sub: int | None = None
    column: int = 0
    x: float = 0.0
    y: float = 0.0

    @property
    def width(self) -> float:
        return max(len(self.label), len(self.detail)) * _CHAR + 2 * _PAD


@dataclass(slots=True)
class Graph:
    """Boxes and arrows of one pipeline, before layout."""

    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    partitions: dict[int, int] = field(default_factory=dict)
    """Per sub-topology: its partitions (so its tasks)."""

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.key, node)
        return node.key

    def link(self, start: str, end: str) -> None:
        if (start, end) not in self.edges:
            self.edges.append((start, end))


def _detail(step: Step) -> str:
    """The step's kind, and its connector or what else its class says about it."""
    match step:
        case SourceStep(source=connector) | SinkStep(sink=connector):
            return f"{step.kind}: {type(connector).__name__}"
        case StatefulStep():
            traits: tuple[str, ...] = ("stateful",)
        case WindowedAggregateStep():
            traits = ("stateful", "windowed")
        case TableJoinStep():
            traits = ("table join",)
        case StreamJoinStep():
            traits = ("stateful", "stream join")
        case _:
            traits = ()
    return ", ".join([step.kind, *traits])


def graph_of(topology: Topology) -> Graph:
    """The boxes and arrows of ``topology``'s pipeline, laid out."""
    graph = Graph()
    home = {s.step_id: sub.index for sub in topology.subtopologies for s in sub.steps}
    for sub in topology.subtopologies:
        if sub.topics:
            graph.partitions[sub.index] = sub.partitions

    def topic_node(topic: Topic) -> str:
        return graph.add(
            Node(f"topic:{topic.name}", topic.name, f"{topic.partitions} partitions", "topic")
        )

    def output_of(port: Port) -> str:
        upstream = topology.pipeline.step(port[0])
        if isinstance(upstream, SourceStep | KeyByStep):  # read downstream from their topic
            return topic_node(upstream.topic)
        return f"step:{upstream.step_id}"

    for step in topology.pipeline.steps:
        task = None if isinstance(step, SourceStep) else home.get(step.step_id)  # the runner's
        key = graph.add(Node(f"step:{step.step_id}", step.step_id, _detail(step), step.kind, task))
        if isinstance(step, ReadStep):
            graph.link(topic_node(step.topic), key)
        for port in step.inputs:
            graph.link(output_of(port), key)
        if isinstance(step, SourceStep | KeyByStep | WriteStep):
            graph.link(key, topic_node(step.topic))
    _layout(graph)
    return graph


def _layout(graph: Graph) -> None:
    """Columns by longest path from a root; rows ordered by the mean row of the inputs."""
    inputs: dict[str, list[str]] = defaultdict(list)
    for start, end in graph.edges:
        inputs[end].append(start)
    for _ in graph.nodes:  # longest path by relaxation; the graph is acyclic
        changed = False
        for start, end in graph.edges:
            wanted = graph.nodes[start].column + 1
            if graph.nodes[end].column < wanted:
                graph.nodes[end].column = wanted
                changed = True
        if not changed:
            break
    columns: dict[int, list[Node]] = defaultdict(list)
    for node in graph.nodes.values():
        columns[node.column].append(node)
    x = _MARGIN
    for column in sorted(columns):
        nodes = columns[column]
        if column:
            nodes.sort(key=lambda n: _mean(graph.nodes[i].y for i in inputs[n.key]))
        for row, node in enumerate(nodes):
            node.x, node.y = x, _MARGIN + 18 + row * _ROW
        x += max(n.width for n in nodes) + _GAP


def _mean(values: Iterable[float]) -> float:
    found = list(values)
    return sum(found) / len(found) if found else 0.0


def svg(pipeline: Pipeline) -> str:
    """``pipeline``'s graph as an SVG document (a string to show inline in HTML)."""
    try:
        graph = graph_of(compile_pipeline(pipeline))
    except PipelineDefinitionError as error:
        return f"<p>(no graph: {escape(str(error))})</p>"
    nodes = graph.nodes.values()
    width = max(n.x + n.width for n in nodes) + _MARGIN
    height = max(n.y + _HEIGHT for n in nodes) + _MARGIN
    parts = [*_areas(graph), *(_arrow(graph, s, e) for s, e in graph.edges)]
    parts += [_box(n) for n in nodes]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="12">'
        '<defs><marker id="hw-arrow" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        '<path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>'
        f"{''.join(parts)}</svg>"
    )


_FILL = {"topic": "#fff4d6", "source": "#dff0d8", "sink": "#d9e8f6", "key_by": "#f2e1f7"}


def _box(node: Node) -> str:
    radius = 14 if node.kind == "topic" else 3
    fill = _FILL.get(node.kind, "#ffffff")
    middle = node.x + node.width / 2
    return (
        f"<g><title>{escape(node.key)}</title>"
        f'<rect x="{node.x:.1f}" y="{node.y:.1f}" width="{node.width:.1f}" height="{_HEIGHT}" '
        f'rx="{radius}" fill="{fill}" stroke="#555"/>'
        f'<text x="{middle:.1f}" y="{node.y + 16:.1f}" text-anchor="middle" '
        f'font-weight="bold">{escape(node.label)}</text>'
        f'<text x="{middle:.1f}" y="{node.y + 30:.1f}" text-anchor="middle" fill="#666" '
        f'font-size="10">{escape(node.detail)}</text></g>'
    )


def _arrow(graph: Graph, start: str, end: str) -> str:
    a, b = graph.nodes[start], graph.nodes[end]
    x1, y1 = a.x + a.width, a.y + _HEIGHT / 2
    x2, y2 = b.x, b.y + _HEIGHT / 2
    bend = max((x2 - x1) / 2, 20.0)
    return (
        f'<path d="M {x1:.1f} {y1:.1f} C {x1 + bend:.1f} {y1:.1f}, {x2 - bend:.1f} {y2:.1f}, '
        f'{x2:.1f} {y2:.1f}" fill="none" stroke="#555" marker-end="url(#hw-arrow)"/>'
    )


def _areas(graph: Graph) -> list[str]:
    """A shaded area behind each sub-topology's steps, labelled with its tasks."""
    members: dict[int, list[Node]] = defaultdict(list)
    for node in graph.nodes.values():
        if node.sub is not None:
            members[node.sub].append(node)
    areas = []
    for sub, nodes in sorted(members.items()):
        left = min(n.x for n in nodes) - 6
        top = min(n.y for n in nodes) - 18
        right = max(n.x + n.width for n in nodes) + 6
        bottom = max(n.y for n in nodes) + _HEIGHT + 6
        tasks = graph.partitions.get(sub)
        label = f"sub-topology {sub}" + (f" · {tasks} tasks" if tasks else "")
        areas.append(
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
            f'height="{bottom - top:.1f}" rx="6" fill="#f3f3f3" stroke="#ccc" '
            'stroke-dasharray="4 3"/>'
            f'<text x="{left + 6:.1f}" y="{top + 12:.1f}" fill="#888" font-size="10">'
            f"{escape(label)}</text>"
        )
    return areas
