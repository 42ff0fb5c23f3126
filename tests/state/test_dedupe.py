"""Dedupe against a plain-Python reference: a record is dropped when a record of its key that
passed is less than ``within`` away from it in event time (before or after), whatever order they
arrive in; a passed record is forgotten once the event-time mark (which the runtime moves
between batches) is ``within`` past it. Event times arrive out of order."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.operators import send_keyed
from support.times import ms

import connectors
from operators.stateful import Dedupe
from pipelines import Pipeline, Topic
from pipelines.errors import ErrorPolicy
from pipelines.runtime.watermarks import END_OF_TIME as END
from pipelines.testing import OperatorHarness, TestResult, run_pipeline

HORIZON = 1000
DELAY = 300  # the most a record arrives after its event time (less than the horizon)


def distinct_events(seed: int, keys: list[str], per_key: int) -> list[tuple[str, int]]:
    """(key, event time) of distinct events: those of one key at least ``HORIZON`` apart."""
    rng = random.Random(seed)
    events = []
    for key in keys:
        t = rng.randint(0, 3000)
        for _ in range(per_key):
            events.append((key, t))
            t += HORIZON + rng.choice([0, rng.randint(0, 2000)])
    return events


def arrivals(seed: int, events: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Records in arrival order: each event sent 1-4 times, exact copies (same key, same event
    time), each copy arriving 0 to ``DELAY`` ms after its event time, so records of one key and
    of different keys come out of order. ``i`` numbers the records in arrival order."""
    rng = random.Random(seed)
    timed = [
        (t + rng.randint(0, DELAY), rng.random(), {"k": k, "t": t})
        for k, t in events
        for _ in range(rng.randint(1, 4))
    ]
    timed.sort(key=lambda entry: entry[:2])
    return [{"i": i, **event} for i, (_, _, event) in enumerate(timed)]


def reference(records: list[dict[str, Any]], *, forget: bool) -> list[int]:
    """The ids that pass, taking the records in arrival order: a record passes unless a record
    of its key that passed before it is less than ``HORIZON`` away in event time. With
    ``forget``, a passed record is forgotten as soon as the largest event time seen before a
    record is ``HORIZON`` past it: the soonest any batching could have the mark forget it."""
    passed_times: dict[str, list[int]] = defaultdict(list)
    newest: int | None = None
    passed = []
    for record in records:
        key, t = record["k"], record["t"]
        if forget and newest is not None:
            passed_times[key] = [s for s in passed_times[key] if newest < s + HORIZON]
        if all(abs(t - s) >= HORIZON for s in passed_times[key]):
            passed.append(record["i"])
            passed_times[key].append(t)
        newest = t if newest is None else max(newest, t)
    return passed


def passed_ids(result: TestResult) -> list[int]:
    return sorted(v["i"] for v in result.values("out"))


