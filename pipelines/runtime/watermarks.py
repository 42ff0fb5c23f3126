"""Watermarks carried through the log: markers, and what one task knows of its inputs' progress.

Event time is set once, where records enter, and travels as the record timestamp. Progress is
an *event-time mark*: the largest event time a writer has put out, so that (with the disorder
bound a windowed step declares as ``lateness``) nothing it writes later is earlier than the
mark minus the bound. Each event-time step subtracts its own lateness.

- A partition of an **external topic** (a source's topic, a ``LogTopic``) is marked by the
  largest event time read from it. When its source is exhausted, the source writes an
  end-of-time marker to each partition (records after it, from a later run of the source,
  start the partition again). A partition with nothing new for ``idle`` follows
  the wall clock, but only while its worker has nothing to fetch.
- A task that writes to an **internal topic** (a ``key_by`` repartition topic) writes, at each
  checkpoint where its mark moved (and now and then while idle), a marker to every partition of
  that topic, tagged with the writing task. A partition of an internal topic is marked by the
  smallest mark over every upstream task the topology says writes it; one that has said nothing
  yet holds the partition back.
- A task's mark is the smallest over its input partitions. What it knows of them is part of
  its state (:data:`MARKS_STORE`, with a changelog like any store): a new owner of the task,
  after a crash or a rebalance, starts from what was committed, so it needs neither the
  markers before its committed offsets nor records it has not read yet.

A marker is a record with no value whose key starts with :data:`MARKER_PREFIX`; it goes through
the outbox (and so the same transaction as the outputs under exactly-once), is committed like
any record, and is never seen by a step, a sink or a count.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from operators._timing import END_OF_TIME, NO_WATERMARK
from pipelines.log.base import FetchedBatch, RawBatch, TopicPartition

__all__ = [
    "END_OF_TIME",
    "MARKER_PREFIX",
    "MARKS_STORE",
    "NO_WATERMARK",
    "Clock",
    "InputMarks",
    "SystemClock",
    "is_marker_batch",
    "marker_batch",
    "split_markers",
]

MARKER_PREFIX = b"\x00headwater.watermark\x00"
MARKS_STORE = "~marks"
"""The store of each task's :class:`InputMarks` (no step id can start with ``~``)."""


