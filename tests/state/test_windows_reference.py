"""Windowed aggregations against plain-Python reference computations on generated streams with
out-of-order and late events: tumbling, hopping, sliding and session windows, with a count and
with a dict of aggregations, late-data topics, ``emit="update"``, several partitions and workers.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connectors
from operators.aggregations import Aggregation, Collect, Count, Fold, Max, Mean, Min, Sum
from operators.windowed import WindowedAggregate, WindowResult
from operators.windows import Hopping, Session, Sliding, Tumbling, Window, Windows
from pipelines import Pipeline, PipelineDefinitionError, Topic
from pipelines.batch import Batch
from pipelines.log.base import FetchedBatch, RawBatch
from pipelines.partitioner import partition_for
from pipelines.state.store import KeyValueStore
from pipelines.testing import TestResult, run_pipeline, run_pipeline_async

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEYS = [f"k{n}" for n in range(7)]
LATENESS = 200
GRACE = 100
GAP = 120
IDLE = timedelta(seconds=0.5)
SMALL_IDLE = timedelta(seconds=0.2)  # for a handful of records, read at once

WindowKey = tuple[str, int, int]


def ms(millis: int) -> timedelta:
    return timedelta(milliseconds=millis)


def exact_millis(when: datetime) -> int:
    return (when - EPOCH) // timedelta(milliseconds=1)


# -- generated streams ---------------------------------------------------------------------------


def generate(seed: int, count: int, *, session: bool = False) -> list[dict[str, Any]]:
    """Events in arrival order: event times advance 0-40 ms per event and arrive late by up to
    ``LATENESS + GRACE + 300`` ms (so some fall partly or wholly behind the watermark), and 2%
    arrive 1-5 s late. For sessions the ordinary delay stays below ``LATENESS + GRACE`` and the
    very late ones are at least ``LATENESS + GRACE + GAP`` behind, so no record ever touches a
    session the watermark has passed without being late itself (see
    ``test_session_results_do_not_depend_on_how_records_are_batched`` for that case)."""
    rng = random.Random(seed)
    ordinary = LATENESS + GRACE - 1 if session else LATENESS + GRACE + 300
    events = []
    now = 1_000_000
    for i in range(count):
        now += rng.randint(0, 40)
        if rng.random() < 0.02:
            delay = rng.randint(1000, 5000)
        else:
            delay = min(rng.randint(0, ordinary), rng.randint(0, ordinary))
        events.append({"i": i, "k": rng.choice(KEYS), "t": now - delay, "x": rng.randint(-99, 99)})
    return events


def partition_of(key: str, partitions: int) -> int:
    return partition_for(key.encode(), partitions)


@dataclass
class Reference:
    late: set[int] = field(default_factory=set)
    windows: dict[WindowKey, list[dict[str, Any]]] = field(default_factory=dict)


def reference_fixed(
    events: list[dict[str, Any]], windows: Windows, partitions: int = 1
) -> Reference:
    """Each partition's watermark is its largest event time so far minus the lateness; a record
    is late when every window holding it has ``end + grace <= watermark``, else it joins the
    windows of it still open."""
    ref = Reference()
    contents: dict[WindowKey, list[dict[str, Any]]] = defaultdict(list)
    newest: dict[int, int] = {}
    for event in events:
        partition = partition_of(event["k"], partitions)
        t = event["t"]
        watermark = newest[partition] - LATENESS if partition in newest else None
        live = [w for w in windows.assign(t) if watermark is None or w.end + GRACE > watermark]
        if not live:
            ref.late.add(event["i"])
        for window in live:
            contents[(event["k"], window.start, window.end)].append(event)
        newest[partition] = max(newest.get(partition, t), t)
    ref.windows = dict(contents)
    return ref


def reference_sessions(events: list[dict[str, Any]], gap: int, partitions: int = 1) -> Reference:
    """Sessions closed record by record: a record is late when ``t + gap + grace`` is at or
    below its partition's watermark; otherwise its window ``[t, t + gap)`` merges with every open
    session of its key that it overlaps or touches; a session closes when the watermark reaches
    ``end + grace``."""
    ref = Reference()
    open_sessions: dict[str, list[tuple[int, int, list[dict[str, Any]]]]] = defaultdict(list)
    newest: dict[int, int] = {}
    for event in events:
        key, t = event["k"], event["t"]
        partition = partition_of(key, partitions)
        watermark = newest[partition] - LATENESS if partition in newest else None
        if watermark is not None and t + gap + GRACE <= watermark:
            ref.late.add(event["i"])
            continue
        start, end, members = t, t + gap, [event]
        for session in list(open_sessions[key]):
            if session[0] <= t + gap and t <= session[1]:
                open_sessions[key].remove(session)
                start, end = min(start, session[0]), max(end, session[1])
                members = session[2] + members
        open_sessions[key].append((start, end, members))
        newest[partition] = max(newest.get(partition, t), t)
        watermark = newest[partition] - LATENESS
        for other, sessions in open_sessions.items():
            if partition_of(other, partitions) != partition:
                continue
            for session in list(sessions):
                if session[1] + GRACE <= watermark:
                    sessions.remove(session)
                    ref.windows[(other, session[0], session[1])] = session[2]
    for key, sessions in open_sessions.items():  # the end of input: idle partitions close all
        for start, end, members in sessions:
            ref.windows[(key, start, end)] = members
    return ref


def many() -> dict[str, Any]:
    return {
        "count": Count(),
        "sum": Sum(lambda v: v["x"]),
        "mean": Mean(lambda v: v["x"]),
        "min": Min(lambda v: v["x"]),
        "max": Max(lambda v: v["x"]),
        "ids": Collect(lambda v: v["i"]),
    }


def expected_many(members: list[dict[str, Any]], *, ordered: bool) -> dict[str, Any]:
    xs = [m["x"] for m in members]
    ids = [m["i"] for m in members]
    return {
        "count": len(xs),
        "sum": sum(xs),
        "mean": sum(xs) / len(xs),
        "min": min(xs),
        "max": max(xs),
        "ids": ids if ordered else sorted(ids),
    }


KINDS: dict[str, Windows] = {
    "tumbling": Tumbling(seconds=1),
    "hopping": Hopping(timedelta(seconds=1), ms(250)),
    "sliding": Sliding(timedelta(seconds=2), ms(500)),
    "session": Session(ms(GAP)),
}


def reference_for(kind: str, events: list[dict[str, Any]], partitions: int) -> Reference:
    windows = KINDS[kind]
    if isinstance(windows, Session):
        return reference_sessions(events, windows.gap, partitions)
    return reference_fixed(events, windows, partitions)


def windowed(
    events: list[dict[str, Any]],
    kind: str,
    aggregation: str,
    *,
    partitions: int = 3,
    emit: str = "close",
    time: Callable[[Any], Any] | None = None,
    idle: timedelta = IDLE,
) -> Pipeline:
    source = connectors.Iterable(
        events,
        key=lambda v: v["k"],
        timestamp=None if time is not None else lambda v: v["t"],
    )
    chain = (
        Pipeline("ref")
        .source(source, into=Topic("events", partitions=partitions))
        .window(
            "win",
            KINDS[kind],
            time=time,
            lateness=ms(LATENESS),
            grace=ms(GRACE),
            idle=idle,
            emit=emit,  # type: ignore[arg-type]
        )
    )
    chain = chain.count("agg") if aggregation == "count" else chain.aggregate("agg", many())
    return chain.sink(connectors.Collect(), step_id="out")


def final_results(result: TestResult) -> dict[WindowKey, Any]:
    emitted: list[WindowResult] = result.values("out")
    got = {(r.key, exact_millis(r.start), exact_millis(r.end)): r.value for r in emitted}
    assert len(got) == len(emitted), "a window was emitted more than once"
    assert all(r.final for r in emitted)
    return got


def late_ids(result: TestResult) -> list[int]:
    return sorted(orjson.loads(r.value)["i"] for r in result.topic("ref.agg.late"))


def expected_values(kind: str, aggregation: str, ref: Reference) -> dict[WindowKey, Any]:
    if aggregation == "count":
        return {window: len(members) for window, members in ref.windows.items()}
    ordered = kind != "session"  # merged sessions collect in no particular order
    return {window: expected_many(m, ordered=ordered) for window, m in ref.windows.items()}


def comparable(kind: str, results: dict[WindowKey, Any]) -> dict[WindowKey, Any]:
    if kind != "session":
        return results
    return {
        w: {**v, "ids": sorted(v["ids"])} if isinstance(v, dict) else v for w, v in results.items()
    }


# -- every kind against the reference ------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["count", "many"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_final_results_and_late_records_equal_the_reference(kind: str, aggregation: str) -> None:
    seed = zlib.crc32(f"{kind}/{aggregation}".encode())
    events = generate(seed, count=6000, session=kind == "session")
    ref = reference_for(kind, events, partitions=3)
    assert 0 < len(ref.late) < len(events) // 10  # the stream does have late records

    result = run_pipeline(windowed(events, kind, aggregation))

    assert late_ids(result) == sorted(ref.late)
    assert comparable(kind, final_results(result)) == expected_values(kind, aggregation, ref)
    check_late_records(result, events, partitions=3)


def check_late_records(result: TestResult, events: list[dict[str, Any]], partitions: int) -> None:
    """Late records are the original records, with where they were read from."""
    by_id = {e["i"]: e for e in events}
    for record in result.topic("ref.agg.late"):
        value = orjson.loads(record.value)
        assert value == by_id[value["i"]]
        assert record.key == value["k"].encode()
        assert exact_millis(record.timestamp) == value["t"]
        headers = dict(record.headers)
        assert headers["headwater.late"] == b"agg"
        assert headers["headwater.source.topic"] == b"events"
        partition = partition_of(value["k"], partitions)
        assert int(headers["headwater.source.partition"]) == partition


@pytest.mark.parametrize("kind", ["tumbling", "session"])
def test_two_workers_give_the_results_of_one(kind: str) -> None:
    events = generate(seed=11, count=6000, session=kind == "session")
    ref = reference_for(kind, events, partitions=4)
    one = run_pipeline(windowed(events, kind, "many", partitions=4), workers=1)
    two = run_pipeline(windowed(events, kind, "many", partitions=4), workers=2)
    assert comparable(kind, final_results(two)) == comparable(kind, final_results(one))
    assert late_ids(two) == late_ids(one) == sorted(ref.late)
    assert comparable(kind, final_results(one)) == expected_values(kind, "many", ref)


# -- emit="update" -------------------------------------------------------------------------------


def updates_per_window(result: TestResult) -> dict[WindowKey, list[WindowResult]]:
    per_window: dict[WindowKey, list[WindowResult]] = defaultdict(list)
    for update in result.values("out"):
        per_window[(update.key, exact_millis(update.start), exact_millis(update.end))].append(
            update
        )
    return per_window


@pytest.mark.parametrize("kind", ["tumbling", "hopping"])
def test_updates_count_up_one_by_one_to_the_final_count(kind: str) -> None:
    events = generate(seed=5, count=5000)
    ref = reference_fixed(events, KINDS[kind], partitions=3)
    result = run_pipeline(windowed(events, kind, "count", emit="update"))

    assert late_ids(result) == sorted(ref.late)
    per_window = updates_per_window(result)
    assert {w: len(m) for w, m in ref.windows.items()} == {
        w: updates[-1].value for w, updates in per_window.items()
    }
    for updates in per_window.values():
        *changes, closing = updates  # every change, then the one final result at close
        assert [u.value for u in changes] == list(range(1, len(changes) + 1))
        assert not any(u.final for u in changes)
        assert closing.final
        assert closing.value == len(changes)


def test_session_updates_end_with_each_sessions_final_count() -> None:
    events = generate(seed=6, count=5000, session=True)
    ref = reference_sessions(events, GAP, partitions=3)
    result = run_pipeline(windowed(events, "session", "count", emit="update"))

    assert late_ids(result) == sorted(ref.late)
    per_window = updates_per_window(result)
    for window, members in ref.windows.items():
        assert per_window[window][-1].value == len(members)
    for key, start, end in per_window:  # merged-away sessions lie within a final one
        assert any(k == key and s <= start and end <= e for k, s, e in ref.windows)


def test_updates_are_emitted_per_record_and_the_close_once_more_as_final() -> None:
    # WindowResult.final: False for the updates emit="update" emits while a window is open,
    # True for the one result a window emits when it closes
    events = [{"i": i, "k": "a", "t": t, "x": 0} for i, t in enumerate([10, 20, 1500, 3000])]
    result = run_pipeline(
        windowed(events, "tumbling", "count", partitions=1, emit="update", idle=SMALL_IDLE)
    )
    emitted = result.values("out")
    updates = [(u.start, u.value) for u in emitted if not u.final]
    finals = [(u.start, u.value) for u in emitted if u.final]
    starts = {exact_millis(u.start) for u in emitted}
    assert starts == {0, 1000, 3000}
    assert [(exact_millis(s), v) for s, v in updates] == [(0, 1), (0, 2), (1000, 1), (3000, 1)]
    assert sorted((exact_millis(s), v) for s, v in finals) == [(0, 2), (1000, 1), (3000, 1)]
    stamps = sorted(exact_millis(r.timestamp) for r in result.records("out"))
    assert stamps == [1000, 1000, 1000, 2000, 2000, 4000, 4000]


# -- sessions ------------------------------------------------------------------------------------


def session_counts(events: list[dict[str, Any]], *, lateness: int = 10_000) -> dict[Any, int]:
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("s")
        .source(source, into=Topic("events"))
        .window("win", Session(ms(100)), lateness=ms(lateness), idle=SMALL_IDLE)
        .count("agg")
        .sink(connectors.Collect(), step_id="out")
    )
    emitted = run_pipeline(pipeline).values("out")
    return {(r.key, exact_millis(r.start), exact_millis(r.end)): r.value for r in emitted}


def test_a_record_bridging_two_sessions_merges_them() -> None:
    events = [
        {"k": "a", "t": 1000},  # [1000, 1100)
        {"k": "a", "t": 1180},  # [1180, 1280): apart
        {"k": "b", "t": 1050},
        {"k": "a", "t": 1090},  # [1090, 1190) touches both: [1000, 1280)
        {"k": "a", "t": 1280},  # [1280, 1380) touches its end exactly: [1000, 1380)
        {"k": "a", "t": 2000},  # a session of its own
        {"k": "b", "t": 1151},  # [1151, 1251) just misses b's [1050, 1150)
    ]
    assert session_counts(events) == {
        ("a", 1000, 1380): 4,
        ("a", 2000, 2100): 1,
        ("b", 1050, 1150): 1,
        ("b", 1151, 1251): 1,
    }


def test_a_user_aggregate_with_a_merge_works_on_sessions_and_on_fixed_windows() -> None:
    events = generate(seed=3, count=3000, session=True)
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])

    def pipeline(windows: Windows) -> Pipeline:
        return (
            Pipeline("fold")
            .source(source, into=Topic("events", partitions=2))
            .window("win", windows, lateness=ms(LATENESS), grace=ms(GRACE), idle=IDLE)
            .aggregate(
                "agg",
                initial=lambda: {"n": 0, "xs": 0},
                fold=lambda acc, v: {"n": acc["n"] + 1, "xs": acc["xs"] + v["x"]},
                merge=lambda a, b: {"n": a["n"] + b["n"], "xs": a["xs"] + b["xs"]},
            )
            .sink(connectors.Collect(), step_id="out")
        )

    for kind, ref in [
        ("session", reference_sessions(events, GAP, partitions=2)),
        ("tumbling", reference_fixed(events, KINDS["tumbling"], partitions=2)),
    ]:
        emitted = run_pipeline(pipeline(KINDS[kind])).values("out")
        got = {(r.key, exact_millis(r.start), exact_millis(r.end)): r.value for r in emitted}
        expected = {w: {"n": len(m), "xs": sum(e["x"] for e in m)} for w, m in ref.windows.items()}
        assert got == expected, kind


def session_window() -> Pipeline:
    source = connectors.Iterable([], key=lambda v: v["k"])
    return Pipeline("s").source(source, into=Topic("events")).window("win", Session(ms(100)))


class Last(Aggregation):
    """An aggregation without a merge."""

    def initial(self) -> Any:
        return None

    def fold(self, acc: Any, value: Any) -> Any:
        return value


UNMERGEABLE: dict[str, Callable[[Pipeline], Pipeline]] = {
    "an Aggregation without merge": lambda p: p.aggregate("agg", Last()),
    "initial= and fold= without merge=": lambda p: p.aggregate(
        "agg", initial=0, fold=lambda acc, v: acc + 1
    ),
    "a Fold without merge": lambda p: p.aggregate("agg", Fold(0, lambda acc, v: acc + 1)),
    "a dict holding one that cannot merge": lambda p: p.aggregate(
        "agg", {"n": Count(), "last": Last()}
    ),
}


@pytest.mark.parametrize("case", sorted(UNMERGEABLE))
def test_an_aggregation_that_cannot_merge_is_refused_on_sessions_when_declared(
    case: str,
) -> None:
    with pytest.raises(PipelineDefinitionError) as caught:
        UNMERGEABLE[case](session_window())
    assert caught.value.step == "agg"


def test_mergeable_aggregations_are_accepted_on_sessions_and_any_on_fixed_windows() -> None:
    session_window().aggregate("agg", {"n": Count(), "ids": Collect()})
    session_window().aggregate(
        "agg", initial=0, fold=lambda acc, v: acc + 1, merge=lambda a, b: a + b
    )
    fixed = (
        Pipeline("f")
        .source(connectors.Iterable([]), into=Topic("events"))
        .window("win", Tumbling(seconds=1))
    )
    for build in UNMERGEABLE.values():
        build(fixed)


def test_a_fold_that_raises_on_a_session_record_dead_letters_that_record_only() -> None:
    def fold(acc: int, value: dict[str, Any]) -> int:
        if value.get("bad"):
            raise ValueError("bad record")
        return acc + 1

    events = [
        {"k": "a", "t": 1000},
        {"k": "a", "t": 1030},
        {"k": "a", "t": 1050, "bad": True},
        {"k": "a", "t": 1070},
        {"k": "b", "t": 5000},
    ]
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("s")
        .source(source, into=Topic("events"))
        .window("win", Session(ms(100)), lateness=ms(10_000), idle=SMALL_IDLE)
        .aggregate("agg", initial=0, fold=fold, merge=lambda a, b: a + b)
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    got = {
        (r.key, exact_millis(r.start), exact_millis(r.end)): r.value for r in result.values("out")
    }
    assert [orjson.loads(r.value) for r in result.dead_letters] == [events[2]]
    assert got == {("a", 1000, 1170): 3, ("b", 5000, 5100): 1}


# -- batching must not matter ----------------------------------------------------------------------


class FakeContext:
    """Just enough of a step context to drive an operator by hand."""

    step_id = "agg"
    partition = 0

    def __init__(self) -> None:
        self.store = KeyValueStore("agg", 0)
        self.late_values: list[Any] = []
        self.rejected: list[Any] = []

    def reject(self, batch: Batch, index: int, error: Exception) -> None:
        self.rejected.append(batch.values[index])

    def late(self, batch: Batch, index: int) -> None:
        self.late_values.append(batch.values[index])


def make_batch(records: list[tuple[str, int, Any]]) -> Batch:
    n = len(records)
    raw = RawBatch([k.encode() for k, _, _ in records], [None] * n, [t for _, t, _ in records])
    fetched = FetchedBatch("events", 0, raw, list(range(n)), n)
    return Batch(
        [k for k, _, _ in records],
        [v for _, _, v in records],
        [t for _, t, _ in records],
        list(range(n)),
        fetched,
    )


def drive(
    windows: Windows, chunks: list[list[tuple[str, int, Any]]], lateness: int, grace: int
) -> tuple[list[tuple[str, int, int, int]], list[Any]]:
    operator = WindowedAggregate(
        "agg", windows, Count(), emit="close", grace_ms=grace, lateness_ms=lateness, idle_ms=10**9
    )
    ctx = FakeContext()
    operator.open(ctx)  # type: ignore[arg-type]
    emitted = []
    for chunk in chunks:
        for r in operator.process(make_batch(chunk)).values:
            emitted.append((r.key, exact_millis(r.start), exact_millis(r.end), r.value))
    # whatever is still open, as the end of input would close it
    leftover = [(k[0], k[1], k[2], v) for k, v in ctx.store.items() if len(k) == 3]
    return sorted(emitted + leftover), sorted(ctx.late_values)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["hopping", "sliding", "tumbling"]),
    drawn=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3000)), max_size=30),
    cuts=st.sets(st.integers(1, 29)),
    lateness=st.sampled_from([0, 100]),
    grace=st.sampled_from([0, 50]),
)
def test_fixed_window_results_do_not_depend_on_how_records_are_batched(
    kind: str, drawn: list[tuple[str, int]], cuts: set[int], lateness: int, grace: int
) -> None:
    windows = KINDS[kind]
    records = [(k, t, i) for i, (k, t) in enumerate(drawn)]
    bounds = [0, *sorted(c for c in cuts if c < len(records)), len(records)]
    chunks = [records[a:b] for a, b in itertools.pairwise(bounds)]
    assert drive(windows, [records], lateness, grace) == drive(windows, chunks, lateness, grace)


def test_session_results_do_not_depend_on_how_records_are_batched() -> None:
    # gap 10, no lateness or grace: b's record at 10 moves the watermark to 10, which closes
    # a's session [0, 10); a's record at 5 then opens [5, 15), touching the closed session.
    # Record by record (or batch by batch) that gives two sessions of a; in one batch the
    # closed session is still in the store and the record merges into it.
    records = [("a", 0, 0), ("b", 10, 1), ("a", 5, 2)]
    windows = Session(ms(10))
    one_batch = drive(windows, [records], 0, 0)
    one_by_one = drive(windows, [[r] for r in records], 0, 0)
    assert one_batch == one_by_one


# -- time=, durations, accumulators --------------------------------------------------------------


def test_event_times_given_as_datetimes_land_in_their_window() -> None:
    # 2004-02-15 09:23:20.100 UTC is exactly the start of a 100 ms window
    when = datetime(2004, 2, 15, 9, 23, 20, 100_000, tzinfo=UTC)
    start = exact_millis(when)
    events = [{"i": 0, "k": "a", "when": when.isoformat()}]
    source = connectors.Iterable(events, key=lambda v: v["k"])
    pipeline = (
        Pipeline("dt")
        .source(source, into=Topic("events"))
        .window(
            "win",
            Tumbling(ms(100)),
            time=lambda v: datetime.fromisoformat(v["when"]),
            idle=SMALL_IDLE,
        )
        .count("agg")
        .sink(connectors.Collect(), step_id="out")
    )
    (result,) = run_pipeline(pipeline).values("out")
    assert (exact_millis(result.start), exact_millis(result.end)) == (start, start + 100)
    assert result.start == when


def test_a_grace_of_1001_milliseconds_keeps_a_window_open_1001_milliseconds() -> None:
    events = [
        {"i": 0, "k": "a", "t": 0},  # [0, 100) closes when the watermark reaches 1101
        {"i": 1, "k": "a", "t": 1100},
        {"i": 2, "k": "a", "t": 50},  # so this one is not late
    ]
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("g")
        .source(source, into=Topic("events"))
        .window("win", Tumbling(ms(100)), grace=ms(1001), idle=SMALL_IDLE)
        .count("agg")
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.topic("g.agg.late") == []
    got = {exact_millis(r.start): r.value for r in result.values("out")}
    assert got == {0: 2, 1100: 1}


async def test_a_window_whose_accumulator_is_none_still_closes() -> None:
    # "the last price given": a window where no record gives one keeps the accumulator None
    events = [
        {"k": "a", "t": 10, "price": None},
        {"k": "a", "t": 20, "price": None},
        {"k": "a", "t": 150, "price": 3},
    ]
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("none")
        .source(source, into=Topic("events"))
        .window("win", Tumbling(ms(100)), idle=SMALL_IDLE)
        .aggregate(
            "agg",
            initial=None,
            fold=lambda acc, v: v["price"] if v["price"] is not None else acc,
        )
        .sink(connectors.Collect(), step_id="out")
    )
    result = await asyncio.wait_for(run_pipeline_async(pipeline), timeout=5)
    got = {exact_millis(r.start): r.value for r in result.values("out")}
    assert got == {0: None, 100: 3}


def test_window_results_are_timestamped_with_the_window_end() -> None:
    events = [{"i": 0, "k": "a", "t": 1234, "x": 1}]
    result = run_pipeline(windowed(events, "hopping", "count", partitions=1, idle=SMALL_IDLE))
    records = result.records("out")
    assert sorted((exact_millis(r.timestamp), r.key) for r in records) == [
        (1250, "a"),
        (1500, "a"),
        (1750, "a"),
        (2000, "a"),
    ]
    for record in records:
        assert record.timestamp == record.value.end
        assert isinstance(record.value.start, datetime)
    assert {exact_millis(r.value.start) for r in records} == {250, 500, 750, 1000}
    assert all(r.value.end - r.value.start == timedelta(seconds=1) for r in records)
    assert Window(1000, 2000) in KINDS["hopping"].assign(1234)
