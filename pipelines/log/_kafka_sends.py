"""Handing record batches to aiokafka's producer without waiting for the broker.

What paces a producer that awaits ``send_batch``: aiokafka keeps at most one batch per
partition in its accumulator and at most one produce request in flight per broker. A batch
waits in the accumulator until the request in flight is answered, and ``send_batch`` for a
partition that still has one waiting there blocks until it leaves; a batch left open also
lingers ``linger_ms`` first. A worker that awaited each send therefore waited for a broker
round trip (or a linger) about every other poll, with its CPU idle.

So a :class:`Sends` queues what is sent, per partition, and returns at once. One task per
partition with something queued (started by the send that finds none running) hands the
partition's whole queue to aiokafka as few *closed* record batches as fit (aiokafka sends a
closed batch as soon as the connection is free: a closed batch does not linger); while it
waits for aiokafka to take them, what is sent meanwhile queues up and goes in the partition's
next batch. Batches grow when the broker is slow and stay small when it keeps up, as
Kafka's own producer does with several requests in flight. The queue is bounded: a send that
finds more than :data:`MAX_QUEUED` records queued for its partition waits until they are
handed over. Order within a partition is the order of the sends; a failed hand-over fails
the next :meth:`Sends.send` or :meth:`Sends.drain` (and drops what was queued behind it).

``linger`` (``KafkaSettings.producer_linger_ms``) lets a partition's task wait that long
before it takes a queue that was empty: fewer, bigger requests at low rates, for that much
latency. It is 0 by default: the queue already batches under load.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from aiokafka import AIOKafkaProducer

from pipelines.log.base import RawBatch
from pipelines.serde import compacted

__all__ = ["COMPACT_FROM", "MAX_QUEUED", "Sends", "send_batches"]

MAX_QUEUED = 200_000
"""Records queued for one partition, at most, before a send waits for them to be handed over
(about 3-4 record batches of a megabyte of small records)."""
COMPACT_FROM = 20_000
"""Records queued for a partition from which a batch sent is queued as copies of its keys and
values at their size (:func:`~pipelines.serde.compacted`, ~0.1 µs a record): the buffers of
``orjson.dumps`` results are ~4 KiB each, so a full queue of them would hold ~800 MB a partition.
A queue that the broker keeps short pays nothing."""

_Partition = tuple[str, int]


async def send_batches(
    producer: AIOKafkaProducer, topic: str, partition: int, batches: deque[RawBatch]
) -> list[asyncio.Future[Any]]:
    """Hand ``batches`` to ``producer`` as few closed Kafka record batches as fit; the futures
    of their acknowledgements."""
    futures = []
    builder = producer.create_batch()
    no_headers: list[tuple[str, bytes]] = []  # shared: the client only reads it
    for batch in batches:
        headers = batch.headers
        for i, (key, value, stamp) in enumerate(
            zip(batch.keys, batch.values, batch.timestamps, strict=True)
        ):
            record_headers = no_headers if headers is None else list(headers[i])
            if builder.append(key=key, value=value, timestamp=stamp, headers=record_headers):
                continue
            futures.append(await _send_closed(producer, builder, topic, partition))
            builder = producer.create_batch()
            # a batch takes its first record whatever its size (the broker refuses one larger
            # than the topic's max.message.bytes, and the flush then fails)
            builder.append(key=key, value=value, timestamp=stamp, headers=record_headers)
    if builder.record_count():
        futures.append(await _send_closed(producer, builder, topic, partition))
    return futures


async def _send_closed(
    producer: AIOKafkaProducer, builder: Any, topic: str, partition: int
) -> asyncio.Future[Any]:
    builder.close()  # complete: aiokafka sends it when the connection is free, no linger
    future: asyncio.Future[Any] = await producer.send_batch(builder, topic, partition=partition)
    return future


class Sends:
    """Batches queued per partition on their way into one aiokafka producer (see the module
    docstring). ``acks`` keeps the futures of the acknowledgements for :meth:`drain` to wait
    for (a transactional producer's commit waits for them instead)."""

    def __init__(self, producer: AIOKafkaProducer, *, linger: float, acks: bool) -> None:
        self._producer = producer
        self._linger = linger
        self._keep_acks = acks
        self._queued: dict[_Partition, deque[RawBatch]] = {}
        self._counts: dict[_Partition, int] = {}
        self._tasks: dict[_Partition, asyncio.Task[None]] = {}
        self._acks: list[asyncio.Future[Any]] = []
        self._error: BaseException | None = None

    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        """Queue ``batch`` for ``topic[partition]``; wait only when that partition's queue is
        full. Raises what made an earlier hand-over fail."""
        self.raise_failure()
        if not len(batch):
            return
        tp = (topic, partition)
        if self._counts.get(tp, 0) >= COMPACT_FROM:  # a slow broker: it will wait a while
            batch = RawBatch(
                compacted(batch.keys), compacted(batch.values), batch.timestamps, batch.headers
            )
        self._queued.setdefault(tp, deque()).append(batch)
        self._counts[tp] = self._counts.get(tp, 0) + len(batch)
        task = self._tasks.get(tp)
        if task is None or task.done():  # done: ended before its callback ran
            self._tasks[tp] = task = asyncio.create_task(self._hand_over(tp))
            task.add_done_callback(lambda ended: self._forget(tp, ended))
        if self._counts[tp] > MAX_QUEUED:
            await asyncio.shield(task)
            self.raise_failure()

    async def _hand_over(self, tp: _Partition) -> None:
        """Hand the partition's queue to aiokafka until it stays empty."""
        try:
            if self._linger:
                await asyncio.sleep(self._linger)
            while batches := self._queued.pop(tp, None):
                del self._counts[tp]
                futures = await send_batches(self._producer, *tp, batches)
                if self._keep_acks:
                    self._acks += futures
                else:  # the commit says how they went: their own errors are not wanted
                    for future in futures:
                        future.add_done_callback(_ignore_error)
        except Exception as error:  # kept for the next send or drain
            self._fail(error)

    def _forget(self, tp: _Partition, task: asyncio.Task[None]) -> None:
        """``task`` ended (a task cancelled before it started never runs its own code)."""
        if self._tasks.get(tp) is task:
            del self._tasks[tp]

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._queued.clear()
        self._counts.clear()

    def raise_failure(self) -> None:
        """Raise what made a hand-over fail, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def drain(self) -> list[asyncio.Future[Any]]:
        """Wait until aiokafka has every queued batch; the acknowledgements to wait for."""
        while running := [task for task in self._tasks.values() if not task.done()]:
            await asyncio.wait(running)
        self.raise_failure()
        acks, self._acks = self._acks, []
        return acks

    async def cancel(self) -> None:
        """Drop what is queued and stop handing it over (the transaction is aborted)."""
        self._queued.clear()
        self._counts.clear()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._acks = []
        self._error = None


def _ignore_error(future: asyncio.Future[Any]) -> None:
    """Mark a batch's error as seen (a fenced producer fails every batch it holds): else asyncio
    logs "Future exception was never retrieved" when the future is collected."""
    if not future.cancelled():
        future.exception()
