"""Windowed aggregations against plain-Python reference computations on generated streams with
out-of-order and late events: tumbling, hopping, sliding and session windows, with a count and
with a dict of aggregations, late-data topics, ``emit="update"``, several partitions and workers.

The watermark moves between batches: a record is judged against the watermark from before its
batch. The references take the batch boundaries as input; the pipelines whose results depend on
them run with workers polling one record at a time (``run_one_by_one``, see ``conftest.py``),
so each partition's records come one per batch; the operator is also driven by hand with
batches a test chooses.
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
from event_time.oracles import iso, max_disorder, window_counts
from event_time.oracles import user_session_counts as session_counts_of
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.operators import send_keyed
from support.times import exact_millis, ms

import connectors
from operators.aggregations import Aggregation, Collect, Count, Fold, Max, Mean, Min, Sum
from operators.windowed import WindowedAggregate, WindowResult
from operators.windows import Hopping, Session, Sliding, Tumbling, Window, Windows
from pipelines import Pipeline, PipelineDefinitionError, Topic
from pipelines.partitioner import partition_for
from pipelines.testing import OperatorHarness, TestResult, run_pipeline, run_pipeline_async

KEYS = [f"k{n}" for n in range(7)]
LATENESS = 200
GRACE = 100
GAP = 120
IDLE = timedelta(seconds=0.5)
SMALL_IDLE = timedelta(seconds=0.2)  # for a handful of records, read at once

WindowKey = tuple[str, int, int]
Run = Callable[..., TestResult]  # the run_one_by_one fixture (conftest.py)


# -- generated streams ---------------------------------------------------------------------------


def generate(seed: int, count: int, *, session: bool = False) -> list[dict[str, Any]]:
    """Events in arrival order: event times advance 0-40 ms per event and arrive late by up to
    ``LATENESS + GRACE + 300`` ms (so some fall partly or wholly behind the watermark), and 2%
    arrive 1-5 s late. For sessions the ordinary delay stays below ``LATENESS + GRACE`` and the
    very late ones are at least ``LATENESS + GRACE + GAP`` behind, so no record ever touches a
    session the watermark has passed without being late itself (see
    ``test_a_session_closed_between_batches_is_not_joined_again`` for that case)."""
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

    def add(self, other: Reference) -> None:
        self.late |= other.late
        self.windows.update(other.windows)


Batches = list[list[dict[str, Any]]]


def one_by_one(events: list[dict[str, Any]], partitions: int) -> list[Batches]:
    """The batches each partition's task processes when the workers poll one record at a time
    (see ``conftest.py``): its records in arrival order, one per batch."""
    return [
        [[e] for e in events if partition_of(e["k"], partitions) == partition]
        for partition in range(partitions)
    ]


def fixed_batches(batches: Batches, windows: Windows, lateness: int, grace: int) -> Reference:
    """One task fed ``batches``: the watermark is the largest event time of the batches before
    minus ``lateness`` (none before the first batch); a record is late when every window holding
    it has ``end + grace <= watermark``, else it joins the windows of it still open. Every
    window closes by the end of input."""
    ref = Reference()
    contents: dict[WindowKey, list[dict[str, Any]]] = defaultdict(list)
    watermark: int | None = None
    newest: int | None = None
    for batch in batches:
        for event in batch:
            t = event["t"]
            live = [w for w in windows.assign(t) if watermark is None or w.end + grace > watermark]
            if not live:
                ref.late.add(event["i"])
            for window in live:
                contents[(event["k"], window.start, window.end)].append(event)
        if batch:
            newest = max([e["t"] for e in batch] + ([] if newest is None else [newest]))
            watermark = newest - lateness
    ref.windows = dict(contents)
    return ref


def session_batches(batches: Batches, gap: int, lateness: int, grace: int) -> Reference:
    """One task fed ``batches``, with the watermark of :func:`fixed_batches`: a record is late
    when ``t + gap + grace <= watermark``; otherwise its window ``[t, t + gap)`` merges with
    every open session of its key that it overlaps or touches. After each batch, the sessions
    with ``end + grace <= watermark`` close; every session closes by the end of input."""
    ref = Reference()
    open_sessions: dict[str, list[tuple[int, int, list[dict[str, Any]]]]] = defaultdict(list)
    watermark: int | None = None
    newest: int | None = None
    for batch in batches:
        for event in batch:
            key, t = event["k"], event["t"]
            if watermark is not None and t + gap + grace <= watermark:
                ref.late.add(event["i"])
                continue
            start, end, members = t, t + gap, [event]
            for session in list(open_sessions[key]):
                if session[0] <= t + gap and t <= session[1]:
                    open_sessions[key].remove(session)
                    start, end = min(start, session[0]), max(end, session[1])
                    members = session[2] + members
            open_sessions[key].append((start, end, members))
        if not batch:
            continue
        newest = max([e["t"] for e in batch] + ([] if newest is None else [newest]))
        watermark = newest - lateness
        for key, sessions in open_sessions.items():
            for session in list(sessions):
                if session[1] + grace <= watermark:
                    sessions.remove(session)
                    ref.windows[(key, session[0], session[1])] = session[2]
    for key, sessions in open_sessions.items():  # the end of input closes every session
        for start, end, members in sessions:
            ref.windows[(key, start, end)] = members
    return ref


def reference_fixed(
    events: list[dict[str, Any]], windows: Windows, partitions: int = 1
) -> Reference:
    """:func:`fixed_batches` per partition, one record per batch, with the pipeline's lateness
    and grace."""
    ref = Reference()
    for batches in one_by_one(events, partitions):
        ref.add(fixed_batches(batches, windows, LATENESS, GRACE))
    return ref


def reference_sessions(events: list[dict[str, Any]], gap: int, partitions: int = 1) -> Reference:
    """:func:`session_batches` per partition, one record per batch, with the pipeline's
    lateness and grace."""
    ref = Reference()
    for batches in one_by_one(events, partitions):
        ref.add(session_batches(batches, gap, LATENESS, GRACE))
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
def test_final_results_and_late_records_equal_the_reference(
    kind: str, aggregation: str, run_one_by_one: Run
) -> None:
    seed = zlib.crc32(f"{kind}/{aggregation}".encode())
    events = generate(seed, count=6000, session=kind == "session")
    ref = reference_for(kind, events, partitions=3)
    assert 0 < len(ref.late) < len(events) // 10  # the stream does have late records

    result = run_one_by_one(windowed(events, kind, aggregation))

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
def test_two_workers_give_the_results_of_one(kind: str, run_one_by_one: Run) -> None:
    events = generate(seed=11, count=6000, session=kind == "session")
    ref = reference_for(kind, events, partitions=4)
    one = run_one_by_one(windowed(events, kind, "many", partitions=4), workers=1)
    two = run_one_by_one(windowed(events, kind, "many", partitions=4), workers=2)
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
def test_updates_count_up_one_by_one_to_the_final_count(kind: str, run_one_by_one: Run) -> None:
    events = generate(seed=5, count=5000)
    ref = reference_fixed(events, KINDS[kind], partitions=3)
    result = run_one_by_one(windowed(events, kind, "count", emit="update"))

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


def test_session_updates_end_with_each_sessions_final_count(run_one_by_one: Run) -> None:
    events = generate(seed=6, count=5000, session=True)
    ref = reference_sessions(events, GAP, partitions=3)
    result = run_one_by_one(windowed(events, "session", "count", emit="update"))

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


def test_a_user_aggregate_with_a_merge_works_on_sessions_and_on_fixed_windows(
    run_one_by_one: Run,
) -> None:
    events = generate(seed=3, count=3000, session=True)

    def pipeline(windows: Windows) -> Pipeline:
        source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
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
        emitted = run_one_by_one(pipeline(KINDS[kind])).values("out")
        got = {(r.key, exact_millis(r.start), exact_millis(r.end)): r.value for r in emitted}
        expected = {w: {"n": len(m), "xs": sum(e["x"] for e in m)} for w, m in ref.windows.items()}
        assert got == expected, kind
        assert ref.late  # some records were late, so the reference's watermark was at work


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


# -- the watermark moves between batches ----------------------------------------------------------


def drive(
    windows: Windows, chunks: list[list[tuple[str, int, Any]]], lateness: int, grace: int
) -> tuple[list[tuple[str, int, int, int]], list[Any]]:
    """Feed ``chunks`` as batches, telling the operator after each the mark the runtime would
    (the largest event time so far), then the end of time; (every final result, the late
    values)."""
    operator = OperatorHarness(
        lambda: WindowedAggregate(
            "agg", windows, Count(), emit="close", grace_ms=grace, lateness_ms=lateness
        )
    )
    results: list[WindowResult] = []
    mark: int | None = None
    for chunk in chunks:
        results += send_keyed(operator, chunk).values
        if chunk:
            mark = max([t for _, t, _ in chunk] + ([] if mark is None else [mark]))
            results += operator.advance(mark).values
    results += operator.finish().values
    assert operator.pending == 0
    assert all(r.final for r in results)
    emitted = [(r.key, exact_millis(r.start), exact_millis(r.end), r.value) for r in results]
    assert len({e[:3] for e in emitted}) == len(emitted), "a window was emitted more than once"
    assert operator.rejected == []
    return sorted(emitted), sorted(r.value for r in operator.late)


def expected_drive(
    reference: Reference, chunks: list[list[tuple[str, int, Any]]]
) -> tuple[list[tuple[str, int, int, int]], list[Any]]:
    """What :func:`drive` returns for ``reference`` (computed from ``chunks``)."""
    counts = sorted((k, start, end, len(m)) for (k, start, end), m in reference.windows.items())
    return counts, sorted(reference.late)


def as_events(chunks: list[list[tuple[str, int, Any]]]) -> Batches:
    return [[{"i": i, "k": k, "t": t} for k, t, i in chunk] for chunk in chunks]


def cut(records: list[tuple[str, int, int]], cuts: set[int]) -> list[list[tuple[str, int, int]]]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(records)), len(records)]
    return [records[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["hopping", "sliding", "tumbling"]),
    drawn=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3000)), max_size=30),
    cuts=st.sets(st.integers(1, 29)),
    lateness=st.sampled_from([0, 100]),
    grace=st.sampled_from([0, 50]),
)
def test_fixed_windows_judge_each_batch_against_the_watermark_before_it(
    kind: str, drawn: list[tuple[str, int]], cuts: set[int], lateness: int, grace: int
) -> None:
    windows = KINDS[kind]
    records = [(k, t, i) for i, (k, t) in enumerate(drawn)]
    chunks = cut(records, cuts)
    expected = fixed_batches(as_events(chunks), windows, lateness, grace)
    assert drive(windows, chunks, lateness, grace) == expected_drive(expected, chunks)


@settings(max_examples=200, deadline=None)
@given(
    drawn=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 300)), max_size=30),
    cuts=st.sets(st.integers(1, 29)),
    lateness=st.sampled_from([0, 20]),
    grace=st.sampled_from([0, 10]),
)
def test_sessions_judge_each_batch_against_the_watermark_before_it(
    drawn: list[tuple[str, int]], cuts: set[int], lateness: int, grace: int
) -> None:
    windows = Session(ms(15))
    records = [(k, t, i) for i, (k, t) in enumerate(drawn)]
    chunks = cut(records, cuts)
    expected = session_batches(as_events(chunks), 15, lateness, grace)
    assert drive(windows, chunks, lateness, grace) == expected_drive(expected, chunks)


def oracle_events(records: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """``(key, event time, id)`` records in the form of :mod:`event_time.oracles`."""
    return [{"id": i, "user": k, "ts": iso(t)} for k, t, i in records]


def input_counts(kind: str, records: list[tuple[str, int, int]]) -> list[tuple[str, int, int, int]]:
    """What every window of ``KINDS[kind]`` holds, from the records alone
    (:func:`event_time.oracles.window_counts` / :func:`~event_time.oracles.session_counts`),
    sorted like :func:`drive`'s results."""
    events = oracle_events(records)
    windows = KINDS[kind]
    if isinstance(windows, Session):
        counts = session_counts_of(events, gap=windows.gap)
    else:
        assert isinstance(windows, Hopping | Tumbling)
        advance = windows.advance if isinstance(windows, Hopping) else None
        counts = window_counts(events, size=windows.size, advance=advance)
    return sorted((k, start, end, n) for (k, start, end), n in counts.items())


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    drawn=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3000)), max_size=30),
    cuts=st.sets(st.integers(1, 29)),
    slack=st.sampled_from([0, 1, 100]),
    grace=st.sampled_from([0, 50]),
)
def test_any_batching_within_the_lateness_gives_the_windows_of_the_input(
    kind: str, drawn: list[tuple[str, int]], cuts: set[int], slack: int, grace: int
) -> None:
    """Tumbling, hopping, sliding and session windows fed the records in any batches, with a
    lateness at least the records' disorder (how far, at worst, a record comes behind the
    latest before it): nothing is late and every window holds what the input alone says
    (:mod:`event_time.oracles`), whatever the batches. The watermark before a batch is the
    largest event time before it minus the lateness, so no record is behind it, and a window
    closes only once no record still to come can fall in it."""
    records = [(k, t, i) for i, (k, t) in enumerate(drawn)]
    lateness = max_disorder(oracle_events(records)) + slack
    counts, late = drive(KINDS[kind], cut(records, cuts), lateness, grace)
    assert late == []
    assert counts == input_counts(kind, records)


