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
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE_MS = 1_780_000_000_000  # a fixed time in 2026, so results do not depend on the clock

WindowCounts = dict[tuple[str, int, int], int]


def iso(millis: int) -> str:
    return (EPOCH + timedelta(milliseconds=millis)).isoformat()


def iso_millis(text: str) -> int:
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
    """How far (ms) the latest event is ahead of a later one, at worst: the bound that holds
    (``ts``: ISO-8601 or epoch milliseconds)."""
    worst, high = 0, None
    for event in events:
        stamp = event["ts"] if isinstance(event["ts"], int) else iso_millis(event["ts"])
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
        for start, end in fixed_windows(iso_millis(event["ts"]), size, advance or size):
            counts[(event["user"], start, end)] += 1
    return dict(counts)


def user_session_counts(events: Iterable[dict[str, Any]], *, gap: int) -> WindowCounts:
    """Events per (user, session start, session end): a user's events sorted by time, a new
    session whenever an event comes after the end of the last (last event + ``gap``)."""
    times: dict[str, list[int]] = defaultdict(list)
    for event in events:
        times[event["user"]].append(iso_millis(event["ts"]))
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


# -- forgetting: dedupe and aggregate ttl= -------------------------------------------------------
#
# A keyed step forgets by its task's event-time mark, which the runtime moves between batches and
# which is never ahead of the largest event time read before a record (the mark is a smallest
# over writers that each put out no more than they read). So where ``newest`` (the largest event
# time before a record, in input order) is less than a horizon past what the step remembers, the
# step cannot have forgotten it, in any layout; where it is more, the step *may* have. The
# references below forget as soon as that is possible; a test gives them input where what may be
# forgotten surely is (it holds the input back until every task has read past it).


def newest_before(records: Sequence[tuple[Any, int]]) -> list[int | None]:
    """For each ``(key, event time)`` record, the largest event time before it in the input
    (None for the first)."""
    out: list[int | None] = []
    newest: int | None = None
    for _, stamp in records:
        out.append(newest)
        newest = stamp if newest is None else max(newest, stamp)
    return out


def dedupe_passes(records: Sequence[tuple[Any, int]], horizon: int) -> list[int]:
    """The positions of the ``(key, event time)`` records that pass a dedupe with ``horizon``
    (ms), taken in input order: a record passes unless a record of its key that passed is less
    than ``horizon`` from it in event time; a passed record is forgotten once the largest event
    time before a record is ``horizon`` or more past it."""
    passed: dict[Any, list[int]] = defaultdict(list)
    out: list[int] = []
    for position, ((key, stamp), newest) in enumerate(
        zip(records, newest_before(records), strict=True)
    ):
        if newest is not None:
            passed[key] = [s for s in passed[key] if newest < s + horizon]
        if all(abs(stamp - s) >= horizon for s in passed[key]):
            passed[key].append(stamp)
            out.append(position)
    return out


def ttl_counts(records: Sequence[tuple[Any, int]], ttl: int) -> list[int]:
    """The count a ``count(ttl=ttl)`` emits for each ``(key, event time)`` record, in input
    order: a key's count restarts when the largest event time before its record is ``ttl`` or
    more past the latest event time of the key's records counted so far."""
    counts: dict[Any, int] = {}
    latest: dict[Any, int] = {}
    out: list[int] = []
    for (key, stamp), newest in zip(records, newest_before(records), strict=True):
        if key in latest and newest is not None and newest >= latest[key] + ttl:
            del counts[key], latest[key]
        counts[key] = counts.get(key, 0) + 1
        latest[key] = max(latest.get(key, stamp), stamp)
        out.append(counts[key])
    return out
