"""``key_by(..., salt=N)``: a salted aggregation ends with the result of the unsalted one and of a
plain-Python reference from the input alone, for Count, Sum and Mean (one worker and three);
steps that cannot merge partial results are refused where they are declared; and
``headwater run`` on the embedded log writes the same totals."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.cli import headwater

import connectors
from operators.aggregations import Aggregation, Collect, Count, Mean, Sum
from operators.salted import SaltedKey, salt_of
from operators.windows import Tumbling
from pipelines import Pipeline, Topic
from pipelines.errors import PipelineDefinitionError
from pipelines.serde import Str
from pipelines.testing import run_pipeline

Order = dict[str, Any]


def amount(order: Order) -> int:
    return int(order["amount"])


AGGREGATIONS: dict[str, Callable[[], Aggregation | dict[str, Aggregation]]] = {
    "count": Count,
    "sum": lambda: Sum(amount),
    "mean": lambda: Mean(amount),
    "all": lambda: {"n": Count(), "total": Sum(amount), "mean": Mean(amount)},
}


def expected_results(orders: list[Order], kind: str) -> dict[str, Any]:
    """Each customer's result, computed from the input alone."""
    amounts: dict[str, list[int]] = defaultdict(list)
    for order in orders:
        amounts[order["customer"]].append(order["amount"])
    results = {
        "count": {c: len(a) for c, a in amounts.items()},
        "sum": {c: sum(a) for c, a in amounts.items()},
        "mean": {c: sum(a) / len(a) for c, a in amounts.items()},
    }
    if kind != "all":
        return results[kind]
    return {
        c: {"n": results["count"][c], "total": results["sum"][c], "mean": results["mean"][c]}
        for c in amounts
    }


def last_results(orders: list[Order], kind: str, salt: int | None, workers: int) -> dict[str, Any]:
    """The last result of each customer as the pipeline emits it."""
    pipeline = (
        Pipeline("salted")
        .source(connectors.Iterable(orders), into=Topic("orders", partitions=3))
        .key_by("by-customer", lambda o: o["customer"], salt=salt, partitions=4)
        .aggregate("totals", AGGREGATIONS[kind]())
        .sink(connectors.Collect(), step_id="out")
    )
    last = {}
    for record in run_pipeline(pipeline, workers=workers).records("out"):
        last[record.key] = record.value
    return last