@settings(max_examples=300, deadline=None)
# a's record at 85 comes when the watermark is 85 and touches a's closed session [70, 85):
# see test_a_record_at_the_watermark_joins_the_session_it_touches
@example(drawn=[("a", 70), ("a", 90), ("a", 85)], cuts={1, 2}, slack=0, grace=0)
@given(
    # multiples of 5 ms: records often fall exactly a gap after another, or at the watermark
    drawn=st.lists(
        st.tuples(st.sampled_from("ab"), st.integers(0, 60).map(lambda n: n * 5)), max_size=30
    ),
    cuts=st.sets(st.integers(1, 29)),
    slack=st.sampled_from([0, 1, 10]),
    grace=st.sampled_from([0, 10]),
)
def test_sessions_in_any_batches_within_the_lateness_equal_the_sessions_of_the_input(
    drawn: list[tuple[str, int]], cuts: set[int], slack: int, grace: int
) -> None:
    """Sessions of a 15 ms gap over 300 ms (so records bridge and merge sessions often), fed
    in any batches with a lateness at least the records' disorder: nothing is late and the
    sessions are those of :func:`event_time.oracles.session_counts` over the records (a
    user's records sorted by time, a new session when one comes more than the gap after the
    last), which knows nothing of batches or watermarks."""
    records = [(k, t, i) for i, (k, t) in enumerate(drawn)]
    events = oracle_events(records)
    lateness = max_disorder(events) + slack
    counts, late = drive(Session(ms(15)), cut(records, cuts), lateness, grace)
    assert late == []
    expected = session_counts_of(events, gap=15)
    assert counts == sorted((k, start, end, n) for (k, start, end), n in expected.items())


