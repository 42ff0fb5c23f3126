"""A running count per key, exactly once, for ``notebooks/exactly-once-and-crashes.ipynb``.

    headwater run examples/notebooks/running_counts.py --workers 2

Reads numbered events ``{"n": ..., "key": ...}`` from ``events.jsonl`` (``COUNTS_INPUT``
overrides it) into the 6-partition topic ``events``, re-keys them by ``key`` (through the
repartition topic ``running-counts.by-key``), counts each key's events and writes each new
count to the 3-partition topic ``counts``, keyed by the key. With
``processing_guarantee="exactly_once"`` the reads, the state changes and the writes of a
batch commit together, so after any crash the counts a key has on ``counts``, in offset
order, are exactly 1, 2, ..., N: a gap would be a lost event, a repeat a duplicated one.

For the notebook's crash test the source can be slowed down: when ``COUNTS_GATE`` names a
file, the source sleeps ``PACE`` seconds after each batch and holds once it has read
``HOLD`` of its file, until that file exists. Without it the source reads at full speed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import connectors
from connectors.base import Position, SourceBatch
from pipelines import Pipeline, Topic

EVENTS = os.environ.get("COUNTS_INPUT", "data/events.jsonl")
GATE = os.environ.get("COUNTS_GATE")
PACE = 0.05
HOLD = 0.8
COUNTS = Topic("counts", partitions=3)


class PacedJsonLines(connectors.JsonLines):
    """JSON Lines read slowly until the file ``gate`` exists (see the module docstring)."""

    def __init__(self, path: str, gate: str, **options: int) -> None:
        super().__init__(path, **options)
        self.gate = Path(gate)

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        size = self.path.stat().st_size
        async for batch in super().read(position):
            yield batch
            if self.gate.exists():
                continue
            await asyncio.sleep(PACE)
            while batch.position >= HOLD * size and not self.gate.exists():  # type: ignore[operator]
                await asyncio.sleep(0.02)


source = (
    connectors.JsonLines(EVENTS, batch_size=500)
    if GATE is None
    else PacedJsonLines(EVENTS, GATE, batch_size=500)
)
pipeline = (
    Pipeline("running-counts", processing_guarantee="exactly_once")
    .source(source, into=Topic("events", partitions=6))
    .key_by("by-key", lambda event: event["key"])
    .count("count")
    .sink(connectors.LogTopic(COUNTS))
)
