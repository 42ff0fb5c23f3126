"""Windowed counts equal a batch computation over the input, whatever the partitions, workers
and batch sizes: the property the watermarks carried through the log exist for.

Events with a bounded disorder ``D`` (JSON, as a file would hold them) are read into a topic of
1, 6 or 12 partitions (each source batch to the next partition, so each partition holds other
stretches of the input), re-keyed by user, cut into tumbling, hopping, sliding or session
windows on the event time ``ts`` (an ISO-8601 string in the file, a datetime in the model) with
``lateness >= D``, and counted. The reference (:mod:`event_time.oracles`) is computed from the
file alone. Nothing may be late, every window is emitted once, final, with the reference count.

The workers (1 or 3, on one event loop) poll few records at a time and checkpoint, so write
watermark markers, every few milliseconds; the source either writes everything before they
start or yields to them every few records. Either way upstream tasks progress through their
stretches at their own pace, and a downstream partition that took one writer's mark for all
would route the others' records late.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import connectors
from event_time.oracles import (
    disordered,
    iso_millis,
    max_disorder,
    user_session_counts,
    window_counts,
)
from operators.windowed import WindowResult
from operators.windows import Hopping, Session, Sliding, Tumbling, Windows
from pipelines import Pipeline, Topic
from pipelines.log.base import TopicPartition
from pipelines.log.memory import MemoryLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watermarks import split_markers

KINDS = ("tumbling", "hopping", "sliding", "session")


class AmountClick(BaseModel):
    id: int
    user: str
    ts: datetime
    amount: int


def windows_of(kind: str, size: int) -> Windows:
    span = timedelta(milliseconds=size)
    if kind == "tumbling":
        return Tumbling(span)
    if kind == "hopping":
        return Hopping(span, timedelta(milliseconds=size // 2))
    if kind == "sliding":
        return Sliding(span, timedelta(milliseconds=size // 4))
    return Session(span)


def expected_counts(kind: str, size: int, events: list[dict[str, Any]]) -> dict[Any, int]:
    if kind == "tumbling":
        return window_counts(events, size=size)
    if kind == "hopping":
        return window_counts(events, size=size, advance=size // 2)
    if kind == "sliding":
        return window_counts(events, size=size, advance=size // 4)
    return user_session_counts(events, gap=size)


def paced(events: list[dict[str, Any]], every: int) -> Callable[[], AsyncIterator[bytes]]:
    """The events as JSON lines, letting the event loop run other tasks every ``every``."""

    async def lines() -> AsyncIterator[bytes]:
        for index, event in enumerate(events):
            if index % every == 0:
                await asyncio.sleep(0)
            yield orjson.dumps(event)

    return lines


def pipeline_for(
    source: connectors.Source, *, kind: str, size: int, partitions: int, lateness: int
) -> tuple[Pipeline, connectors.Collect]:
    out = connectors.Collect()
    pipeline = (
        Pipeline("event-time")
        .source(source, into=Topic("clicks", partitions=partitions, value=AmountClick))
        .key_by("by-user", lambda click: click.user)
        .window(
            "windows",
            windows_of(kind, size),
            time=lambda click: click.ts,
            lateness=timedelta(milliseconds=lateness),
        )
        .count("count")
        .sink(out, step_id="results")
    )
    return pipeline, out


def results_of(out: connectors.Collect) -> dict[Any, int]:
    """Final counts per (user, start, end); fails on a window emitted twice or not final."""
    found: dict[Any, int] = {}
    for result in out.values:
        assert isinstance(result, WindowResult)
        assert result.final
        window = (
            result.key,
            iso_millis(result.start.isoformat()),
            iso_millis(result.end.isoformat()),
        )
        assert window not in found, f"window {window} emitted twice"
        found[window] = result.value
    return found


def topic_values(log: MemoryLog, name: str) -> list[bytes | None]:
    values: list[bytes | None] = []
    for partition in range(log.spec(name).partitions):
        fetched, _ = split_markers(log.read_now(TopicPartition(name, partition), 0, 1 << 62))
        values += fetched.records.values
    return values


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(1, 3000),
    users=st.integers(1, 8),
    step=st.integers(0, 300),
    disorder=st.integers(0, 5_000),
    slack=st.integers(0, 1_000),
    size=st.integers(4, 20).map(lambda n: n * 500),
    kind=st.sampled_from(KINDS),
    partitions=st.sampled_from([1, 6, 12]),
    workers=st.sampled_from([1, 3]),
    batch=st.integers(1, 1000),
    every=st.sampled_from([None, 1, 5, 50]),
    max_batch=st.sampled_from([10, 100, 2000]),
)
def test_windowed_counts_equal_the_batch_computation(
    seed: int,
    count: int,
    users: int,
    step: int,
    disorder: int,
    slack: int,
    size: int,
    kind: str,
    partitions: int,
    workers: int,
    batch: int,
    every: int | None,
    max_batch: int,
) -> None:
    events = disordered(seed, count, users=users, step_ms=step, disorder_ms=disorder)
    assert max_disorder(events) <= disorder
    lines = [orjson.dumps(e) for e in events] if every is None else paced(events, every)
    source = connectors.Iterable(lines, batch_size=batch, max_delay=0.001)
    pipeline, out = pipeline_for(
        source, kind=kind, size=size, partitions=partitions, lateness=disorder + slack
    )
    log = MemoryLog()
    run = run_in_process(
        compile_pipeline(pipeline),
        log,
        workers=workers,
        commit_interval=0.002,
        max_batch=max_batch,
    )
    asyncio.run(run)

    assert topic_values(log, "event-time.count.late") == []
    assert topic_values(log, "event-time.dead-letters") == []
    assert results_of(out) == expected_counts(kind, size, events)
