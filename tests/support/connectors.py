"""Driving a connector by hand, as the runtime drives it: batches as a sink writer receives
them, writers started as the runtime starts them, and what a source reads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from connectors.base import Sink, SinkContext, SinkWriter, Source, SourceBatch
from pipelines.batch import Batch
from pipelines.log.base import FetchedBatch, RawBatch

__all__ = ["STAMP", "Follower", "read_to_end", "sink_batch", "started", "values_of"]

STAMP = 1_700_000_000_000
"""The event time of every record of :func:`sink_batch`."""


def sink_batch(
    values: Sequence[Any],
    keys: Sequence[Any] | None = None,
    *,
    first: int = 100,
    origins: Sequence[int] | None = None,
    topic: str = "t",
    partition: int = 0,
) -> Batch:
    """A batch as a sink writer receives it, read from ``topic`` ``partition`` at offsets
    ``first...``. ``origins`` maps each value to the record it came from (several values of one
    record: a flat_map; -1: made on a timer), one record each by default."""
    origins = list(origins) if origins is not None else list(range(len(values)))
    count = max(origins, default=-1) + 1
    raw = RawBatch([None] * count, [None] * count, [STAMP] * count)
    fetched = FetchedBatch(topic, partition, raw, list(range(first, first + count)), first + count)
    return Batch(
        list(keys) if keys is not None else [None] * len(values),
        list(values),
        [STAMP] * len(values),
        origins,
        fetched,
    )


async def started(sink: Sink, context: SinkContext) -> SinkWriter:
    """A writer of ``sink`` in ``context``, started as the runtime starts it."""
    writer = sink.open(context)
    await writer.start()
    return writer


async def read_to_end(source: Source, position: Any = None) -> list[SourceBatch]:
    """Every batch of a source that ends."""
    return [batch async for batch in source.read(position)]


def values_of(batches: Sequence[SourceBatch]) -> list[Any]:
    """The values of ``batches``, in order."""
    return [value for batch in batches for value in batch.values]


class Follower:
    """Reads a following source in a task, collecting its batches."""

    def __init__(self, source: Source, position: Any = None) -> None:
        self.batches: list[SourceBatch] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(source, position))
        self._task.add_done_callback(lambda _: self._changed.set())

    async def _run(self, source: Source, position: Any) -> None:
        async for batch in source.read(position):
            self.batches.append(batch)
            self._changed.set()

    @property
    def values(self) -> list[Any]:
        return values_of(self.batches)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        """The values, once at least ``count`` have arrived (fails after ``timeout`` s)."""

        async def until() -> None:
            while len(self.values) < count:
                if self._task.done():
                    self._task.result()
                    raise AssertionError(f"source ended with {len(self.values)} values")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)
        return self.values

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
