"""Window assignment against the definitions, and the watermark of a windowed aggregation against
a reference that moves it between batches (which records are late, what each window finally
holds)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support.times import exact_millis, ms

import connectors
from operators.windows import Hopping, Session, Sliding, Tumbling, Window, Windows
from pipelines import Pipeline, Topic
from pipelines.log.memory import MemoryLog
from pipelines.partitioner import partition_for
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.steps import SinkStep
from pipelines.testing import TestResult

stamps = st.integers(min_value=-(10**13), max_value=10**13)
spans = st.integers(min_value=1, max_value=10**7)


def reference_windows(timestamp: int, size: int, advance: int) -> list[Window]:
    """Every window [k * advance, k * advance + size) that holds ``timestamp``, by brute force
    over the candidate starts around it."""
    lowest = (timestamp - size) // advance - 2
    highest = timestamp // advance + 2
    return [
        Window(k * advance, k * advance + size)
        for k in range(lowest, highest + 1)
        if k * advance <= timestamp < k * advance + size
    ]


# -- durations ---------------------------------------------------------------------------------


@given(spans)
def test_window_sizes_are_the_declared_milliseconds(millis: int) -> None:
    assert Tumbling(ms(millis)).size == millis
    hopping = Hopping(ms(millis), ms(millis))
    assert (hopping.size, hopping.advance) == (millis, millis)
    sliding = Sliding(ms(2 * millis), ms(millis))
    assert (sliding.size, sliding.advance) == (2 * millis, millis)
    assert Session(ms(millis)).gap == millis


def test_a_window_of_1001_milliseconds_is_1001_milliseconds_long() -> None:
    assert Tumbling(ms(1001)).assign(0) == [Window(0, 1001)]
    assert Tumbling(seconds=1.001).assign(1001) == [Window(1001, 2002)]
    assert Session(ms(2003)).assign(7) == [Window(7, 2010)]
    assert sorted(Hopping(ms(2002), ms(1001)).assign(0)) == [Window(-1001, 1001), Window(0, 2002)]


def test_non_positive_spans_and_an_advance_beyond_the_size_are_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        Tumbling(ms(0))
    with pytest.raises(ValueError, match="gap"):
        Session(ms(-5))
    with pytest.raises(ValueError, match="advance"):
        Hopping(ms(10), ms(11))
    with pytest.raises(ValueError, match="advance"):
        Sliding(ms(10), ms(0))


# -- assignment ----------------------------------------------------------------------------------


@given(spans, stamps)
def test_tumbling_assigns_the_one_aligned_window_holding_the_timestamp(
    size: int, timestamp: int
) -> None:
    windows = Tumbling(ms(size))
    assigned = windows.assign(timestamp)
    assert assigned == reference_windows(timestamp, windows.size, windows.size)
    (window,) = assigned
    assert window.start <= timestamp < window.end
    assert window.end - window.start == windows.size
    assert window.start % windows.size == 0


@pytest.mark.parametrize("kind", [Hopping, Sliding])
@given(advance=spans, extra=st.integers(0, 10**6), timestamp=stamps)
def test_overlapping_windows_are_exactly_those_of_the_definition(
    kind: type[Hopping], advance: int, extra: int, timestamp: int
) -> None:
    size = advance + extra % (40 * advance + 1)  # at most 41 windows per timestamp
    windows = kind(ms(size), ms(advance))
    assigned = windows.assign(timestamp)
    assert sorted(assigned) == reference_windows(timestamp, windows.size, windows.advance)
    assert len(set(assigned)) == len(assigned)
    for window in assigned:
        assert window.start <= timestamp < window.end
        assert window.end - window.start == windows.size
        assert window.start % windows.advance == 0
    quotient, remainder = divmod(windows.size, windows.advance)
    if remainder == 0:
        assert len(assigned) == quotient
    else:
        assert len(assigned) in (quotient, quotient + 1)


# spans that convert to milliseconds exactly: this checks assignment alone (the conversion of
# durations has its own tests above)
exact_advances = st.one_of(st.integers(1, 50), st.integers(1, 3600).map(lambda s: s * 1000))


@pytest.mark.parametrize("kind", [Hopping, Sliding])
@given(advance=exact_advances, ratio=st.integers(1, 20), timestamp=stamps)
def test_a_size_that_is_a_multiple_of_the_advance_gives_size_over_advance_windows(
    kind: type[Hopping], advance: int, ratio: int, timestamp: int
) -> None:
    windows = kind(ms(advance * ratio), ms(advance))
    assigned = windows.assign(timestamp)
    assert len(assigned) == ratio
    starts = sorted(w.start for w in assigned)
    assert starts == [starts[0] + i * advance for i in range(ratio)]


def test_negative_timestamps_are_assigned_like_any_other() -> None:
    assert Tumbling(ms(10)).assign(-1) == [Window(-10, 0)]
    assert Tumbling(ms(10)).assign(-10) == [Window(-10, 0)]
    assert Tumbling(ms(10)).assign(-11) == [Window(-20, -10)]
    assert sorted(Hopping(ms(10), ms(5)).assign(-1)) == [Window(-10, 0), Window(-5, 5)]
    assert sorted(Sliding(ms(10), ms(5)).assign(-5)) == [Window(-10, 0), Window(-5, 5)]
    assert Session(ms(10)).assign(-3) == [Window(-3, 7)]


@given(spans, stamps)
def test_a_session_record_opens_the_window_from_its_timestamp_to_the_gap(
    gap: int, timestamp: int
) -> None:
    session = Session(ms(gap))
    assert session.merging
    assert session.assign(timestamp) == [Window(timestamp, timestamp + session.gap)]


# -- the watermark, batch by batch --------------------------------------------------------------

WINDOW_KINDS: dict[str, Windows] = {
    "tumbling": Tumbling(ms(50)),
    "hopping": Hopping(ms(60), ms(20)),
    "sliding": Sliding(ms(45), ms(30)),
}

Batches = list[list[dict[str, Any]]]


def reference_run(
    batches: Batches, windows: Windows, lateness: int, grace: int
) -> tuple[set[int], dict[tuple[str, int, int], int]]:
    """The ids of the late records, and the count of each (key, start, end) over the others,
    for one task fed ``batches``.

    The watermark moves between batches only: before a batch it is the largest event time of
    the batches before it minus ``lateness`` (none before the first). A record is late iff every
    window holding it has ``end + grace <= watermark``; a record that is not late counts in its
    windows that are still open."""
    late: set[int] = set()
    counts: Counter[tuple[str, int, int]] = Counter()
    newest: int | None = None
    for batch in batches:
        watermark = None if newest is None else newest - lateness
        for event in batch:
            t = event["t"]
            open_windows = [
                w for w in windows.assign(t) if watermark is None or w.end + grace > watermark
            ]
            if not open_windows:
                late.add(event["i"])
            for window in open_windows:
                counts[(event["k"], window.start, window.end)] += 1
        stamps = [e["t"] for e in batch] + ([] if newest is None else [newest])
        newest = max(stamps, default=None)
    return late, dict(counts)


def windowed_count(
    events: list[dict[str, Any]],
    windows: Windows,
    lateness: int,
    grace: int,
    *,
    partitions: int = 1,
    idle: timedelta = timedelta(seconds=0.2),
) -> Pipeline:
    source = connectors.Iterable(events, key=lambda v: v["k"], timestamp=lambda v: v["t"])
    return (
        Pipeline("wm")
        .source(source, into=Topic("events", partitions=partitions))
        .window(
            "win",
            windows,
            lateness=ms(lateness),
            grace=ms(grace),
            idle=idle,
            emit="close",
        )
        .count("counts")
        .sink(connectors.Collect(), step_id="out")
    )


def reference_by_partition(
    events: list[dict[str, Any]], windows: Windows, lateness: int, grace: int, partitions: int
) -> tuple[set[int], dict[tuple[str, int, int], int]]:
    """:func:`reference_run` for each partition's task, fed its records one per batch in
    arrival order (what workers polling one record at a time give it, ``conftest.py``): a
    task's watermark follows its own partition only, since every record is read from the
    source's topic (no repartition). Keys are placed as the source places them (Kafka's
    partitioner over the key's UTF-8 bytes, the topic's default key serde)."""
    late: set[int] = set()
    counts: dict[tuple[str, int, int], int] = {}
    for partition in range(partitions):
        mine = [e for e in events if partition_for(e["k"].encode(), partitions) == partition]
        part_late, part_counts = reference_run([[e] for e in mine], windows, lateness, grace)
        late |= part_late
        counts |= part_counts  # a key is on one partition: the windows do not overlap
    return late, counts


event_lists = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 600)),
    min_size=1,
    max_size=40,
)
cases = st.fixed_dictionaries(
    {
        "drawn": event_lists,
        "kind": st.sampled_from(sorted(WINDOW_KINDS)),
        "lateness": st.sampled_from([0, 25, 80]),
        "grace": st.sampled_from([0, 15]),
        "partitions": st.sampled_from([1, 3, 6]),
        "workers": st.sampled_from([1, 2]),
    }
)
CASES_PER_EXAMPLE = 4


async def run_case(case: dict[str, Any]) -> None:
    """One generated case: the pipeline run with workers polling one record at a time,
    compared with :func:`reference_by_partition`."""
    events = [{"i": i, "k": k, "t": t} for i, (k, t) in enumerate(case["drawn"])]
    windows = WINDOW_KINDS[case["kind"]]
    lateness, grace, partitions = case["lateness"], case["grace"], case["partitions"]
    expected_late, expected_counts = reference_by_partition(
        events, windows, lateness, grace, partitions
    )
    # event times in 1970: an input quiet for ``idle`` while its worker has nothing to fetch
    # would follow the wall clock and close everything, so no input is taken for quiet here
    pipeline = windowed_count(
        events, windows, lateness, grace, partitions=partitions, idle=timedelta(seconds=30)
    )
    last = pipeline.steps[-1]
    assert isinstance(last, SinkStep) and isinstance(last.sink, connectors.Collect)
    out = last.sink
    log = MemoryLog()
    await run_in_process(compile_pipeline(pipeline), log, workers=case["workers"], max_batch=1)
    result = TestResult(sinks={"out": out}, log=log, pipeline=pipeline)

    late = [orjson.loads(record.value) for record in result.topic("wm.counts.late")]
    assert sorted(v["i"] for v in late) == sorted(expected_late), case
    emitted = result.values("out")
    got = {(r.key, exact_millis(r.start), exact_millis(r.end)): r.value for r in emitted}
    assert len(got) == len(emitted), "a window was emitted more than once"
    assert all(r.final for r in emitted)
    assert got == expected_counts, case


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    # no shrinking: each step would cost a run (0.2 s), and hypothesis gives up shrinking only
    # after 5 minutes, the tests' timeout; the failing case is in the assertion's message
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(st.lists(cases, min_size=CASES_PER_EXAMPLE, max_size=CASES_PER_EXAMPLE))
def test_late_records_and_final_counts_follow_the_watermark_before_each_batch(
    drawn_cases: list[dict[str, Any]],
) -> None:
    """Which records are late and what each window finally counts, for 100 generated cases
    (25 examples of 4) over 1, 3 or 6 partitions and 1 or 2 workers, equal
    :func:`reference_by_partition`, computed from the records, the windows, the lateness and
    the grace. Workers poll one record at a time (``max_batch=1``), so each task gets its
    partition's records one per batch, in the order they were written, and the watermark
    moves after each: the batches are known from the input.

    A run spends about 0.2 s waiting on the runtime's poll timeouts and almost no CPU, so an
    example runs its 4 cases on 4 memory logs at once, on one event loop: 100 cases in a few
    seconds where 100 runs one after the other would take 20."""

    async def run_all() -> None:
        await asyncio.gather(*(run_case(case) for case in drawn_cases))

    asyncio.run(run_all())


def test_the_reference_judges_a_batch_against_the_watermark_before_it() -> None:
    # the same records, late or not depending on the batches they come in
    events = [{"i": 0, "k": "a", "t": 100}, {"i": 1, "k": "a", "t": 200}]
    windows = Tumbling(ms(50))
    assert reference_run([events], windows, 0, 0) == (
        set(),
        {("a", 100, 150): 1, ("a", 200, 250): 1},
    )
    assert reference_run([events[1:], events[:1]], windows, 0, 0) == (
        {0},
        {("a", 200, 250): 1},
    )
    # lateness 51: the watermark is 149 after the batch of 200, and [100, 150) is still open
    assert reference_run([events[1:], [], events[:1]], windows, 51, 0) == (
        set(),
        {("a", 100, 150): 1, ("a", 200, 250): 1},
    )
    assert reference_run([events[1:], [], events[:1]], windows, 50, 0)[0] == {0}


def test_an_example_of_late_and_partly_late_records(
    run_one_by_one: Callable[..., TestResult],
) -> None:
    # hopping [t-40, t+20) windows of 60 every 20; lateness 10, grace 0; one record per batch
    events = [
        {"i": 0, "k": "a", "t": 100},  # windows [60,120) [80,140) [100,160)
        {"i": 1, "k": "a", "t": 150},  # the watermark after its batch: 140
        {"i": 2, "k": "a", "t": 85},  # [40,100) [60,120) closed; [80,140) closes at 140: late
        {"i": 3, "k": "a", "t": 125},  # [80,140) closed; [100,160) [120,180) still open
    ]
    windows = Hopping(ms(60), ms(20))
    result = run_one_by_one(windowed_count(events, windows, lateness=10, grace=0))
    late = [orjson.loads(record.value)["i"] for record in result.topic("wm.counts.late")]
    assert late == [2]
    got = {(exact_millis(r.start), exact_millis(r.end)): r.value for r in result.values("out")}
    assert got == {(60, 120): 1, (80, 140): 1, (100, 160): 3, (120, 180): 2, (140, 200): 1}
    assert reference_run([[e] for e in events], windows, 10, 0)[0] == {2}
    # in one batch nothing is late: the watermark only moves after it
    assert reference_run([events], windows, 10, 0)[0] == set()
