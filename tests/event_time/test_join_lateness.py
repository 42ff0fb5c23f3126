"""The stream-stream join with a small grace: records beyond the bound go to the late-data topic
``<pipeline>.<step>.late``, exactly those, whatever the partitions, workers and batch sizes, and
the pairs equal the input-only reference over the rest.

Two streams of disorder ``D``, each read into a topic of 1, 6 or 12 partitions and re-keyed by
user, are left-joined with ``within=W`` and a grace ``G >= D`` (milliseconds to a few seconds).
The join's watermark is the smallest event-time mark over every upstream writer of both sides;
a record is late when its time plus ``G`` is behind it. No record of the streams is: the
watermark never passes the largest time before a record in its own stream, at most ``D`` ahead of
it. The injected ones are, by construction:

- One side is read whole; the other (the *injecting* side) gives its first half, then holds the
  rest back until the join has emitted a left record alone: ``(left, None)`` comes out once the
  join's watermark for the left record's key is past ``left.time + W + G``.
- The injecting side then gives, for each of up to ``late`` such results, a record of the left
  record's user at the left record's time, ``t``. The join task of that user has a watermark past
  ``t + W + G``, and never goes back: ``t + G`` is behind it, the record is late.

Every left stream has a user of its own (``solo``) that no right record has, every tenth record
from the start, so left records expire alone while the first half is read. Event times are in
2100, later than the wall clock, which an input quiet for ``idle`` would otherwise follow.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import connectors
from event_time.test_joins_and_dedupe_any_layout import (
    join_reference,
    run_layout,
    side_events,
    timed_source,
)
from event_time.test_windows_any_layout import topic_values
from pipelines import Pipeline, Topic

FUTURE_MS = 4_102_444_800_000  # 2100-01-01
EVENTS = 300  # per side, 100 ms apart: 30 s of event time, 15 s in the first half
STEP = 100
WAIT_S = 20.0  # for a left record to expire alone while the injecting side holds back
LATE = "join.pairs.late"


class LateLeftInjector:
    """One side's records as a source: the first half, then, once ``out`` has a left record
    emitted alone, a record at the time of each of up to ``late`` of them, then the rest."""

    def __init__(
        self, side: list[dict[str, Any]], lefts: list[dict[str, Any]], *, late: int
    ) -> None:
        self.side, self.late = side, late
        self.lefts = {e["id"]: e for e in lefts}
        self.out = connectors.Collect()
        self.injected: list[dict[str, Any]] = []

    async def records(self) -> AsyncIterator[dict[str, Any]]:
        half = len(self.side) // 2
        for index, event in enumerate(self.side[:half]):
            if index % 10 == 0:
                await asyncio.sleep(0)
            yield event
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not (alone := [left for left, right in self.out.values if right is None]):
            assert loop.time() < deadline, f"no left record expired in {WAIT_S:.0f} s"
            await asyncio.sleep(0.002)
        for number, left_id in enumerate(alone[: self.late]):
            left = self.lefts[left_id]
            event = {"id": f"x{number}", "user": left["user"], "ts": left["ts"]}
            self.injected.append(event)
            yield event
        for event in self.side[half:]:
            yield event


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    # no shrinking: each step costs a run, and hypothesis gives up shrinking only after 5
    # minutes, the tests' timeout; a failure reports the example as generated
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    seed=st.integers(0, 2**32),
    users=st.integers(1, 6),
    disorder=st.integers(0, 2_000),
    slack=st.integers(0, 500),
    within=st.integers(0, 1_000),
    injecting=st.sampled_from(["left", "right"]),
    late=st.integers(1, 5),
    partitions=st.sampled_from([1, 6, 12]),
    workers=st.sampled_from([1, 3]),
    # at most 12 a batch: the first half of the injecting side (150 records, each source
    # batch to the next partition) reaches every one of up to 12 partitions, so every
    # upstream writer of that side has a mark
    batch=st.integers(1, 12),
    max_batch=st.sampled_from([10, 100, 2000]),
)
def test_records_beyond_the_grace_go_late_and_only_they(
    seed: int,
    users: int,
    disorder: int,
    slack: int,
    within: int,
    injecting: str,
    late: int,
    partitions: int,
    workers: int,
    batch: int,
    max_batch: int,
) -> None:
    """Joined pairs (and left records alone) equal
    :func:`~event_time.test_joins_and_dedupe_any_layout.join_reference` over the two streams
    without the injected records; the late-data topic holds the injected records, exactly."""
    rng = random.Random(seed)
    left = side_events(rng, "l", EVENTS, users=users, step=STEP, disorder=disorder)
    right = side_events(rng, "r", EVENTS, users=users, step=STEP, disorder=disorder)
    for event in [*left, *right]:
        event["ts"] += FUTURE_MS
    for event in left[::10]:
        event["user"] = "solo"
    injector = LateLeftInjector(left if injecting == "left" else right, left, late=late)
    sides = {"left": left, "right": right}
    items = {name: injector.records if name == injecting else sides[name] for name in sides}

    lefts = Pipeline("join").source(
        timed_source(items["left"], batch, max_delay=0.001),
        into=Topic("lefts", partitions=partitions),
    )
    rights = lefts.source(
        timed_source(items["right"], batch, max_delay=0.001),
        into=Topic("rights", partitions=partitions),
    )
    pipeline = (
        lefts.key_by("left-by-user", lambda e: e["user"])
        .join_stream(
            "pairs",
            rights.key_by("right-by-user", lambda e: e["user"]),
            timedelta(milliseconds=within),
            lambda a, b: (a["id"], None if b is None else b["id"]),
            how="left",
            grace=timedelta(milliseconds=disorder + slack),
        )
        .sink(injector.out, step_id="out")
    )
    log = run_layout(pipeline, workers=workers, max_batch=max_batch)

    assert injector.injected, "nothing was injected"
    went_late = Counter(orjson.loads(v or b"null")["id"] for v in topic_values(log, LATE))
    assert went_late == Counter(e["id"] for e in injector.injected)
    assert topic_values(log, "join.dead-letters") == []
    pairs = Counter(tuple(v) for v in injector.out.values)
    assert pairs == join_reference(left, right, within, "left")
