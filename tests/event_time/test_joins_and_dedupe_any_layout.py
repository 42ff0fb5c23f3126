"""The windowed stream-stream join and dedupe equal references computed from the input alone,
whatever the partitions, workers and batch sizes (the companion of
:mod:`event_time.test_windows_any_layout`).

- **Join**: two streams with a bounded disorder ``D``, each read into a topic of 1, 6 or 12
  partitions and re-keyed by user, joined with ``within=W`` and ``grace >= D``. The reference
  is every pair of a left and a right event of one user whose event times differ by at most
  ``W`` (and, for ``how="left"``, each left event with no such partner, alone).
- **Dedupe**: a stream of events, each sent one to four times, the copies up to ``D`` behind
  in the input, deduplicated by event id with a horizon above ``D``. The reference is each
  event once.

Event times are set by the source (``timestamp=``), in milliseconds.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections import Counter
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connectors
from event_time.oracles import BASE_MS, max_disorder
from event_time.test_windows_any_layout import topic_values
from pipelines import Pipeline, Topic
from pipelines.log.memory import MemoryLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline

LAYOUTS = {
    "partitions": st.sampled_from([1, 6, 12]),
    "workers": st.sampled_from([1, 3]),
    "batch": st.integers(1, 500),
    "max_batch": st.sampled_from([10, 100, 2000]),
}
EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def side_events(
    rng: random.Random, side: str, count: int, *, users: int, step: int, disorder: int
) -> list[dict[str, Any]]:
    """``count`` events whose times advance ``step`` ms per event, each up to ``disorder`` ms
    early."""
    return [
        {
            "id": f"{side}{i}",
            "user": f"u{rng.randrange(users)}",
            "ts": BASE_MS + i * step - rng.randint(0, disorder),
        }
        for i in range(count)
    ]


def run_layout(pipeline: Pipeline, *, workers: int, max_batch: int) -> MemoryLog:
    log = MemoryLog()
    asyncio.run(
        run_in_process(
            compile_pipeline(pipeline),
            log,
            workers=workers,
            commit_interval=0.002,
            max_batch=max_batch,
        )
    )
    return log


def timed_source(events: Any, batch: int, max_delay: float = 0.1) -> connectors.Iterable:
    """``events`` (a list, or a callable giving an async iterator) in batches of ``batch``, each
    at the time of its ``ts``."""
    return connectors.Iterable(
        events, batch_size=batch, timestamp=lambda e: e["ts"], max_delay=max_delay
    )


# -- the join --------------------------------------------------------------------------------------


def join_reference(
    left: list[dict[str, Any]], right: list[dict[str, Any]], within: int, how: str
) -> Counter[tuple[str, str | None]]:
    pairs: Counter[tuple[str, str | None]] = Counter()
    for a in left:
        partners = [
            b["id"] for b in right if b["user"] == a["user"] and abs(a["ts"] - b["ts"]) <= within
        ]
        pairs.update((a["id"], b) for b in partners)
        if how == "left" and not partners:
            pairs[(a["id"], None)] += 1
    return pairs


@EXAMPLES
@given(
    seed=st.integers(0, 2**32),
    counts=st.tuples(st.integers(0, 400), st.integers(0, 400)),
    users=st.integers(1, 6),
    step=st.integers(0, 200),
    disorder=st.integers(0, 3_000),
    slack=st.integers(0, 500),
    within=st.integers(0, 2_000),
    how=st.sampled_from(["inner", "left"]),
    **LAYOUTS,
)
def test_stream_join_equals_the_pairs_of_the_input(
    seed: int,
    counts: tuple[int, int],
    users: int,
    step: int,
    disorder: int,
    slack: int,
    within: int,
    how: str,
    partitions: int,
    workers: int,
    batch: int,
    max_batch: int,
) -> None:
    rng = random.Random(seed)
    left = side_events(rng, "l", counts[0], users=users, step=step, disorder=disorder)
    right = side_events(rng, "r", counts[1], users=users, step=step, disorder=disorder)
    out = connectors.Collect()
    lefts = Pipeline("join").source(
        timed_source(left, batch), into=Topic("lefts", partitions=partitions)
    )
    rights = lefts.source(timed_source(right, batch), into=Topic("rights", partitions=partitions))
    pipeline = (
        lefts.key_by("left-by-user", lambda e: e["user"])
        .join_stream(
            "pairs",
            rights.key_by("right-by-user", lambda e: e["user"]),
            timedelta(milliseconds=within),
            lambda a, b: (a["id"], None if b is None else b["id"]),
            how=how,  # type: ignore[arg-type]
            grace=timedelta(milliseconds=disorder + slack),
        )
        .sink(out, step_id="out")
    )
    log = run_layout(pipeline, workers=workers, max_batch=max_batch)

    assert topic_values(log, "join.pairs.late") == []
    assert topic_values(log, "join.dead-letters") == []
    assert Counter(tuple(v) for v in out.values) == join_reference(left, right, within, how)


# -- dedupe ----------------------------------------------------------------------------------------


def with_copies(
    rng: random.Random, events: list[dict[str, Any]], disorder: int
) -> list[dict[str, Any]]:
    """Each event one to four times: every copy at a random place after the original where no
    event before it is more than ``disorder`` ahead of it (copies never raise the largest time
    seen, so the input keeps its bound)."""
    highest: list[int] = []  # highest[j]: the largest time among events[:j + 1]
    for event in events:
        highest.append(max(event["ts"], highest[-1]) if highest else event["ts"])
    inserts: dict[int, list[dict[str, Any]]] = {}  # copies placed after events[j]
    for i, event in enumerate(events):
        last = bisect.bisect_right(highest, event["ts"] + disorder) - 1
        for _ in range(rng.randint(0, 3)):
            inserts.setdefault(rng.randint(i, max(i, last)), []).append(event)
    out: list[dict[str, Any]] = []
    for j, event in enumerate(events):
        out.append(event)
        out += inserts.get(j, [])
    return out


@EXAMPLES
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 1500),
    step=st.integers(0, 200),
    disorder=st.integers(0, 3_000),
    slack=st.integers(1, 1_000),
    **LAYOUTS,
)
def test_dedupe_keeps_each_event_once(
    seed: int,
    count: int,
    step: int,
    disorder: int,
    slack: int,
    partitions: int,
    workers: int,
    batch: int,
    max_batch: int,
) -> None:
    rng = random.Random(seed)
    events = side_events(rng, "e", count, users=1, step=step, disorder=disorder)
    copied = with_copies(rng, events, disorder)
    assert max_disorder(copied) <= disorder
    out = connectors.Collect()
    pipeline = (
        Pipeline("dedupe")
        .source(timed_source(copied, batch), into=Topic("events", partitions=partitions))
        .dedupe("once", timedelta(milliseconds=disorder + slack), key=lambda e: e["id"])
        .sink(out, step_id="out")
    )
    log = run_layout(pipeline, workers=workers, max_batch=max_batch)

    assert topic_values(log, "dedupe.dead-letters") == []
    assert Counter(v["id"] for v in out.values) == Counter(e["id"] for e in events)
