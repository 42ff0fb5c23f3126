"""Shared helpers for the connector tests (a module, not a conftest)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from connectors.base import Source, SourceBatch
from pipelines.batch import Batch
from pipelines.log.base import FetchedBatch, RawBatch

STAMP = 1_700_000_000_000


def make_batch(values: Sequence[Any], keys: Sequence[Any] | None = None) -> Batch:
    """A batch as a sink writer receives it, as if read from topic ``t`` partition 0."""
    count = len(values)
    raw = RawBatch([None] * count, [None] * count, [STAMP] * count)
    fetched = FetchedBatch("t", 0, raw, list(range(100, 100 + count)), 100 + count)
    return Batch(
        list(keys) if keys is not None else [None] * count,
        list(values),
        [STAMP] * count,
        list(range(count)),
        fetched,
    )


async def read_all(source: Source, position: Any = None) -> list[SourceBatch]:
    """Every batch of a source that ends."""
    return [batch async for batch in source.read(position)]


def values_of(batches: Sequence[SourceBatch]) -> list[Any]:
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
