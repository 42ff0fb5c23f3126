"""map, filter, flat_map, peek and key_by, run end to end on the memory backend."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Any

import pytest
from support.values import from_values, sorted_json

from connectors.memory import Collect
from pipelines import Pipeline
from pipelines.errors import PipelineDefinitionError
from pipelines.partitioner import partition_for
from pipelines.serde import Json
from pipelines.testing import run_pipeline

# -- map / filter / flat_map --------------------------------------------------------------------


def test_map_replaces_each_value_in_order() -> None:
    values = list(range(50))
    pipeline = from_values(values).map("square", lambda v: v * v).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == [v * v for v in values]


def test_map_can_change_the_type_of_values() -> None:
    pipeline = (
        from_values(["ann", "bob"])
        .map("wrap", lambda name: {"name": name, "length": len(name)})
        .map("describe", lambda d: f"{d['name']}:{d['length']}")
        .sink(Collect(), step_id="out")
    )
    assert run_pipeline(pipeline).values("out") == ["ann:3", "bob:3"]


def test_map_keeps_key_and_timestamp_of_each_record() -> None:
    values = [{"user": "ann", "at": 1_700_000_000_000}, {"user": "bob", "at": 1_700_000_001_000}]
    pipeline = (
        from_values(values, key=lambda v: v["user"], timestamp=lambda v: v["at"])
        .map("only-user", lambda v: v["user"].upper())
        .sink(Collect(), step_id="out")
    )
    records = run_pipeline(pipeline).records("out")
    assert [(r.key, r.value) for r in records] == [("ann", "ANN"), ("bob", "BOB")]
    assert [int(r.timestamp.timestamp() * 1000) for r in records] == [v["at"] for v in values]


def test_filter_keeps_values_whose_predicate_is_truthy() -> None:
    values = list(range(30))
    pipeline = (
        from_values(values)
        .filter("even", lambda v: v % 2 == 0)
        .filter("truthy", lambda v: v % 3)  # a non-bool result counts by truthiness
        .sink(Collect(), step_id="out")
    )
    assert run_pipeline(pipeline).values("out") == [v for v in values if v % 2 == 0 and v % 3]


def test_filter_that_keeps_nothing_gives_an_empty_sink() -> None:
    pipeline = from_values([1, 2, 3]).filter("none", lambda v: False).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == []


def test_flat_map_emits_zero_one_or_many_values_per_record() -> None:
    pipeline = (
        from_values([0, 1, 3, 0, 2])
        .flat_map("repeat", lambda n: [f"{n}.{i}" for i in range(n)])
        .sink(Collect(), step_id="out")
    )
    assert run_pipeline(pipeline).values("out") == ["1.0", "3.0", "3.1", "3.2", "2.0", "2.1"]


def test_flat_map_accepts_generators_and_keeps_the_key_of_the_input_record() -> None:
    def words(line: str) -> Any:
        yield from line.split()

    pipeline = (
        from_values(["a b", "", "c"], key=lambda line: f"line-{len(line)}")
        .flat_map("words", words)
        .sink(Collect(), step_id="out")
    )
    records = run_pipeline(pipeline).records("out")
    assert [(r.key, r.value) for r in records] == [
        ("line-3", "a"),
        ("line-3", "b"),
        ("line-1", "c"),
    ]


def test_flat_map_output_offsets_point_at_the_input_record() -> None:
    pipeline = from_values([2, 0, 1]).flat_map("n", range).sink(Collect(), step_id="out")
    records = run_pipeline(pipeline).records("out")
    assert [(r.offset, r.value) for r in records] == [(0, 0), (0, 1), (2, 0)]
    assert {r.topic for r in records} == {"in"}


# -- peek ------------------------------------------------------------------------------------------


def test_peek_calls_its_function_once_per_record_and_passes_records_unchanged() -> None:
    seen: list[Any] = []
    values = [{"n": i} for i in range(40)]
    pipeline = (
        from_values(values, partitions=3).peek("spy", seen.append).sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert Counter(sorted_json(v) for v in seen) == Counter(sorted_json(v) for v in values)
    assert sorted(result.values("out"), key=lambda v: v["n"]) == values


def test_peek_calls_each_record_exactly_once_also_when_other_records_fail() -> None:
    calls: Counter[int] = Counter()

    def spy(value: int) -> None:
        calls[value] += 1
        if value % 4 == 0:
            raise RuntimeError(f"cannot look at {value}")

    values = list(range(1, 21))
    pipeline = from_values(values).peek("spy", spy).sink(Collect(), step_id="out")
    result = run_pipeline(pipeline)

    assert calls == Counter(values)  # every value once: none skipped, none retried
    assert result.values("out") == [v for v in values if v % 4]
    assert [Json().deserialize(r.value) for r in result.dead_letters] == [4, 8, 12, 16, 20]


def test_peek_is_not_called_for_records_an_earlier_step_dropped() -> None:
    calls: Counter[int] = Counter()
    pipeline = (
        from_values(list(range(10)))
        .map("inverse", lambda v: 10 // v)  # 0 fails: dead-lettered before the peek
        .peek("spy", lambda v: calls.update([v]))
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert calls == Counter(10 // v for v in range(1, 10))
    assert len(result.dead_letters) == 1


# -- key_by ----------------------------------------------------------------------------------------

USERS = ["ann", "bob", "cid", "dee", "eve", "fay", "gus"]


def clicks(count: int) -> list[dict[str, Any]]:
    return [{"user": USERS[(i * 5) % len(USERS)], "seq": i} for i in range(count)]


def test_key_by_sets_the_key_of_each_record() -> None:
    values = clicks(30)
    pipeline = (
        from_values(values, partitions=2)
        .key_by("by-user", lambda c: c["user"])
        .sink(Collect(), step_id="out")
    )
    records = run_pipeline(pipeline).records("out")
    assert len(records) == len(values)
    assert all(r.key == r.value["user"] for r in records)
    assert {r.topic for r in records} == {"p.by-user"}


def test_key_by_puts_every_record_of_a_key_on_the_partition_kafka_would_choose() -> None:
    values = clicks(200)
    pipeline = (
        from_values(values, partitions=3)
        .key_by("by-user", lambda c: c["user"], partitions=5)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    repartitioned = result.topic("p.by-user")

    assert len(repartitioned) == len(values)
    partitions_of: dict[bytes, set[int]] = defaultdict(set)
    for record in repartitioned:
        assert record.key == Json().deserialize(record.value)["user"].encode()
        partitions_of[record.key].add(record.partition)  # type: ignore[arg-type]
    assert set(partitions_of) == {u.encode() for u in USERS}
    for key, partitions in partitions_of.items():
        assert partitions == {partition_for(key, 5)}, key
    assert len({p for ps in partitions_of.values() for p in ps}) > 1  # really spread out


def test_key_by_with_a_json_key_serde_accepts_non_str_keys() -> None:
    pipeline = (
        from_values(list(range(12)))
        .key_by("mod", lambda v: v % 3, key=Json(), partitions=2)
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert sorted((r.key, r.value) for r in result.records("out")) == sorted(
        (v % 3, v) for v in range(12)
    )
    for record in result.topic("p.mod"):
        assert record.partition == partition_for(record.key, 2)
    assert result.dead_letters == []


@pytest.mark.parametrize("workers", [1, 3])
def test_order_is_preserved_per_key_after_key_by(workers: int) -> None:
    values = clicks(1500)
    pipeline = (
        from_values(values, batch_size=64)  # one input partition: a total order to keep
        .key_by("by-user", lambda c: c["user"], partitions=4)
        .map("tag", lambda c: {**c, "tagged": True})
        .sink(Collect(), step_id="out")
    )
    out = run_pipeline(pipeline, workers=workers).values("out")

    assert len(out) == len(values)
    by_user: dict[str, list[int]] = defaultdict(list)
    for click in out:
        by_user[click["user"]].append(click["seq"])
    for user in USERS:
        expected = [c["seq"] for c in values if c["user"] == user]
        assert by_user[user] == expected, user


def _busy_pipeline() -> Pipeline:
    return (
        from_values(clicks(2000), partitions=4, batch_size=100)
        .filter("no-sevens", lambda c: c["seq"] % 7 != 0)
        .flat_map("twice-some", lambda c: [c, {**c, "copy": True}] if c["seq"] % 3 == 0 else [c])
        .key_by("by-user", lambda c: c["user"], partitions=3)
        .map("stamp", lambda c: {**c, "len": len(c["user"])})
        .sink(Collect(), step_id="out")
    )


def test_three_workers_give_the_same_multiset_of_outputs_as_one() -> None:
    one = run_pipeline(_busy_pipeline(), workers=1).values("out")
    three = run_pipeline(_busy_pipeline(), workers=3).values("out")

    expected: list[dict[str, Any]] = []
    for click in clicks(2000):
        if click["seq"] % 7 == 0:
            continue
        copies = [click, {**click, "copy": True}] if click["seq"] % 3 == 0 else [click]
        expected += [{**c, "len": len(c["user"])} for c in copies]
    assert Counter(map(sorted_json, one)) == Counter(map(sorted_json, expected))
    assert Counter(map(sorted_json, three)) == Counter(map(sorted_json, one))


# -- the package itself ----------------------------------------------------------------------------


def test_operators_package_can_be_imported_first() -> None:
    """``import operators`` in a fresh interpreter, before anything imported ``pipelines``."""
    done = subprocess.run(
        [sys.executable, "-c", "import operators; print(operators.Map.__name__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Map"


# -- what a user sees when a step function is wrong ------------------------------------------------


def price_of(order: dict[str, Any]) -> float:
    return float(order["price"])  # KeyError for an order without a price


def test_a_dead_letter_names_the_function_where_it_is_defined_and_the_line_that_raised() -> None:
    pipeline = from_values([{"price": "2.5"}, {"cost": 3}]).map("price", price_of)
    result = run_pipeline(pipeline.sink(Collect(), step_id="out"))
    assert result.values("out") == [2.5]
    (letter,) = result.dead_letters
    error = dict(letter.headers)["headwater.error"].decode()
    here = os.path.relpath(__file__)
    defined = price_of.__code__.co_firstlineno
    assert error == (
        f"price_of ({here}:{defined}) raised KeyError: 'price' at {here}:{defined + 1}"
    ), error


async def enrich_order(order: dict[str, Any]) -> dict[str, Any]:
    return order


class AsyncCallable:
    async def __call__(self, order: dict[str, Any]) -> dict[str, Any]:
        return order


async def split(order: dict[str, Any]) -> Any:
    yield order


@pytest.mark.parametrize(
    ("fn", "named"),
    [
        (enrich_order, "enrich_order ("),
        (functools.partial(enrich_order), "partial(enrich_order ("),
        (AsyncCallable(), "AsyncCallable object"),
        (split, "split ("),
    ],
    ids=["async def", "partial", "async __call__", "async generator"],
)
@pytest.mark.parametrize("method", ["key_by", "reduce"])
def test_an_async_function_is_refused_where_the_step_cannot_await_it(
    fn: Any, named: str, method: str
) -> None:
    """A coroutine function would be called without being awaited: its coroutines would be
    taken for keys or state. Refused when the step is declared (map, filter, flat_map and peek
    take one: tests/operators/test_async_steps.py)."""
    with pytest.raises(PipelineDefinitionError) as refused:
        getattr(from_values([1]), method)("step", fn)
    message = str(refused.value)
    assert named in message
    assert "is an async function" in message
    assert "plain def" in message


def test_plain_callables_are_accepted() -> None:
    pipeline = from_values(["a"]).map("len", len).map("str", str).map("upper", str.upper)
    assert run_pipeline(pipeline.sink(Collect(), step_id="out")).values("out") == ["1"]
