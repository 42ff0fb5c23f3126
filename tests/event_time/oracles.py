"""Input-only references for event-time results: plain Python over the input records, knowing
nothing of partitions, workers, batches or the log.

An input is a list of events in arrival (file) order, each ``{"id", "user", "ts", "amount"}``
with ``ts`` an ISO-8601 string. :func:`disordered` makes such streams with a known bound on
disorder: no event comes more than ``disorder_ms`` earlier in event time than any event before
it in the file.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE_MS = 1_780_000_000_000  # a fixed time in 2026, so results do not depend on the clock

WindowCounts = dict[tuple[str, int, int], int]


def iso(millis: int) -> str:
    return (EPOCH + timedelta(milliseconds=millis)).isoformat()


def millis(text: str) -> int:
    return (datetime.fromisoformat(text) - EPOCH) // timedelta(milliseconds=1)


def disordered(
    seed: int, count: int, *, users: int, step_ms: int, disorder_ms: int
) -> list[dict[str, Any]]:
    """``count`` events whose event times advance ``step_ms`` per event on average and each
    come up to ``disorder_ms`` early: event ``i`` is at ``BASE + i * step - U(0, disorder)``,
    so an event is never more than ``disorder_ms`` behind one that came before it."""
    rng = random.Random(seed)
    events = []
    for i in range(count):
        stamp = BASE_MS + i * step_ms - rng.randint(0, disorder_ms)
        events.append(
            {"id": i, "user": f"u{rng.randrange(users)}", "ts": iso(stamp), "amount": i % 7}
        )
    return events


def max_disorder(events: Iterable[dict[str, Any]]) -> int:
    """How far (ms) the latest event is ahead of a later one, at worst: the bound that holds."""
    worst, high = 0, None
    for event in events:
        stamp = millis(event["ts"])
        if high is not None:
            worst = max(worst, high - stamp)
        high = stamp if high is None else max(high, stamp)
    return worst


def fixed_windows(stamp: int, size: int, advance: int) -> list[tuple[int, int]]:
    """The windows ``[start, start + size)`` with ``start`` a multiple of ``advance`` that hold
    ``stamp``."""
    first = (stamp - size) // advance + 1
    last = stamp // advance
    return [(k * advance, k * advance + size) for k in range(first, last + 1)]


def window_counts(
    events: Iterable[dict[str, Any]], *, size: int, advance: int | None = None
) -> WindowCounts:
    """Events per (user, window start, window end) for tumbling (``advance`` = ``size``) or
    hopping/sliding windows."""
    counts: WindowCounts = defaultdict(int)
    for event in events:
        for start, end in fixed_windows(millis(event["ts"]), size, advance or size):
            counts[(event["user"], start, end)] += 1
    return dict(counts)


def session_counts(events: Iterable[dict[str, Any]], *, gap: int) -> WindowCounts:
    """Events per (user, session start, session end): a user's events sorted by time, a new
    session whenever an event comes after the end of the last (last event + ``gap``)."""
    times: dict[str, list[int]] = defaultdict(list)
    for event in events:
        times[event["user"]].append(millis(event["ts"]))
    counts: WindowCounts = {}
    for user, stamps in times.items():
        stamps.sort()
        start, last, n = stamps[0], stamps[0], 1
        for stamp in stamps[1:]:
            if stamp > last + gap:
                counts[(user, start, last + gap)] = n
                start, n = stamp, 0
            last = stamp
            n += 1
        counts[(user, start, last + gap)] = n
    return counts
