"""Records beyond the declared bound go to the late-data topic, and exactly those.

The input is a stream with a bounded disorder ``D`` and a window lateness ``>= D``, into which
the source injects, mid-stream, records for windows that have already been emitted: one per
window, at the window's start, for the window's key. A window is emitted only once every
upstream writer has passed its end by the lateness, so some record before the injected one in
the input is later than it by more than the lateness: the injected record is beyond the bound,
as the input alone says. Every injected record must be on the late-data topic, nothing else may
be, and the counts must equal the batch computation over the input without them, for every
layout of partitions and workers.

Sessions are left out: a session record is late when no session it could join is open, which
is not a property of a window emitted before it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connectors
from event_time.oracles import disordered, iso, iso_millis, max_disorder
from event_time.test_windows_any_layout import (
    expected_counts,
    pipeline_for,
    results_of,
    topic_values,
)
from operators.windowed import WindowResult
from pipelines.log.memory import MemoryLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline

EVENTS = 1_200
WAIT_S = 20.0  # for the first windows to close while the source holds the rest back
LATE = "event-time.count.late"


class LateWindowInjector:
    """The input as JSON lines: the first part, then, once windows have been emitted, one
    record for each of up to ``late`` of them, then the rest."""

    def __init__(self, events: list[dict[str, Any]], *, late: int) -> None:
        self.events, self.late = events, late
        self.out = connectors.Collect()
        """The sink whose results say which windows were emitted."""
        self.injected: list[dict[str, Any]] = []

    @property
    def order(self) -> list[dict[str, Any]]:
        """The input in the order the source gave it."""
        half = len(self.events) // 2
        return [*self.events[:half], *self.injected, *self.events[half:]]

    async def lines(self) -> AsyncIterator[bytes]:
        half = len(self.events) // 2
        for index, event in enumerate(self.events[:half]):
            if index % 10 == 0:
                await asyncio.sleep(0)
            yield orjson.dumps(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not self.out.values:
            assert loop.time() < deadline, f"no window emitted in {WAIT_S:.0f} s"
            await asyncio.sleep(0.005)
        for number, result in enumerate(self.out.values[: self.late]):
            assert isinstance(result, WindowResult)
            event = {
                "id": len(self.events) + number,
                "user": result.key,
                "ts": iso(iso_millis(result.start.isoformat())),
                "amount": 0,
            }
            self.injected.append(event)
            yield orjson.dumps(event)
        for event in self.events[half:]:
            yield orjson.dumps(event)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**32),
    users=st.integers(1, 6),
    disorder=st.integers(0, 3_000),
    slack=st.integers(0, 1_000),
    size=st.integers(4, 12).map(lambda n: n * 500),
    kind=st.sampled_from(["tumbling", "hopping", "sliding"]),
    partitions=st.sampled_from([1, 6, 12]),
    workers=st.sampled_from([1, 3]),
    batch=st.integers(1, 40),
    late=st.integers(1, 5),
)
def test_records_beyond_the_bound_go_late_and_only_they(
    seed: int,
    users: int,
    disorder: int,
    slack: int,
    size: int,
    kind: str,
    partitions: int,
    workers: int,
    batch: int,
    late: int,
) -> None:
    # 60 s of event time: windows close while the source holds the second half back
    events = disordered(seed, EVENTS, users=users, step_ms=50, disorder_ms=disorder)
    assert max_disorder(events) <= disorder
    injector = LateWindowInjector(events, late=late)
    source = connectors.Iterable(injector.lines, batch_size=batch, max_delay=0.001)
    pipeline, injector.out = pipeline_for(
        source, kind=kind, size=size, partitions=partitions, lateness=disorder + slack
    )
    log = MemoryLog()
    run = run_in_process(
        compile_pipeline(pipeline), log, workers=workers, commit_interval=0.002, max_batch=100
    )
    asyncio.run(run)

    assert injector.injected, "nothing was injected"
    assert max_disorder(injector.order) > disorder + slack, "the injected records are in bound"
    went_late = Counter(orjson.loads(v or b"null")["id"] for v in topic_values(log, LATE))
    assert went_late == Counter(e["id"] for e in injector.injected)
    assert topic_values(log, "event-time.dead-letters") == []
    assert results_of(injector.out) == expected_counts(kind, size, events)
