"""In-memory connectors: :class:`Iterable` feeds a pipeline from Python values, :class:`Collect`
gathers what reaches a sink into lists. Both are meant for tests, notebooks and small jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from collections.abc import Iterable as AnyIterable
from datetime import datetime
from itertools import islice
from typing import Any, TypeAlias

from connectors.base import (
    Position,
    Sink,
    SinkContext,
    SinkWriter,
    Source,
    SourceBatch,
    int_position,
)
from pipelines.batch import Batch
from pipelines.errors import ConnectorError
from pipelines.record import Record, to_millis

__all__ = ["Collect", "Iterable"]

Items: TypeAlias = (
    AnyIterable[Any]
    | AsyncIterable[Any]
    | Callable[[], AnyIterable[Any]]
    | Callable[[], AsyncIterable[Any]]
)
"""What :class:`Iterable` reads: an iterable, an async iterable, or a zero-arg callable that
returns a fresh one each time it is called."""

KeyFn: TypeAlias = Callable[[Any], Any]
TimestampFn: TypeAlias = Callable[[Any], "datetime | int"]


class Iterable(Source):
    """A source that reads the values of an iterable, a generator or an async iterable.

    ``items`` is one of:

    * a re-iterable collection (a list, a tuple...): read from the start on every ``read``;
    * a zero-argument callable returning a fresh iterable or async iterable (e.g. a generator
      function): called on every ``read``, so the input can be produced again on replay;
    * a one-shot iterator (a generator object, an async generator object, ``iter(...)``): it
      can be read **once**; a second ``read`` on the same object raises
      :class:`~pipelines.errors.ConnectorError`, because the items it skipped are gone.

    **Position** is the number of items emitted so far. ``read(position)`` skips that many
    items from the start of the (fresh) input, so resuming emits neither a duplicate nor a gap
    *provided the input yields the same items in the same order each time*. With a one-shot
    iterator that holds only in a new process that rebuilds it the same way.

    Each value becomes one record. ``key`` maps a value to its key; ``timestamp`` maps a value
    to its event time, a tz-aware :class:`~datetime.datetime` or milliseconds since the epoch
    (without it the runtime stamps records with the time of reading). Items that are
    :class:`~pipelines.record.Record` instances carry their own key, value and timestamp, and
    ``key`` / ``timestamp`` are not applied to them.

    Batches hold at most ``batch_size`` items. A synchronous iterable is read in the event
    loop, so a generator that blocks (on a socket, a sleep...) blocks the runner: use an async
    iterable for live input. An async iterable is pumped concurrently, and a partial batch is
    emitted once its first item has waited ``max_delay`` seconds, so a slow feed is not held
    back until ``batch_size`` items arrive.

    Guarantee: at-least-once, like every source: a crash after a batch reached the log but
    before its position was stored replays that one batch.
    """

    name = "iterable"

    def __init__(
        self,
        items: Items,
        *,
        batch_size: int = 1000,
        key: KeyFn | None = None,
        timestamp: TimestampFn | None = None,
        max_delay: float = 0.1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not (isinstance(items, AnyIterable | AsyncIterable) or callable(items)):
            raise TypeError(
                f"Iterable needs an iterable, an async iterable or a zero-argument callable "
                f"returning one, got {type(items).__name__}"
            )
        self.items = items
        self.batch_size = batch_size
        self.key = key
        self.timestamp = timestamp
        self.max_delay = max_delay
        self._one_shot_read = False

    def __repr__(self) -> str:
        return f"Iterable({type(self.items).__name__}, batch_size={self.batch_size})"

    # -- reading ---------------------------------------------------------------------------

    def _open(self) -> AnyIterable[Any] | AsyncIterable[Any]:
        items = self.items
        if not isinstance(items, AnyIterable | AsyncIterable):
            items = items()
            if not isinstance(items, AnyIterable | AsyncIterable):
                raise ConnectorError(
                    f"the callable given to Iterable returned {type(items).__name__}; "
                    "it must return an iterable or an async iterable"
                )
            return items
        one_shot = (
            iter(items) is items if isinstance(items, AnyIterable) else items.__aiter__() is items
        )
        if one_shot:
            if self._one_shot_read:
                raise ConnectorError(
                    "this Iterable source wraps a one-shot iterator (a generator or iterator "
                    "object) that was already read, so it cannot be read again from a "
                    "position; pass a list or a zero-argument callable (e.g. the generator "
                    "function itself) that returns a fresh iterable"
                )
            self._one_shot_read = True
        return items

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of the items after the first ``position`` ones (see the class docstring)."""
        done = int_position(position, "an Iterable source", "a count of items")
        items = self._open()
        batches = (
            self._read_async(items, done)
            if isinstance(items, AsyncIterable)
            else self._read_sync(items, done)
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield batch

    async def _read_sync(
        self, items: AnyIterable[Any], done: int
    ) -> AsyncGenerator[SourceBatch, None]:
        iterator = iter(items)
        if done and sum(1 for _ in islice(iterator, done)) < done:
            return  # the input is shorter than the position: everything was emitted
        size = self.batch_size
        while chunk := list(islice(iterator, size)):
            done += len(chunk)
            yield self._batch(chunk, done)
            await asyncio.sleep(0)  # let the rest of the runner breathe between batches

    async def _read_async(
        self, items: AsyncIterable[Any], done: int
    ) -> AsyncGenerator[SourceBatch, None]:
        pump = _Pump(items, skip=done, size=self.batch_size)
        try:
            while chunk := await pump.take(self.max_delay):
                done += len(chunk)
                yield self._batch(chunk, done)
        finally:
            await pump.stop()

    def _batch(self, chunk: list[Any], position: int) -> SourceBatch:
        try:
            return self._columns(chunk, position)
        except ConnectorError:
            raise
        except Exception as error:
            raise ConnectorError(
                f"the key or timestamp function of an Iterable source raised "
                f"{type(error).__name__}: {error}"
            ) from error

    def _columns(self, chunk: list[Any], position: int) -> SourceBatch:
        key, stamp = self.key, self.timestamp
        if not any(isinstance(item, Record) for item in chunk):
            keys = None if key is None else [key(v) for v in chunk]
            stamps = None if stamp is None else [_millis(stamp(v)) for v in chunk]
            return SourceBatch(chunk, position, keys, stamps)
        now = int(time.time() * 1000)
        values: list[Any] = []
        keys_out: list[Any] = []
        stamps_out: list[int] = []
        for item in chunk:
            if isinstance(item, Record):
                values.append(item.value)
                keys_out.append(item.key)
                stamps_out.append(_millis(item.timestamp))
            else:
                values.append(item)
                keys_out.append(None if key is None else key(item))
                stamps_out.append(now if stamp is None else _millis(stamp(item)))
        return SourceBatch(values, position, keys_out, stamps_out)


class _Pump:
    """Reads an async iterable in a task into a buffer of at most one batch."""

    def __init__(self, items: AsyncIterable[Any], *, skip: int, size: int) -> None:
        self.buffer: list[Any] = []
        self.size = size
        self.arrived = asyncio.Event()  # the buffer got its first item, or the input ended
        self.full = asyncio.Event()  # the buffer holds a whole batch, or the input ended
        self.room = asyncio.Event()  # a batch was taken: reading may go on
        self.task = asyncio.create_task(self._run(items, skip))

    async def _run(self, items: AsyncIterable[Any], skip: int) -> None:
        buffer, size = self.buffer, self.size
        try:
            async for item in items:
                if skip:
                    skip -= 1
                    continue
                buffer.append(item)
                if len(buffer) == 1:
                    self.arrived.set()
                if len(buffer) >= size:
                    self.full.set()
                    self.room.clear()
                    await self.room.wait()
        finally:
            self.arrived.set()
            self.full.set()

    async def take(self, max_delay: float) -> list[Any]:
        """The next batch: a full one, or what came within ``max_delay`` of its first item;
        empty when the input has ended (re-raising what the input raised)."""
        buffer, task = self.buffer, self.task
        self.arrived.clear()
        if not buffer and not task.done():
            await self.arrived.wait()
        if buffer and len(buffer) < self.size and not task.done():
            self.full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), max_delay)
        if not buffer:
            error = task.exception()  # the task is done: the input ended
            if error is not None:
                raise error
            return []
        chunk = buffer[: self.size]
        del buffer[: self.size]
        self.room.set()
        return chunk

    async def stop(self) -> None:
        """Stop reading the input."""
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def _millis(when: datetime | int) -> int:
    if isinstance(when, datetime):
        try:
            return to_millis(when)
        except ValueError as error:
            raise ConnectorError(f"bad timestamp from an Iterable source: {error}") from error
    if isinstance(when, int) and not isinstance(when, bool):
        return when
    raise ConnectorError(
        f"the timestamp function of an Iterable source returned {type(when).__name__} "
        f"{when!r}; return a tz-aware datetime or milliseconds since the epoch (int)"
    )


