"""Edge cases of windows, watermarks, TTL and dedupe, driven by hand one operator at a time.

Each test compares what an operator emits, sends late, rejects or forgets with what plain Python
over the test's own records says, given the operator's parameters (window size, grace, gap,
horizon, ttl). These pin down the boundaries a mutation run found unchecked: a window closing
exactly at ``end + grace``, the watermark kept after the end of time, state restored into a
new owner of the task, and records without a key or without an event time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from support.operators import Keyed, rejected_values, send_keyed
from support.times import exact_millis

from operators._timing import TIME, watermark
from operators.aggregations import Count
from operators.stateful import Aggregate, Dedupe, EventTime
from operators.windowed import EmitMode, WindowedAggregate, WindowResult
from operators.windows import Session, Tumbling, Windows
from pipelines.state.store import KeyValueStore
from pipelines.testing import OperatorHarness


def window_operator(
    windows: Windows,
    *,
    grace: int = 0,
    emit: EmitMode = "close",
    store: KeyValueStore | None = None,
) -> OperatorHarness:
    """A count of step ``agg`` over ``windows`` driven by hand (on ``store``, if given)."""
    return OperatorHarness(
        lambda: WindowedAggregate(
            "agg", windows, Count(), emit=emit, grace_ms=grace, lateness_ms=0
        ),
        store=store,
    )


def finals(results: list[Any]) -> set[tuple[Any, int, int, int]]:
    out = set()
    for result in results:
        assert isinstance(result, WindowResult)
        assert result.final is True
        out.add((result.key, exact_millis(result.start), exact_millis(result.end), result.value))
    return out


def tumbling_counts(records: list[Keyed], size: int) -> set[tuple[Any, int, int, int]]:
    """The reference: (key, start, end, count) of every tumbling window of ``records``."""
    counts: dict[tuple[Any, int, int], int] = {}
    for key, t, _ in records:
        start = t - t % size
        counts[key, start, start + size] = counts.get((key, start, start + size), 0) + 1
    return {(k, s, e, n) for (k, s, e), n in counts.items()}


def session_reference(records: list[Keyed], gap: int) -> set[tuple[Any, int, int, int]]:
    """The reference: (key, start, end, count) of every session of ``records`` (each record
    opens ``[t, t + gap)``; windows that overlap or touch merge)."""
    out = set()
    for key in {k for k, _, _ in records}:
        times = sorted(t for k, t, _ in records if k == key)
        start, end, count = times[0], times[0] + gap, 1
        for t in times[1:]:
            if t <= end:
                end, count = max(end, t + gap), count + 1
            else:
                out.add((key, start, end, count))
                start, end, count = t, t + gap, 1
        out.add((key, start, end, count))
    return out


# -- windows --------------------------------------------------------------------------------------


def test_tumbling_size_in_minutes_and_seconds_adds_both() -> None:
    """``Tumbling(minutes=, seconds=)``: the window boundaries the two together give."""
    size = (1 * 60 + 30) * 1000
    windows = Tumbling(minutes=1, seconds=30)
    assert windows.size == size
    for t in (0, size - 1, size, 5 * size + 7):
        start = t - t % size
        assert [(w.start, w.end) for w in windows.assign(t)] == [(start, start + size)]


def test_a_window_closes_when_the_watermark_reaches_exactly_its_end_plus_grace() -> None:
    """Final results emitted as the mark reaches each ``end + grace``, compared with the
    tumbling counts of the records whose windows end at or before that."""
    size, grace = 100, 20
    records: list[Keyed] = [("a", 10, 1), ("a", 99, 2), ("b", 150, 3)]
    operator = window_operator(Tumbling(timedelta(milliseconds=size)), grace=grace)
    assert send_keyed(operator, records).values == []
    expected = tumbling_counts(records, size)
    emitted: set[tuple[Any, int, int, int]] = set()
    for mark in (size + grace - 1, size + grace, 2 * size + grace - 1, 2 * size + grace):
        emitted |= finals(operator.advance(mark).values)
        assert emitted == {c for c in expected if c[2] + grace <= mark}, mark
    assert operator.pending == 0


def test_after_the_end_of_time_exactly_the_closed_windows_are_late() -> None:
    """After the end of time a step keeps the watermark that makes what it closed late: a
    later run's record in a closed window goes late, one in a new window counts. Compared with
    the windows of the records and ``end + grace``."""
    size, grace = 100, 20
    first: list[Keyed] = [("a", 50, 1)]
    operator = window_operator(Tumbling(timedelta(milliseconds=size)), grace=grace)
    send_keyed(operator, first)
    assert finals(operator.finish().values) == tumbling_counts(first, size)
    closed_until = max(t - t % size + size + grace for _, t, _ in first)
    assert watermark(operator.state(TIME)) == closed_until

    # a later run goes on with newer input: the sources resumed; its step keeps the store
    later = window_operator(
        Tumbling(timedelta(milliseconds=size)), grace=grace, store=operator.store
    )
    again: list[Keyed] = [("a", 60, 2), ("a", 150, 3)]
    late = [v for _, t, v in again if t - t % size + size + grace <= closed_until]
    counted = [r for r in again if r[2] not in late]
    assert late == [2]
    send_keyed(later, again)
    assert [r.value for r in later.late] == late
    assert finals(later.finish().values) == tumbling_counts(counted, size)


def test_a_new_owner_closes_the_fixed_windows_it_restored() -> None:
    """Windows opened by one operator and restored into another (same store, as after a
    crash or a rebalance) close when the new one's watermark passes them: compared with the
    tumbling counts of the records."""
    size = 100
    records: list[Keyed] = [("a", 10, 1), ("b", 20, 2), ("a", 130, 3)]
    store = KeyValueStore("agg", 0)
    before = window_operator(Tumbling(timedelta(milliseconds=size)), store=store)
    before.advance(0)  # the watermark entry comes first in the store
    send_keyed(before, records)

    after = window_operator(Tumbling(timedelta(milliseconds=size)), store=store)
    assert after.pending == len(tumbling_counts(records, size))
    got = finals(after.advance(size).values)
    assert got == {c for c in tumbling_counts(records, size) if c[2] <= size}
    got |= finals(after.finish().values)
    assert got == tumbling_counts(records, size)


def test_a_new_owner_merges_a_record_into_the_session_it_restored() -> None:
    """A record that touches a restored session joins it: the final sessions compared with
    the sessions plain Python computes over all the records."""
    gap = 100
    first: list[Keyed] = [("a", 0, 1), ("a", 50, 2), ("b", 1000, 3)]
    then: list[Keyed] = [("a", 120, 4), ("b", 1100, 5)]
    store = KeyValueStore("agg", 0)
    before = window_operator(Session(timedelta(milliseconds=gap)), store=store)
    before.advance(0)
    send_keyed(before, first)

    after = window_operator(Session(timedelta(milliseconds=gap)), store=store)
    send_keyed(after, then)
    got = finals(after.finish().values)
    assert got == session_reference(first + then, gap)
    assert after.late == []


def test_a_record_without_a_key_is_rejected_and_the_rest_of_its_batch_counts() -> None:
    """The keyless record is rejected (naming the step and its record); the counts are those
    of the keyed records only."""
    size = 100
    records: list[Keyed] = [("a", 10, 1), (None, 20, 2), ("a", 30, 3), ("b", 40, 4)]
    operator = window_operator(Tumbling(timedelta(milliseconds=size)))
    send_keyed(operator, records)
    assert rejected_values(operator) == [v for k, _, v in records if k is None]
    got = finals(operator.finish().values)
    assert got == tumbling_counts([r for r in records if r[0] is not None], size)


def test_updates_are_keyed_by_the_record_key_and_not_final() -> None:
    """``emit="update"``: one update per record, keyed and timestamped like its window, its
    value the count so far; compared with a running count over the records."""
    size = 100
    records: list[Keyed] = [("a", 10, 1), ("b", 20, 2), ("a", 30, 3)]
    operator = window_operator(Tumbling(timedelta(milliseconds=size)), emit="update")
    out = send_keyed(operator, records)
    so_far: dict[Any, int] = {}
    expected = []
    for key, t, _ in records:
        so_far[key] = so_far.get(key, 0) + 1
        expected.append((key, t - t % size + size, so_far[key]))
    assert [
        (k, t, r.value) for k, t, r in zip(out.keys, out.timestamps, out.values, strict=True)
    ] == (expected)
    assert [r.key for r in out.values] == out.keys
    assert all(r.final is False for r in out.values)


# -- dedupe and ttl after a restore ---------------------------------------------------------------


def test_a_restored_dedupe_forgets_on_a_watermark_that_comes_before_any_batch() -> None:
    """A new owner told a mark before its first batch forgets every passed record the mark is
    a horizon beyond: a repeat of a forgotten one passes, of a remembered one does not."""
    horizon = 1000
    first: list[Keyed] = [("a", 0, 1), ("b", 500, 2)]
    store = KeyValueStore("dedupe", 0)
    before = OperatorHarness(Dedupe("dedupe", horizon), store=store)
    assert send_keyed(before, first).values == [1, 2]

    mark = 1000
    after = OperatorHarness(Dedupe("dedupe", horizon), store=store)
    assert len(after.advance(mark)) == 0
    remembered = [(k, t) for k, t, _ in first if mark < t + horizon]
    assert {k for k, _ in store.items()} == {k for k, _ in remembered}
    repeats: list[Keyed] = [("a", 400, 3), ("b", 900, 4)]
    passed = [
        v for k, t, v in repeats if all(abs(t - s) >= horizon for j, s in remembered if j == k)
    ]
    assert send_keyed(after, repeats).values == passed == [3]


def _ttl_counts(records: list[Keyed], ttl: int, marks: dict[int, int]) -> list[int]:
    """The reference counts: a key's count restarts once a mark (given before the record at
    that position) has passed its latest record by ``ttl``."""
    latest: dict[Any, int] = {}
    count: dict[Any, int] = {}
    out = []
    for position, (key, t, _) in enumerate(records):
        if position in marks:
            for k in [k for k, last in latest.items() if last <= marks[position] - ttl]:
                del latest[k], count[k]
        latest[key] = max(t, latest.get(key, t))
        count[key] = count.get(key, 0) + 1
        out.append(count[key])
    return out


def test_a_restored_ttl_aggregate_goes_on_counting_and_forgets_on_a_first_watermark() -> None:
    """Counts with a ttl across a handover to a new owner (same store), which is told a mark
    before its first batch: compared with a running count that restarts a key once the mark
    has passed its latest record by the ttl."""
    ttl = 1000
    records: list[Keyed] = [("a", 0, 1), ("b", 500, 2), ("a", 100, 3), ("a", 1200, 4)]
    records += [("b", 1300, 5)]
    mark_before = {3: 1100}  # after the handover, before the record at position 3
    expected = _ttl_counts(records, ttl, mark_before)

    store = KeyValueStore("count", 0)
    owner = OperatorHarness(Aggregate("count", Count(), ttl_ms=ttl), store=store)
    got = send_keyed(owner, records[:2]).values

    # a restore: the store, nothing else
    owner = OperatorHarness(Aggregate("count", Count(), ttl_ms=ttl), store=store)
    got += send_keyed(owner, records[2:3]).values

    # a second handover, a mark first
    owner = OperatorHarness(Aggregate("count", Count(), ttl_ms=ttl), store=store)
    assert len(owner.advance(mark_before[3])) == 0
    got += send_keyed(owner, records[3:]).values
    assert got == expected == [1, 1, 2, 1, 2]


# -- event time -----------------------------------------------------------------------------------


def test_records_whose_event_time_fails_are_rejected_and_the_others_keep_theirs() -> None:
    """The records whose ``time`` function raises are rejected (naming the step), the others
    pass with the event time the function gives: compared with the function over the values."""
    values: list[dict[str, int]] = [{"t": 5}, {}, {"t": 7}, {"u": 1}]
    step = OperatorHarness(EventTime("time", lambda value: value["t"]))
    out = send_keyed(step, [("k", 0, v) for v in values])
    assert out.values == [v for v in values if "t" in v]
    assert out.timestamps == [v["t"] for v in values if "t" in v]
    assert rejected_values(step) == [v for v in values if "t" not in v]
