"""Operators declare their inputs and outputs (:class:`operators.Ports`), and the runtime runs
any operator by that declaration, never by its class:

- no module of ``pipelines/runtime/`` asks ``isinstance`` (or ``issubclass``) of a class it
  imports from the ``operators`` package, read with :mod:`ast`: a class imported by name, or
  reached through an imported ``operators`` module;
- operators of one's own, run end to end with ``Pipeline.apply`` on the memory backend: one
  with two outputs (each feeding a chain of its own, a rejected record dead-lettered with the
  step's id), one with two inputs and keyed state (told which input each batch came from);
- ``apply`` refuses an operator that does not fit where it is declared, naming the step, and a
  run whose operator returns fewer batches than it has outputs fails naming the step.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from support.source import parse
from support.values import from_values

from connectors.memory import Collect
from connectors.memory import Iterable as IterableSource
from operators import Operator, Ports
from pipelines import Batch, Pipeline, PipelineDefinitionError, StepError, Topic
from pipelines.serde import Json
from pipelines.testing import run_pipeline

RUNTIME = Path(__file__).resolve().parent.parent / "pipelines" / "runtime"

# -- the runtime never asks an operator's class --------------------------------------------------


def class_checks(source: str) -> list[str]:
    """The ``isinstance``/``issubclass`` calls of ``source`` whose classes name something it
    imports from the ``operators`` package, as ``line: call``."""
    tree = parse(source)
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "operators":
                imported.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "operators":
                    imported.add(alias.asname or "operators")
    return [
        f"{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and any(isinstance(n, ast.Name) and n.id in imported for n in ast.walk(node.args[1]))
    ]


def test_the_check_finds_a_class_of_operators_however_it_is_named() -> None:
    source = "\n".join(
        [
            "import operators",
            "import operators.joins as joins",
            "from operators.routing import Branch",
            "from operators.stateless import Map as M",
            "from pipelines.batch import Batch",
            "isinstance(op, Branch)",
            "isinstance(op, (int, joins.TableJoin))",
            "isinstance(op, M | str)",
            "issubclass(cls, operators.Operator)",
            "isinstance(batch, Batch)",
            "isinstance(op, int)",
        ]
    )
    assert [found.split(":")[0] for found in class_checks(source)] == ["6", "7", "8", "9"]


def test_the_runtime_never_asks_an_operator_its_class() -> None:
    modules = sorted(RUNTIME.glob("*.py"))
    assert RUNTIME / "task.py" in modules
    found = {path.name: checks for path in modules if (checks := class_checks(path.read_text()))}
    assert found == {}, (
        "the runtime runs an operator by its declared ports (operators.base.Ports), never by "
        f"its class: {found}"
    )


# -- operators of one's own ----------------------------------------------------------------------


class Triage(Operator):
    """Orders up to ``limit`` go on by ``ok``, larger ones by ``review``; an order without an
    amount is rejected."""

    ports = Ports(outputs=("ok", "review"))

    def __init__(self, step_id: str, limit: int = 100) -> None:
        super().__init__(step_id)
        self.limit = limit

    def process_ports(self, input: int, batch: Batch) -> tuple[Batch, Batch]:
        ok: list[int] = []
        review: list[int] = []
        for index, order in enumerate(batch.values):
            if "amount" not in order:
                error = StepError("no amount", step=self.step_id, source=batch.source_of(index))
                self.ctx.reject(batch, index, error)
                continue
            (ok if order["amount"] <= self.limit else review).append(index)
        return batch.take(ok), batch.take(review)


class Pair(Operator):
    """The first record of a key on each input, as ``[left, right]``, whichever comes first
    (the other waits in the step's keyed state)."""

    ports = Ports(inputs=("left", "right"))

    def process_ports(self, input: int, batch: Batch) -> tuple[Batch]:
        store = self.ctx.store
        pairs: list[list[Any]] = []
        kept: list[int] = []
        for index, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
            waiting = store.get(key)
            if waiting is None:
                store.put(key, [input, value])
            elif waiting[0] != input:
                store.delete(key)
                pairs.append([value, waiting[1]] if input == 0 else [waiting[1], value])
                kept.append(index)
        return (batch.take(kept).with_values(pairs),)


def test_an_operator_with_two_outputs_feeds_a_chain_from_each() -> None:
    orders = [{"id": n, "amount": n * 30} for n in range(8)] + [{"id": 99}]
    pipeline = (
        from_values(orders, partitions=2)
        .apply(
            "triage",
            lambda step_id: Triage(step_id, limit=100),
            then={
                "review": lambda review: review.map("flag", lambda o: o["id"]).sink(
                    Collect(), step_id="to-review"
                )
            },
        )
        .map("accept", lambda o: o["id"])
        .sink(Collect(), step_id="accepted")
    )
    assert pipeline.step("triage").outputs == ("ok", "review")
    assert pipeline.step("accept").inputs == (("triage", "ok"),)
    assert pipeline.step("flag").inputs == (("triage", "review"),)
    result = run_pipeline(pipeline)
    assert sorted(result.values("accepted")) == [0, 1, 2, 3]
    assert sorted(result.values("to-review")) == [4, 5, 6, 7]
    [dead] = result.dead_letters
    assert Json().deserialize(dead.value) == {"id": 99}
    assert dict(dead.headers)["headwater.step"] == b"triage"


@pytest.mark.parametrize("workers", [1, 2])
def test_an_operator_with_two_inputs_is_told_which_each_batch_came_from(workers: int) -> None:
    keys = [f"k{n}" for n in range(12)]
    lefts = from_values(
        [{"k": k, "side": "left"} for k in keys], topic="lefts", partitions=3
    ).key_by("lefts-by-k", lambda v: v["k"], partitions=3)
    rights = lefts.source(
        IterableSource([{"k": k, "side": "right"} for k in reversed(keys)]),
        into=Topic("rights", partitions=3),
    ).key_by("rights-by-k", lambda v: v["k"], partitions=3)
    pipeline = lefts.apply("pair", Pair, rights, stateful=True).sink(Collect(), step_id="pairs")
    result = run_pipeline(pipeline, workers=workers)
    pairs = sorted(result.values("pairs"), key=lambda pair: str(pair[0]["k"]))
    assert pairs == [[{"k": k, "side": "left"}, {"k": k, "side": "right"}] for k in sorted(keys)]


class Halves(Operator):
    """Declares two outputs but returns one batch: a mistake the run reports."""

    ports = Ports(outputs=("low", "high"))

    def process_ports(self, input: int, batch: Batch) -> tuple[Batch]:
        return (batch,)


def test_a_run_fails_naming_the_step_whose_operator_returns_too_few_batches() -> None:
    pipeline = from_values().apply("halves", Halves).sink(Collect())
    with pytest.raises(Exception, match=r"step 'halves'.*returned 1 batches for its 2 outputs"):
        run_pipeline(pipeline, timeout=30)


class OnlyProcess(Operator):
    """Declares two outputs, yet defines only ``process``."""

    ports = Ports(outputs=("a", "b"))

    def process(self, batch: Batch) -> Batch:
        return batch


def test_apply_refuses_what_does_not_fit_naming_the_step() -> None:
    chain = from_values()
    cases: list[tuple[Any, str]] = [
        (lambda: chain.apply("pair", Pair), r"inputs \['left', 'right'\].*1 more, got 1"),
        (lambda: chain.apply("t", Triage, then={"rest": lambda p: p}), r"names \['rest'\]"),
        (lambda: chain.apply("t", Triage, then={"ok": lambda p: p}), r"names \['ok'\]"),
        (lambda: chain.apply("o", OnlyProcess), "so it must define process_ports"),
        (lambda: chain.apply("n", lambda step_id: 3), "subclass of operators.Operator"),
        (lambda: chain.apply("w", lambda step_id: Triage("other")), "operator 'other'"),
        (
            lambda: chain.apply("t", Triage, then={"review": lambda p: chain}),
            "then= must return the pipeline it was given",
        ),
        (
            lambda: chain.apply(
                "pair", Pair, Pipeline("q").source(IterableSource([]), into=Topic("x"))
            ),
            "cannot apply a chain of pipeline 'q'",
        ),
    ]
    for declare, message in cases:
        with pytest.raises(PipelineDefinitionError, match=message) as caught:
            declare()
        assert caught.value.step in ("pair", "t", "o", "n", "w")


def test_ports_are_distinct_names() -> None:
    for bad in [(), ("a", "a"), ("",), ["a"]]:
        with pytest.raises(ValueError, match="distinct non-empty names"):
            Ports(outputs=bad)  # type: ignore[arg-type]
    assert Ports().single
    assert not Ports(inputs=("a", "b")).single