class Collect(Sink):
    """A sink that collects what reaches it into lists: for tests and notebooks.

    Every writer this sink opens appends to the same lists, **in the process that holds this
    object**: with the in-process runtime (memory or embedded log, workers as tasks) the lists
    fill up as batches arrive. Worker *processes* get a copy of the sink, and what they collect
    stays in them.

    * :attr:`values`: the values, in arrival order;
    * :attr:`keys`: the keys, aligned with :attr:`values`;
    * :attr:`records`: the whole :class:`~pipelines.record.Record` objects (key, value, event
      time, headers, and the topic, partition and offset they were read from).

    Writes land immediately; ``flush`` does nothing. Nothing is durable, and a worker that
    replays batches after a restart appends those records again (at-least-once), so tests of
    crash recovery should compare sets, or deduplicate by ``(topic, partition, offset)``.
    """

    name = "collect"

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.keys: list[Any] = []
        self.records: list[Record] = []

    def __repr__(self) -> str:
        return f"Collect({len(self.values)} values)"

    def __len__(self) -> int:
        return len(self.values)

    def clear(self) -> None:
        """Forget everything collected so far."""
        self.values.clear()
        self.keys.clear()
        self.records.clear()

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer that appends to this sink's lists."""
        return _CollectWriter(self)


class _CollectWriter(SinkWriter):
    __slots__ = ("_sink",)

    def __init__(self, sink: Collect) -> None:
        self._sink = sink

    def write(self, batch: Batch) -> None:
        sink = self._sink
        sink.values.extend(batch.values)
        sink.keys.extend(batch.keys)
        sink.records.extend(batch.records())

    async def flush(self) -> None:
        """Nothing to do: writes are already visible."""