def dedupe_pipeline(
    records: list[dict[str, Any]], partitions: int, key: Callable[[Any], Any] | None = None
) -> Pipeline:
    source = connectors.Iterable(records, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    return (
        Pipeline("dd")
        .source(source, into=Topic("events", partitions=partitions))
        .dedupe("dedupe", within=ms(HORIZON), key=key)
        .sink(connectors.Collect(), step_id="out")
    )


def test_dedupe_by_the_record_key_equals_the_reference() -> None:
    events = distinct_events(seed=1, keys=[f"d{n}" for n in range(20)], per_key=40)
    records = arrivals(seed=1, events=events)
    expected = reference(records, forget=False)
    # the generated stream never has a record whose fate depends on when the mark forgets, so
    # not on how the records are batched
    assert reference(records, forget=True) == expected
    # every event passes once: its first copy to arrive
    first_copies = {(r["k"], r["t"]): r["i"] for r in reversed(records)}
    assert sorted(first_copies.values()) == expected
    assert len(records) / 4 < len(expected) < len(records) * 3 / 4

    result = run_pipeline(dedupe_pipeline(records, partitions=3))
    assert passed_ids(result) == expected
    # records pass unchanged, with their keys and event times, each key in its order
    by_id = {r["i"]: r for r in records}
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in result.records("out"):
        assert record.value == by_id[record.value["i"]]
        assert record.key == record.value["k"]
        assert record.timestamp.timestamp() * 1000 == pytest.approx(record.value["t"])
        per_key[record.key].append(record.value["i"])
    assert all(ids == sorted(ids) for ids in per_key.values())


def test_dedupe_by_a_key_function_equals_the_reference() -> None:
    # messages are sent again under their id; the record key (the sender) plays no part
    events = distinct_events(seed=2, keys=[f"m{n}" for n in range(30)], per_key=25)
    records = arrivals(seed=2, events=events)
    rng = random.Random(3)
    for record in records:
        record["sender"] = rng.choice(["ann", "bob", "cy"])
    expected = reference(records, forget=False)
    assert reference(records, forget=True) == expected

    source = connectors.Iterable(records, key=lambda v: v["sender"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("dd")
        .source(source, into=Topic("events", partitions=1))
        .dedupe("dedupe", within=ms(HORIZON), key=lambda v: v["k"])
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert passed_ids(result) == expected
    assert {r.key for r in result.records("out")} <= {r["k"] for r in records}


def test_what_passes_does_not_depend_on_the_arrival_order(
    run_one_by_one: Callable[..., TestResult],
) -> None:
    events = distinct_events(seed=4, keys=[f"s{n}" for n in range(10)], per_key=30)
    seen = []
    for seed, run in [(5, run_pipeline), (6, run_pipeline), (7, run_one_by_one)]:
        records = arrivals(seed, events)  # another order of other copies of the same events
        expected = reference(records, forget=False)
        assert reference(records, forget=True) == expected
        result = run(dedupe_pipeline(records, partitions=2))
        assert passed_ids(result) == expected
        seen.append(sorted((v["k"], v["t"]) for v in result.values("out")))
    assert seen[0] == seen[1] == seen[2] == sorted(events)


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


def test_a_record_passes_when_every_passed_record_of_its_key_is_a_horizon_away() -> None:
    times = [
        ("a", 0),
        ("a", 500),  # 500 ms after the one that passed: a duplicate
        ("b", 600),
        ("a", 999),  # 999 ms after: a duplicate
        ("a", 1000),  # a horizon after 0: passes
        ("a", 1500),  # duplicate of 1000
        ("b", 1500),  # 900 ms after b's: duplicate
        ("a", 2000),  # a horizon after 1000: passes
        ("a", 1990),  # earlier than 2000 but 10 ms from it (and 990 from 1000): duplicate
        ("a", 2100),  # 100 ms after 2000
        ("c", 5000),
        ("c", 4001),  # 999 ms before the one that passed: a duplicate
        ("c", 4000),  # a horizon before it: passes
    ]
    expected = [("a", 0), ("b", 600), ("a", 1000), ("a", 2000), ("c", 5000), ("c", 4000)]
    assert run_dedupe(times, ms(1000)) == expected
    # no record here comes when the mark could have forgotten what it meets: batches and the
    # mark moving between them do not matter
    records = [{"i": i, "k": k, "t": t} for i, (k, t) in enumerate(times)]
    assert reference(records, forget=True) == reference(records, forget=False)
    assert [times[i] for i in reference(records, forget=False)] == expected


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


# -- the operator, batch by batch ----------------------------------------------------------------


def operator(horizon: int) -> OperatorHarness:
    """A dedupe of step ``dedupe`` driven by hand; a record it rejects fails the test."""
    return OperatorHarness(lambda: Dedupe("dedupe", horizon), error_policy=ErrorPolicy.FAIL)


def send_pairs(harness: OperatorHarness, records: list[tuple[str, int]]) -> list[Any]:
    """What passes of ``records`` ((key, event time), each its own value) sent as one batch;
    dedupe has no late records."""
    passed = send_keyed(harness, [(k, t, (k, t)) for k, t in records]).values
    assert harness.late == []
    return passed


def dedupe(
    chunks: list[list[tuple[str, int]]], horizon: int, *, marks: bool = True
) -> list[tuple[str, int]]:
    """What passes when ``chunks`` come as batches; with ``marks``, the operator is told after
    each batch the mark the runtime would (the largest event time so far)."""
    op = operator(horizon)
    passed: list[tuple[str, int]] = []
    mark: int | None = None
    for chunk in chunks:
        passed += send_pairs(op, chunk)
        if marks and chunk:
            mark = max([t for _, t in chunk] + ([] if mark is None else [mark]))
            assert len(op.advance(mark)) == 0
    return passed


def test_passed_records_are_forgotten_when_the_mark_is_a_horizon_past_them() -> None:
    op = operator(1000)
    assert send_pairs(op, [("a", 0), ("a", 1500), ("b", 10)]) == [
        ("a", 0),
        ("a", 1500),
        ("b", 10),
    ]
    assert op.store.get("a") == [0, 1500]  # the passed event times of each key
    op.advance(999)
    assert send_pairs(op, [("a", 400)]) == []  # 0 is remembered
    op.advance(1000)  # 0 + the horizon
    assert op.store.get("a") == [1500]
    assert op.store.get("b") == [10]  # 10 + 1000 is still ahead of the mark
    # a record that far behind the mark finds nothing to meet but 1500, 1100 away
    assert send_pairs(op, [("a", 400)]) == [("a", 400)]
    op.advance(1010)
    assert op.store.get("b") is None
    op.advance(END)
    assert len(op.store) == 0


def test_only_the_mark_forgets_never_the_event_times_of_a_batch() -> None:
    # b's record at 2000 is a horizon past a's 0, but the largest event time seen is not the
    # mark: in one batch a's repeat at 500 still meets 0
    records = [("a", 0), ("b", 2000), ("a", 500)]
    assert dedupe([records], 1000) == [("a", 0), ("b", 2000)]
    assert dedupe([[r] for r in records], 1000, marks=False) == [("a", 0), ("b", 2000)]
    # when the mark has moved to 2000 between the batches, 0 is forgotten and 500 passes
    assert dedupe([records[:2], records[2:]], 1000) == records
    assert dedupe([[r] for r in records], 1000) == records


def is_a_dedupe_of(
    records: list[tuple[str, int]], passed: list[tuple[str, int]], horizon: int
) -> bool:
    """Whether ``passed`` is what dedupe may pass of ``records`` when nothing is forgotten:
    records of ``records`` (in their order), no two of a key less than ``horizon`` apart, and
    every record left out less than ``horizon`` from a passed one of its key."""
    left = list(records)
    for record in passed:
        if record not in left:
            return False
        left.remove(record)
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, t in passed:
        if any(abs(t - s) < horizon for s in by_key[key]):
            return False
        by_key[key].append(t)
    return all(any(abs(t - s) < horizon for s in by_key[key]) for key, t in left)


@settings(max_examples=200, deadline=None)
@given(
    drawn=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 50)), max_size=25),
    seed=st.integers(0, 1000),
    cuts=st.sets(st.integers(1, 24)),
)
def test_any_arrival_order_and_batching_gives_a_dedupe_of_the_records(
    drawn: list[tuple[str, int]], seed: int, cuts: set[int]
) -> None:
    horizon = 10
    shuffled = random.Random(seed).sample(drawn, len(drawn))
    bounds = [0, *sorted(c for c in cuts if c < len(shuffled)), len(shuffled)]
    chunks = [shuffled[a:b] for a, b in itertools.pairwise(bounds)]
    passed = dedupe(chunks, horizon, marks=False)
    assert is_a_dedupe_of(shuffled, passed, horizon)
    assert passed == dedupe([shuffled], horizon, marks=False)  # batches alone change nothing


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.integers(0, 30), unique=True, max_size=8),
    copies=st.lists(st.integers(1, 3), min_size=16, max_size=16),
    seed=st.integers(0, 1000),
)
def test_exact_copies_of_events_a_horizon_apart_pass_once_in_any_order(
    times: list[int], copies: list[int], seed: int
) -> None:
    horizon = 100
    events = [(key, t * horizon) for t in times for key in "ab"]
    records = [event for event, n in zip(events, copies, strict=False) for _ in range(n)]
    rng = random.Random(seed)
    shuffled = rng.sample(records, len(records))
    # any order, as long as the mark does not move past an event before all its copies came
    assert sorted(dedupe([[r] for r in shuffled], horizon, marks=False)) == sorted(events)
    assert sorted(dedupe([shuffled], horizon)) == sorted(events)
    # each copy arriving less than a horizon after its event time, the mark told after each
    delayed = sorted(records, key=lambda r: r[1] + rng.randrange(horizon))
    assert sorted(dedupe([[r] for r in delayed], horizon)) == sorted(events)