orders_strategy = st.lists(
    st.fixed_dictionaries(
        {
            # one customer is hot: most orders are its
            "customer": st.sampled_from(["hot"] * 6 + ["c1", "c2", "c3"]),
            "amount": st.integers(-50, 1000),
        }
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=12, deadline=None)
@given(
    orders=orders_strategy,
    kind=st.sampled_from(sorted(AGGREGATIONS)),
    salt=st.integers(2, 8),
    workers=st.sampled_from([1, 3]),
)
def test_a_salted_aggregation_ends_with_the_unsalted_result(
    orders: list[Order], kind: str, salt: int, workers: int
) -> None:
    expected = expected_results(orders, kind)
    assert last_results(orders, kind, None, workers) == expected
    assert last_results(orders, kind, salt, workers) == expected


def test_the_partial_step_emits_once_per_sub_key_and_batch() -> None:
    orders = [{"customer": "hot", "amount": 1} for _ in range(1000)]
    pipeline = (
        Pipeline("salted")
        .source(connectors.Iterable(orders), into=Topic("orders", partitions=1))
        .key_by("by-customer", lambda o: o["customer"], salt=4, partitions=4)
        .count("n")
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline, inspect=["n.partials"])
    partials = result.inspect("n.partials")
    assert {record.key for record in partials} == {("hot", salt) for salt in range(4)}
    assert len(partials) < 100  # not one per record
    assert result.records("out")[-1].value == 1000
    assert result.records("out")[-1].key == "hot"


def test_salts_spread_offsets_at_any_stride() -> None:
    for stride in (1, 2, 4, 8):
        salts = [salt_of(offset, 4) for offset in range(0, 4000 * stride, stride)]
        assert all(800 < salts.count(salt) < 1200 for salt in range(4)), stride


def test_a_salted_key_keeps_its_key_bytes_then_the_salt() -> None:
    serde = SaltedKey(Str())
    assert serde.serialize(("c1", 3)) == b"c1\x03"
    assert serde.deserialize(b"c1\x03") == ("c1", 3)


def salted_by_customer(salt: object = 4) -> Pipeline:
    return (
        Pipeline("refused")
        .source(connectors.Iterable([]), into=Topic("orders", partitions=2))
        .key_by("by-customer", lambda o: o["customer"], salt=salt)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("build", "needles"),
    [
        (lambda p: p.reduce("r", lambda a, b: a), ["Reduce cannot merge", "'r'"]),
        (lambda p: p.aggregate("c", Collect()), ["Collect cannot merge"]),
        (lambda p: p.aggregate("f", initial=0, fold=lambda a, v: a + 1), ["Fold cannot merge"]),
        (lambda p: p.count("n", ttl=timedelta(minutes=1)), ["ttl= is not supported"]),
        (lambda p: p.window("w", Tumbling(minutes=1)), ["window 'w' cannot"]),
        (lambda p: p.dedupe("d", timedelta(minutes=1)), ["operator 'd' cannot"]),
        (lambda p: p.map("m", lambda v: v), ["operator 'm' cannot"]),
        (lambda p: p.sink(connectors.Collect(), step_id="s"), ["sink 's' cannot"]),
        (lambda p: p.merge("both", p), ["merge 'both' cannot"]),
        (
            lambda p: p.join_table("j", Topic("customers", partitions=2), lambda o, c: o),
            ["join 'j' cannot"],
        ),
    ],
)
def test_what_cannot_merge_partials_is_refused_after_salt(
    build: Callable[[Pipeline], Pipeline], needles: list[str]
) -> None:
    with pytest.raises(PipelineDefinitionError) as raised:
        build(salted_by_customer())
    for needle in [*needles, "salt"]:
        assert needle in str(raised.value)


def test_a_fold_with_a_merge_may_follow_salt() -> None:
    chain = salted_by_customer().aggregate(
        "f", initial=0, fold=lambda a, v: a + 1, merge=lambda a, b: a + b
    )
    assert [s.step_id for s in chain.steps][-3:] == ["f.partials", "f.by-key", "f"]


@pytest.mark.parametrize("salt", [0, 1, 257, 2.5, True])
def test_a_salt_must_be_a_number_of_sub_keys(salt: object) -> None:
    with pytest.raises(PipelineDefinitionError, match="salt must be a whole number"):
        salted_by_customer(salt)


MODULE = """
import connectors
from operators.aggregations import Count, Sum
from pipelines import Pipeline, Topic

orders = [
    {"customer": "hot" if i % 4 else f"c{i % 7}", "amount": i % 13} for i in range(20000)
]

pipeline = (
    Pipeline("salted-run")
    .source(connectors.Iterable(orders), into=Topic("orders", partitions=2))
    .key_by("by-customer", lambda o: o["customer"], salt=4, partitions=4)
    .aggregate("totals", {"n": Count(), "total": Sum(lambda o: o["amount"])})
    .sink(connectors.JsonLinesSink("out/totals.jsonl", shape="record"), step_id="file")
)
"""


def test_headwater_run_on_the_embedded_log(tmp_path: Path) -> None:
    (tmp_path / "salted.py").write_text(textwrap.dedent(MODULE))
    done = headwater("run", "salted.py", "--workers", "2", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "totals.partials" in done.stderr and "totals.by-key" in done.stderr
    last = {}
    for line in (tmp_path / "out" / "totals.jsonl").read_bytes().splitlines():
        row = orjson.loads(line)
        last[row["key"]] = row["value"]
    orders = [{"customer": "hot" if i % 4 else f"c{i % 7}", "amount": i % 13} for i in range(20000)]
    expected: dict[str, dict[str, int]] = {}
    for order in orders:
        into = expected.setdefault(order["customer"], {"n": 0, "total": 0})
        into["n"] += 1
        into["total"] += order["amount"]
    assert last == expected