def test_a_record_at_the_watermark_joins_the_session_it_touches() -> None:
    """A reproduction (operators/windowed.py): the lateness (50) is the input's disorder, so
    by the watermark's contract a record exactly 50 behind the latest is in bound. a's record
    at 100, after b's at 150 took the watermark to 100, touches a's session [0, 100) (the
    next record of a that is not more than the gap after the last), and the input alone puts
    both in one session [0, 200). The operator closed [0, 100) when the watermark reached its
    end, and gives two sessions: it should close a session only once the watermark is past
    its end (``end + grace < watermark``), as a record at the watermark may still touch it."""
    records = [("a", 0, 0), ("b", 150, 1), ("a", 100, 2)]
    events = oracle_events(records)
    assert max_disorder(events) == 50
    assert session_counts_of(events, gap=100) == {("a", 0, 200): 2, ("b", 150, 250): 1}
    counts, late = drive(Session(ms(100)), [[r] for r in records], 50, 0)
    assert late == []
    assert counts == [("a", 0, 200, 2), ("b", 150, 250, 1)]


def test_nothing_in_one_batch_is_late_and_each_record_alone_meets_the_watermark_before_it() -> None:
    # hopping [t-40, t+20) windows of 60 every 20; lateness 10, grace 0
    records = [("a", 100, 0), ("a", 150, 1), ("a", 85, 2), ("a", 125, 3)]
    windows = Hopping(ms(60), ms(20))
    counts, late = drive(windows, [records], 10, 0)
    assert late == []  # the watermark has not moved before the one batch
    assert counts == [
        ("a", 40, 100, 1),
        ("a", 60, 120, 2),
        ("a", 80, 140, 3),
        ("a", 100, 160, 3),
        ("a", 120, 180, 2),
        ("a", 140, 200, 1),
    ]
    # batch by batch, 85 comes when the watermark is 150 - 10: its windows [40, 100),
    # [60, 120) and [80, 140) have all closed
    counts, late = drive(windows, [[r] for r in records], 10, 0)
    assert late == [2]
    assert counts == [
        ("a", 60, 120, 1),
        ("a", 80, 140, 1),
        ("a", 100, 160, 3),
        ("a", 120, 180, 2),
        ("a", 140, 200, 1),
    ]
    # 85 and 125 in the batch after 100 alone: the watermark is 90, every window of 85 open
    counts, late = drive(windows, [records[:1], records[1:]], 10, 0)
    assert late == []
    assert counts == drive(windows, [records], 10, 0)[0]


