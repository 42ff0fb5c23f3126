"""Dedupe against a plain-Python reference: a record is dropped when a record of its key that
passed before it is at most ``within`` earlier in event time; once the horizon has passed the
key passes again. Event times arrive out of order."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import timedelta
from typing import Any

import orjson
import pytest

import connectors
from operators.stateful import Dedupe
from pipelines import Pipeline, Topic
from pipelines.batch import Batch
from pipelines.log.base import FetchedBatch, RawBatch
from pipelines.state.store import KeyValueStore
from pipelines.testing import TestResult, run_pipeline

HORIZON = 1000
SPREAD = 50  # the records of one burst lie within this many ms
DELAY = 300  # the most a record arrives behind the newest event time seen


def ms(millis: int) -> timedelta:
    return timedelta(milliseconds=millis)


def generate(seed: int, keys: list[str], bursts: int) -> list[dict[str, Any]]:
    """Records in arrival order. Each key sends bursts of records (repeats, within ``SPREAD``
    ms); a burst either comes well within the horizon of the last burst that passed (all
    duplicates) or well after it (passes again). Each record arrives up to ``DELAY`` ms late,
    so records of one key and of different keys come out of order."""
    rng = random.Random(seed)
    timed: list[tuple[int, dict[str, Any]]] = []
    for key in keys:
        passed = rng.randint(0, 3000)
        start = passed
        for _ in range(bursts):
            for _ in range(rng.randint(1, 4)):
                t = start + rng.randint(0, SPREAD - 1)
                timed.append((t + rng.randint(0, DELAY), {"k": key, "t": t}))
            if rng.random() < 0.5:  # the next burst duplicates the one that passed
                start = passed + rng.randint(100, HORIZON - DELAY - 2 * SPREAD)
            else:
                passed = start = passed + HORIZON + 2 * SPREAD + rng.randint(0, 2000)
    timed.sort(key=lambda pair: pair[0])
    return [{"i": i, **event} for i, (_, event) in enumerate(timed)]


def reference(events: list[dict[str, Any]], *, forget: bool) -> list[int]:
    """The ids that pass. A key remembers the event time of its last record that passed; a
    record is dropped when it is 0 to ``HORIZON`` ms after it. With ``forget`` a key is
    forgotten as soon as the newest event time seen is past that time plus the horizon."""
    last: dict[str, int] = {}
    newest: int | None = None
    passed = []
    for event in events:
        key, t = event["k"], event["t"]
        if forget and newest is not None:
            last = {k: s for k, s in last.items() if s >= newest - HORIZON}
        seen = last.get(key)
        if seen is None or not 0 <= t - seen < HORIZON:
            passed.append(event["i"])
            last[key] = t
        newest = t if newest is None else max(newest, t)
    return passed


def passed_ids(result: TestResult) -> list[int]:
    return sorted(v["i"] for v in result.values("out"))


def test_dedupe_by_the_record_key_equals_the_reference() -> None:
    events = generate(seed=1, keys=[f"d{n}" for n in range(20)], bursts=40)
    expected = reference(events, forget=False)
    # the generated stream never has a record whose fate depends on when keys are forgotten
    assert reference(events, forget=True) == expected
    assert len(events) / 4 < len(expected) < len(events) * 3 / 4

    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("dd")
        .source(source, into=Topic("events", partitions=3))
        .dedupe("dedupe", within=ms(HORIZON))
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert passed_ids(result) == sorted(expected)
    # records pass unchanged, with their keys and event times, each key in its order
    by_id = {e["i"]: e for e in events}
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in result.records("out"):
        assert record.value == by_id[record.value["i"]]
        assert record.key == record.value["k"]
        assert record.timestamp.timestamp() * 1000 == pytest.approx(record.value["t"])
        per_key[record.key].append(record.value["i"])
    assert all(ids == sorted(ids) for ids in per_key.values())


def test_dedupe_by_a_key_function_equals_the_reference() -> None:
    # messages are sent again under their id; the record key (the sender) plays no part
    events = generate(seed=2, keys=[f"m{n}" for n in range(30)], bursts=25)
    rng = random.Random(3)
    for event in events:
        event["sender"] = rng.choice(["ann", "bob", "cy"])
    expected = reference(events, forget=False)
    assert reference(events, forget=True) == expected

    source = connectors.Iterable(events, key=lambda v: v["sender"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("dd")
        .source(source, into=Topic("events", partitions=1))
        .dedupe("dedupe", within=ms(HORIZON), key=lambda v: v["k"])
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert passed_ids(result) == sorted(expected)
    assert {r.key for r in result.records("out")} <= {e["k"] for e in events}


def run_dedupe(times: list[tuple[str, int]], within: timedelta) -> list[tuple[str, int]]:
    events = [{"k": k, "t": t} for k, t in times]
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("dd")
        .source(source, into=Topic("events"))
        .dedupe("dedupe", within=within)
        .sink(connectors.Collect(), step_id="out")
    )
    return [(v["k"], v["t"]) for v in run_pipeline(pipeline).values("out")]


def test_a_key_passes_again_once_the_horizon_has_passed() -> None:
    times = [
        ("a", 0),
        ("a", 500),  # duplicate
        ("b", 600),
        ("a", 999),  # duplicate: 999 ms after the one that passed
        ("a", 1000),  # the horizon has passed: passes, and starts a new one
        ("a", 1500),  # duplicate of 1000
        ("b", 1500),  # 900 ms after b's: duplicate
        ("a", 2000),
        ("a", 1990),  # earlier in event time than the one that passed: not a duplicate
        ("a", 2100),  # 110 ms after 1990
    ]
    assert run_dedupe(times, ms(1000)) == [
        ("a", 0),
        ("b", 600),
        ("a", 1000),
        ("a", 2000),
        ("a", 1990),
    ]


def test_a_horizon_of_1001_milliseconds_drops_a_repeat_1000_milliseconds_later() -> None:
    assert run_dedupe([("a", 0), ("a", 1000), ("a", 1001)], ms(1001)) == [("a", 0), ("a", 1001)]


def test_records_without_a_key_go_to_the_dead_letters() -> None:
    events = [{"k": "a", "t": 0}, {"t": 5}, {"k": "a", "t": 10}, {"k": "b", "t": 20}]
    source = connectors.Iterable(events, key=lambda v: v.get("k"), timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("dd")
        .source(source, into=Topic("events"))
        .dedupe("dedupe", within=ms(100))
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.values("out") == [events[0], events[3]]
    (dead,) = result.dead_letters
    assert orjson.loads(dead.value) == {"t": 5}
    assert dict(dead.headers)["headwater.step"] == b"dedupe"


# -- batching must not matter ----------------------------------------------------------------------


class FakeContext:
    step_id = "dedupe"
    partition = 0

    def __init__(self) -> None:
        self.store = KeyValueStore("dedupe", 0)

    def reject(self, batch: Batch, index: int, error: Exception) -> None:
        raise AssertionError(error)

    def late(self, batch: Batch, index: int) -> None:
        raise AssertionError("dedupe has no late records")


def make_batch(records: list[tuple[str, int]]) -> Batch:
    n = len(records)
    raw = RawBatch([k.encode() for k, _ in records], [None] * n, [t for _, t in records])
    fetched = FetchedBatch("events", 0, raw, list(range(n)), n)
    return Batch(
        [k for k, _ in records],
        [(k, t) for k, t in records],
        [t for _, t in records],
        list(range(n)),
        fetched,
    )


def dedupe(chunks: list[list[tuple[str, int]]], horizon: int) -> list[Any]:
    operator = Dedupe("dedupe", horizon)
    operator.open(FakeContext())  # type: ignore[arg-type]
    return [value for chunk in chunks for value in operator.process(make_batch(chunk)).values]


def test_what_passes_does_not_depend_on_how_records_are_batched() -> None:
    # b's record at 2000 moves the event time seen past a's 0 + 1000 while a's repeat at 500
    # is still to come: whether a is remembered then must not depend on batch boundaries
    records = [("a", 0), ("b", 2000), ("a", 500)]
    assert dedupe([records], 1000) == dedupe([[r] for r in records], 1000)
