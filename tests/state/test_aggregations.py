"""Keyed (non-windowed) aggregations against running references computed in plain Python:
every record emits its key's new result, in the key's order; records without a key and folds
that raise go to the dead letters; the state survives a restart on the embedded log."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import connectors
from operators.aggregations import Count, Max, Sum
from pipelines import Pipeline, Topic
from pipelines.log import EmbeddedLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.testing import TestResult, run_pipeline

USERS = [f"u{n}" for n in range(13)]


def user_events(seed: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"i": i, "user": rng.choice(USERS), "x": rng.randint(-500, 500)} for i in range(count)]


def keyed_by_user(events: list[dict[str, Any]], partitions: int = 3) -> Pipeline:
    source = connectors.Iterable(events, key=lambda v: v["user"])
    return Pipeline("aggs").source(source, into=Topic("events", partitions=partitions))


def per_key(result: TestResult, sink: str = "out") -> dict[Any, list[Any]]:
    """What the sink got for each key, in order."""
    seen: dict[Any, list[Any]] = defaultdict(list)
    for record in result.records(sink):
        seen[record.key].append(record.value)
    return dict(seen)


def running(
    events: list[dict[str, Any]], step: Callable[[list[dict[str, Any]]], Any]
) -> dict[str, list[Any]]:
    """For each key, ``step`` of its records so far, after each of them."""
    so_far: dict[str, list[dict[str, Any]]] = defaultdict(list)
    out: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        so_far[event["user"]].append(event)
        out[event["user"]].append(step(so_far[event["user"]]))
    return dict(out)


def xs(records: list[dict[str, Any]]) -> list[int]:
    return [r["x"] for r in records]


CASES: dict[str, tuple[Callable[[Pipeline], Pipeline], Callable[[list[dict[str, Any]]], Any]]] = {
    "count": (lambda p: p.count("agg"), len),
    "sum": (lambda p: p.sum("agg", lambda v: v["x"]), lambda rs: sum(xs(rs))),
    "min": (lambda p: p.min("agg", lambda v: v["x"]), lambda rs: min(xs(rs))),
    "max": (lambda p: p.max("agg", lambda v: v["x"]), lambda rs: max(xs(rs))),
    "mean": (lambda p: p.mean("agg", lambda v: v["x"]), lambda rs: sum(xs(rs)) / len(rs)),
    "collect": (
        lambda p: p.collect("agg", lambda v: v["i"], limit=4),
        lambda rs: [r["i"] for r in rs][-4:],
    ),
    "collect-all": (
        lambda p: p.collect("agg", lambda v: v["i"]),
        lambda rs: [r["i"] for r in rs],
    ),
    "reduce": (
        # not commutative: the order of each key's records matters
        lambda p: p.map("text", lambda v: str(v["i"])).reduce("agg", lambda a, b: f"{a},{b}"),
        lambda rs: ",".join(str(r["i"]) for r in rs),
    ),
    "dict": (
        lambda p: p.aggregate(
            "agg", {"n": Count(), "total": Sum(lambda v: v["x"]), "top": Max(lambda v: v["x"])}
        ),
        lambda rs: {"n": len(rs), "total": sum(xs(rs)), "top": max(xs(rs))},
    ),
    "fold": (
        lambda p: p.aggregate(
            "agg",
            initial=lambda: {"n": 0, "odd": []},
            fold=lambda acc, v: {
                "n": acc["n"] + 1,
                "odd": acc["odd"] + [v["i"]] if v["x"] % 2 else acc["odd"],
            },
        ),
        lambda rs: {"n": len(rs), "odd": [r["i"] for r in rs if r["x"] % 2]},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_record_emits_its_keys_running_result(case: str) -> None:
    build, reference = CASES[case]
    events = user_events(seed=len(case), count=3000)
    result = run_pipeline(build(keyed_by_user(events)).sink(connectors.Collect(), step_id="out"))
    assert per_key(result) == running(events, reference)
    assert result.dead_letters == []


def test_a_key_by_before_the_aggregation_and_two_workers_give_the_same_totals() -> None:
    events = user_events(seed=99, count=4000)

    def pipeline() -> Pipeline:
        return (
            Pipeline("aggs")
            .source(connectors.Iterable(events), into=Topic("events", partitions=3))
            .key_by("by-user", lambda v: v["user"], partitions=4)
            .aggregate("agg", {"n": Count(), "total": Sum(lambda v: v["x"])})
            .sink(connectors.Collect(), step_id="out")
        )

    expected = {user: {"n": len(rs), "total": sum(xs(rs))} for user, rs in _group(events).items()}
    for workers in (1, 2):
        result = run_pipeline(pipeline(), workers=workers)
        outputs = per_key(result)
        assert len(result.values("out")) == len(events)
        # records of one key reach the aggregation in no fixed order: the last result per key
        # is the total, and the counts go up one by one
        assert {user: values[-1] for user, values in outputs.items()} == expected
        for values in outputs.values():
            assert [v["n"] for v in values] == list(range(1, len(values) + 1))


def _group(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        groups[event["user"]].append(event)
    return dict(groups)


def test_records_without_a_key_go_to_the_dead_letters() -> None:
    events = user_events(seed=4, count=500)
    for event in events[::7]:
        del event["user"]
    source = connectors.Iterable(events, key=lambda v: v.get("user"))
    pipeline = (
        Pipeline("aggs")
        .source(source, into=Topic("events", partitions=2))
        .count("per-user")
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)

    keyed_events = [e for e in events if "user" in e]
    assert per_key(result) == running(keyed_events, len)
    dead = result.dead_letters
    assert sorted(orjson.loads(r.value)["i"] for r in dead) == [e["i"] for e in events[::7]]
    for record in dead:
        headers = dict(record.headers)
        assert headers["headwater.step"] == b"per-user"
        assert b"key" in headers["headwater.error"]


def test_a_fold_that_raises_sends_the_record_to_the_dead_letters_naming_the_step() -> None:
    events = user_events(seed=5, count=600)
    for event in events[3::10]:
        event["x"] = "not a number"
    pipeline = (
        keyed_by_user(events)
        .aggregate("totals", initial=0, fold=lambda acc, v: acc + v["x"])
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)

    good = [e for e in events if isinstance(e["x"], int)]
    assert per_key(result) == running(good, lambda rs: sum(xs(rs)))
    dead = result.dead_letters
    assert [
        orjson.loads(r.value) for r in sorted(dead, key=lambda r: orjson.loads(r.value)["i"])
    ] == [e for e in events if not isinstance(e["x"], int)]
    for record in dead:
        headers = dict(record.headers)
        assert headers["headwater.step"] == b"totals"
        assert headers["headwater.error.type"] == b"TypeError"
        assert b"TypeError" in headers["headwater.error"]
        assert headers["headwater.source.topic"] == b"events"


# -- state survives a restart --------------------------------------------------------------------


def _append_events(path: Path, events: list[dict[str, Any]]) -> None:
    with path.open("ab") as lines:
        for event in events:
            lines.write(orjson.dumps(event) + b"\n")


def _restartable(path: Path, sink: connectors.Collect) -> Pipeline:
    return (
        Pipeline("restart")
        .source(connectors.JsonLines(path), into=Topic("events", partitions=3))
        .key_by("by-user", lambda v: v["user"], partitions=2)
        .aggregate("stats", {"n": Count(), "total": Sum(lambda v: v["x"])})
        .sink(sink, step_id="out")
    )


async def _run_embedded(data_dir: Path, path: Path) -> dict[str, list[Any]]:
    sink = connectors.Collect()
    log = EmbeddedLog(data_dir)
    try:
        await run_in_process(compile_pipeline(_restartable(path, sink)), log)
    finally:
        await log.close()
    outputs: dict[str, list[Any]] = defaultdict(list)
    for key, value in zip(sink.keys, sink.values, strict=True):
        outputs[key].append(value)
    return dict(outputs)


async def test_a_second_run_on_the_same_log_continues_the_aggregates(tmp_path: Path) -> None:
    events = user_events(seed=8, count=5000)
    first, second = events[:3000], events[3000:]
    path = tmp_path / "input.jsonl"
    data_dir = tmp_path / "data"

    _append_events(path, first)
    before = await _run_embedded(data_dir, path)
    totals = {u: {"n": len(rs), "total": sum(xs(rs))} for u, rs in _group(first).items()}
    assert {user: values[-1] for user, values in before.items()} == totals
    assert sum(len(values) for values in before.values()) == len(first)

    _append_events(path, second)
    after = await _run_embedded(data_dir, path)
    # only the new lines are read again, and each key's count goes on from where it stopped
    assert sum(len(values) for values in after.values()) == len(second)
    everything = {u: {"n": len(rs), "total": sum(xs(rs))} for u, rs in _group(events).items()}
    assert {user: values[-1] for user, values in after.items()} == {
        user: everything[user] for user in _group(second)
    }
    for user, values in after.items():
        start = totals.get(user, {"n": 0})["n"]
        assert [v["n"] for v in values] == list(range(start + 1, start + len(values) + 1))