def test_a_session_closed_between_batches_is_not_joined_again() -> None:
    # gap 10, no lateness or grace: b's record at 11 takes the watermark to 11, past a's
    # session [0, 10), which closes once the batch holding it has been processed (at 10 it
    # would stay open: a record at the watermark may still touch its end). a's record at 5
    # then opens [5, 15), touching the closed session: in a later batch it makes a session of
    # its own; in the same batch the session is still open and it merges.
    records = [("a", 0, 0), ("b", 11, 1), ("a", 5, 2)]
    windows = Session(ms(10))
    assert drive(windows, [records], 0, 0) == ([("a", 0, 15, 2), ("b", 11, 21, 1)], [])
    apart = ([("a", 0, 10, 1), ("a", 5, 15, 1), ("b", 11, 21, 1)], [])
    assert drive(windows, [[r] for r in records], 0, 0) == apart
    assert drive(windows, [records[:2], records[2:]], 0, 0) == apart
    # and a record whose session [t, t + 10) is behind the watermark is late
    assert drive(windows, [records[:2], [("a", 0, 3)]], 0, 0) == (apart[0][:1] + apart[0][2:], [3])


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


@pytest.mark.parametrize(("grace", "late"), [(1001, False), (1000, True)])
def test_a_grace_of_1001_milliseconds_keeps_a_window_open_1001_milliseconds(
    grace: int, late: bool, run_one_by_one: Run
) -> None:
    events = [
        {"i": 0, "k": "a", "t": 0},  # [0, 100) closes when the watermark reaches 100 + grace
        {"i": 1, "k": "a", "t": 1100},
        {"i": 2, "k": "a", "t": 50},  # comes when the watermark is 1100: late iff grace <= 1000
    ]
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    pipeline = (
        Pipeline("g")
        .source(source, into=Topic("events"))
        .window("win", Tumbling(ms(100)), grace=ms(grace), idle=SMALL_IDLE)
        .count("agg")
        .sink(connectors.Collect(), step_id="out")
    )
    result = run_one_by_one(pipeline)  # one record per batch: the watermark moves after each
    got = {exact_millis(r.start): r.value for r in result.values("out")}
    late_ids = [orjson.loads(r.value)["i"] for r in result.topic("g.agg.late")]
    if late:
        assert late_ids == [2]
        assert got == {0: 1, 1100: 1}
    else:
        assert late_ids == []
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