class Clock(Protocol):
    """Where a task reads time: injected in tests, the system's clocks otherwise."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for idle timers)."""
        ...

    def wall_ms(self) -> int:
        """Milliseconds since the epoch (what an idle input's mark follows)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


def marker_batch(writer: str, mark: int, now_ms: int) -> RawBatch:
    """One marker record saying ``writer`` has put out everything up to event time ``mark``."""
    key = MARKER_PREFIX + f"{writer}|{mark}".encode()
    return RawBatch([key], [None], [now_ms])


def is_marker(key: bytes | None, value: bytes | None) -> bool:
    """Whether the record with this key and value is a watermark marker."""
    return value is None and key is not None and key.startswith(MARKER_PREFIX)


def is_marker_batch(raw: RawBatch) -> bool:
    """Whether ``raw`` may hold markers (a C-level scan for a missing value)."""
    return None in raw.values


def split_markers(fetched: FetchedBatch) -> tuple[FetchedBatch, list[tuple[str, int]]]:
    """The records of ``fetched`` without its markers, and the markers as (writer, mark)."""
    raw = fetched.records
    markers: list[tuple[str, int]] = []
    kept: list[int] = []
    for index, (key, value) in enumerate(zip(raw.keys, raw.values, strict=True)):
        if is_marker(key, value):
            assert key is not None
            writer, _, mark = key[len(MARKER_PREFIX) :].decode().rpartition("|")
            markers.append((writer, int(mark)))
        else:
            kept.append(index)
    if not markers:
        return fetched, markers
    offsets = fetched.offsets
    records = FetchedBatch(
        fetched.topic,
        fetched.partition,
        raw.take(kept),
        [offsets[i] for i in kept],
        fetched.next_offset,
    )
    return records, markers


@dataclass(slots=True)
class _External:
    """An external partition: the largest event time read, and when records last came."""

    writers: frozenset[str]
    high: int = NO_WATERMARK
    last_arrival: float | None = None  # None: the first idle check starts the timer
    ended: set[str] = field(default_factory=set)

    def mark(self, clock: Clock, idle_ms: int, idle: bool) -> int:
        if self.writers and self.ended >= self.writers:
            return END_OF_TIME
        if not idle:
            return self.high
        now = clock.monotonic()
        if self.last_arrival is None:
            self.last_arrival = now
        if (now - self.last_arrival) * 1000 < idle_ms:
            return self.high
        return max(self.high, clock.wall_ms())


@dataclass(slots=True)
class _Internal:
    """An internal partition: the latest mark of each upstream writer."""

    writers: frozenset[str]
    marks: dict[str, int] = field(default_factory=dict)

    def mark(self) -> int:
        marks = self.marks
        if len(marks) < len(self.writers):
            return NO_WATERMARK
        return min(marks.values())


class InputMarks:
    """What one task knows of its inputs' progress (see the module docstring).

    ``inputs`` maps each input partition to the writers the topology knows for it and whether
    its topic is internal (written by upstream tasks) or external (records read from it carry
    the event time; ``writers`` there are the source steps that end it).
    """

    def __init__(
        self,
        inputs: Mapping[TopicPartition, tuple[bool, frozenset[str]]],
        *,
        idle_ms: int,
        clock: Clock,
    ) -> None:
        self.idle_ms = idle_ms
        self.clock = clock
        self._external: dict[TopicPartition, _External] = {}
        self._internal: dict[TopicPartition, _Internal] = {}
        for tp, (internal, writers) in inputs.items():
            if internal:
                self._internal[tp] = _Internal(writers)
            else:
                self._external[tp] = _External(writers)

    def is_internal(self, tp: TopicPartition) -> bool:
        return tp in self._internal

    def observe(self, tp: TopicPartition, stamps: Iterable[int]) -> None:
        """Records with event times ``stamps`` came from external partition ``tp``."""
        external = self._external.get(tp)
        if external is None:
            return
        external.last_arrival = self.clock.monotonic()
        external.ended.clear()  # records after an end: its source was resumed with more input
        high = max(stamps, default=NO_WATERMARK)
        external.high = max(external.high, high)

    def marked(self, tp: TopicPartition, markers: Iterable[tuple[str, int]]) -> int | None:
        """Markers read from ``tp``, in order; the lowest mark an upstream writer that had
        ended went back to (its sources resumed), if one did."""
        internal = self._internal.get(tp)
        resumed: int | None = None
        for writer, mark in markers:
            if internal is not None:
                known = internal.marks.get(writer, NO_WATERMARK)
                # a writer's mark never goes back, but after an end its sources may resume
                if writer in internal.writers and (mark > known or known == END_OF_TIME):
                    internal.marks[writer] = mark
                    if known == END_OF_TIME and mark < END_OF_TIME:
                        resumed = mark if resumed is None else min(resumed, mark)
                continue
            external = self._external.get(tp)
            if external is not None and mark >= END_OF_TIME:
                external.ended.add(writer)
        return resumed

    def dump(self) -> dict[str, list[object]]:
        """What a restarted owner of the task needs to know (JSON): per input partition, the
        largest event time read and the sources that ended it, or each writer's mark."""
        state: dict[str, list[object]] = {}
        for tp, external in self._external.items():
            state[str(tp)] = [external.high, sorted(external.ended)]
        for tp, internal in self._internal.items():
            state[str(tp)] = [dict(internal.marks)]
        return state

    def load(self, state: Mapping[str, list[object]] | None) -> None:
        """Start from what :meth:`dump` gave, where the task was last committed."""
        if not state:
            return
        for tp, external in self._external.items():
            high, ended = state.get(str(tp), [NO_WATERMARK, []])
            external.high = max(external.high, int(high))  # type: ignore[call-overload]
            external.ended.update(ended)  # type: ignore[arg-type]
        for tp, internal in self._internal.items():
            (marks,) = state.get(str(tp), [{}])
            for writer, mark in marks.items():  # type: ignore[attr-defined]
                if writer in internal.writers:
                    internal.marks[writer] = max(mark, internal.marks.get(writer, NO_WATERMARK))

    def mark(self, *, idle: bool) -> int:
        """The smallest mark over every input; ``idle``: the worker has nothing to fetch, so
        an external partition quiet for ``idle_ms`` follows the wall clock."""
        marks = [e.mark(self.clock, self.idle_ms, idle) for e in self._external.values()]
        marks += [i.mark() for i in self._internal.values()]
        return min(marks, default=NO_WATERMARK)
