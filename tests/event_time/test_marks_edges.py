"""Edges of what a task knows of its inputs' progress (:class:`InputMarks`), with a clock the
test moves: each expected mark is worked out from the records, markers and clock readings the
test gives (the smallest over inputs; a writer's mark never goes back; quiet for ``idle``
follows the wall clock), never from what the task reported before."""

from __future__ import annotations

import time

import orjson

from event_time.test_input_marks import EXTERNAL, IDLE_MS, INTERNAL, FakeClock
from pipelines.log.base import FetchedBatch, RawBatch, TopicPartition
from pipelines.runtime.watermarks import (
    END_OF_TIME,
    NO_WATERMARK,
    InputMarks,
    SystemClock,
    marker_batch,
    split_markers,
)

WRITERS = frozenset({"0.0", "0.1"})


def both(clock: FakeClock) -> InputMarks:
    return InputMarks(
        {EXTERNAL: (False, frozenset({"source"})), INTERNAL: (True, WRITERS)},
        idle_ms=IDLE_MS,
        clock=clock,
    )


def test_an_input_quiet_for_exactly_idle_follows_the_wall_clock() -> None:
    """Quiet for ``idle`` exactly (not a millisecond more): the mark is the wall clock."""
    clock = FakeClock()
    marks = InputMarks({EXTERNAL: (False, frozenset())}, idle_ms=IDLE_MS, clock=clock)
    marks.observe(EXTERNAL, [100])
    clock.sleep(IDLE_MS // 1000)  # whole seconds: exact in floating point
    assert marks.mark(idle=True) == max(100, clock.wall)


def test_a_writers_mark_never_goes_back_until_it_ended() -> None:
    """Markers of one writer, in order: the mark is the largest so far, except that after the
    end of time a resumed writer starts again from its new marks."""
    marks = InputMarks({INTERNAL: (True, frozenset({"0.0"}))}, idle_ms=IDLE_MS, clock=FakeClock())
    sequence = [900, 800, 950, END_OF_TIME, 300, 200]
    expected: list[int] = []
    known = NO_WATERMARK
    for mark in sequence:
        known = mark if mark > known or known == END_OF_TIME else known
        expected.append(known)
    got = []
    for mark in sequence:
        marks.marked(INTERNAL, [("0.0", mark)])
        got.append(marks.mark(idle=False))
    assert got == expected == [900, 900, 950, END_OF_TIME, 300, 300]


def test_only_an_end_of_time_marker_ends_an_external_input() -> None:
    """A marker below the end of time on an external partition says nothing; markers of a
    partition the task does not read are ignored."""
    marks = InputMarks({EXTERNAL: (False, frozenset({"a"}))}, idle_ms=IDLE_MS, clock=FakeClock())
    marks.observe(EXTERNAL, [100])
    marks.marked(EXTERNAL, [("a", 5000)])
    assert marks.mark(idle=False) == 100
    marks.marked(TopicPartition("other", 3), [("a", END_OF_TIME)])
    assert marks.mark(idle=False) == 100
    marks.marked(EXTERNAL, [("a", END_OF_TIME)])
    assert marks.mark(idle=False) == END_OF_TIME


def test_records_without_event_times_keep_the_mark_and_restart_the_idle_timer() -> None:
    """An empty read (every record was a marker) moves nothing, but the input is not quiet."""
    clock = FakeClock()
    marks = InputMarks({EXTERNAL: (False, frozenset())}, idle_ms=IDLE_MS, clock=clock)
    marks.observe(EXTERNAL, [400])
    clock.sleep(IDLE_MS / 1000 - 1)
    marks.observe(EXTERNAL, [])
    clock.sleep(2)
    assert marks.mark(idle=True) == 400


def test_a_task_without_inputs_has_no_mark() -> None:
    """No input: nothing is known."""
    assert InputMarks({}, idle_ms=IDLE_MS, clock=FakeClock()).mark(idle=True) == NO_WATERMARK


def test_a_new_owner_starts_from_what_was_dumped() -> None:
    """What one owner dumps (through JSON, as committed) and another loads gives the mark the
    observed records and markers give; a partition missing from the state starts unknown."""
    marks = both(FakeClock())
    marks.observe(EXTERNAL, [700, 1200])
    marks.marked(INTERNAL, [("0.0", 900), ("0.1", 1500)])
    state = orjson.loads(orjson.dumps(marks.dump()))

    restored = both(FakeClock())
    restored.load(state)
    assert restored.mark(idle=False) == min(max(700, 1200), 900, 1500)
    assert restored.dump() == state

    restored.marked(INTERNAL, [("0.0", 800)])  # behind what was restored: ignored
    assert restored.mark(idle=False) == 900

    partial = both(FakeClock())
    partial.load({str(INTERNAL): state[str(INTERNAL)]})  # nothing known of the external input
    assert partial.mark(idle=False) == NO_WATERMARK
    partial.observe(EXTERNAL, [600])
    assert partial.mark(idle=False) == 600

    unheard = both(FakeClock())
    unheard.load({str(EXTERNAL): state[str(EXTERNAL)]})  # no writer of the internal input known
    assert unheard.mark(idle=False) == NO_WATERMARK
    unheard.marked(INTERNAL, [("0.0", 300), ("0.1", 400)])
    assert unheard.mark(idle=False) == 300


def test_a_marker_names_its_writer_even_with_a_bar_in_it() -> None:
    """Writer names are whatever the topology gave, ``|`` included; the records left keep the
    partition they were read from."""
    batch = RawBatch([b"k"], [b"v"], [1])
    batch.extend(marker_batch("step|0.1", 1234, 99))
    fetched = FetchedBatch("t", 5, batch, [10, 11], 12)
    records, markers = split_markers(fetched)
    assert markers == [("step|0.1", 1234)]
    assert (records.topic, records.partition) == ("t", 5)
    assert list(records.offsets) == [10]


def test_the_system_wall_clock_is_in_milliseconds_since_the_epoch() -> None:
    """Compared with the interpreter's own clock read around it."""
    before = time.time_ns() // 1_000_000
    now = SystemClock().wall_ms()
    after = time.time_ns() // 1_000_000
    assert before <= now <= after
