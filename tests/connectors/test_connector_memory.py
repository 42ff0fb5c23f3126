"""The Iterable source and the Collect sink."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from support.connectors import STAMP, read_to_end, sink_batch, values_of

from connectors import Collect, Iterable, SinkContext
from pipelines.errors import ConnectorError
from pipelines.record import Record

CTX = SinkContext("p", "sink.collect", 0)


async def test_iterable_batches_and_positions() -> None:
    batches = await read_to_end(Iterable(list(range(25)), batch_size=10))
    assert [b.values for b in batches] == [
        list(range(10)),
        list(range(10, 20)),
        list(range(20, 25)),
    ]
    assert [b.position for b in batches] == [10, 20, 25]
    assert all(b.keys is None and b.timestamps is None and not b.raw for b in batches)


async def test_iterable_resumes_from_every_position() -> None:
    items = list(range(37))
    batches = await read_to_end(Iterable(items, batch_size=5))
    for index, batch in enumerate(batches):
        resumed = values_of(await read_to_end(Iterable(items, batch_size=5), batch.position))
        assert values_of(batches[: index + 1]) + resumed == items
    assert await read_to_end(Iterable(items), 100) == []


async def test_iterable_callable_is_recreated_on_each_read() -> None:
    def numbers() -> Iterator[int]:
        yield from range(7)

    source = Iterable(numbers, batch_size=3)
    assert values_of(await read_to_end(source)) == list(range(7))
    assert values_of(await read_to_end(source, 3)) == [3, 4, 5, 6]


async def test_iterable_one_shot_generator_reads_once() -> None:
    source = Iterable((i * i for i in range(6)), batch_size=4)
    assert values_of(await read_to_end(source, 2)) == [4, 9, 16, 25]  # skips from a fresh one
    with pytest.raises(ConnectorError, match="zero-argument callable"):
        await read_to_end(source)


async def test_iterable_keys_and_timestamps() -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    items = [{"user": "a", "at": base}, {"user": "b", "at": base + timedelta(seconds=1)}]
    batches = await read_to_end(
        Iterable(items, key=lambda v: v["user"], timestamp=lambda v: v["at"])
    )
    assert batches[0].keys == ["a", "b"]
    millis = int(base.timestamp() * 1000)
    assert batches[0].timestamps == [millis, millis + 1000]
    batches = await read_to_end(Iterable([1, 2], timestamp=lambda v: v * 1000))
    assert batches[0].timestamps == [1000, 2000]


async def test_iterable_rejects_naive_timestamps() -> None:
    source = Iterable([1], timestamp=lambda v: datetime(2024, 1, 1))  # noqa: DTZ001
    with pytest.raises(ConnectorError, match="no time zone"):
        await read_to_end(source)


async def test_iterable_records_supply_key_value_and_timestamp() -> None:
    when = datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    items = [Record("k1", {"v": 1}, when), {"v": 2}]
    batches = await read_to_end(Iterable(items, key=lambda v: "fn"))
    batch = batches[0]
    assert batch.values == [{"v": 1}, {"v": 2}]
    assert batch.keys == ["k1", "fn"]
    assert batch.timestamps is not None
    assert batch.timestamps[0] == int(when.timestamp() * 1000)


async def test_iterable_async_iterable_and_resume() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(23):
            yield i

    source = Iterable(numbers, batch_size=10)
    batches = await read_to_end(source)
    assert [len(b.values) for b in batches] == [10, 10, 3]
    assert values_of(batches) == list(range(23))
    assert values_of(await read_to_end(source, 20)) == [20, 21, 22]


async def test_iterable_async_slow_feed_emits_partial_batches() -> None:
    first_seen = asyncio.Event()

    async def feed() -> AsyncIterator[int]:
        yield 0
        await first_seen.wait()  # nothing more until the test has the first item's batch
        yield 1
        yield 2

    source = Iterable(feed, batch_size=1000, max_delay=0.02)
    iterator = source.read(None)
    # a source holding the item back until the feed ends or fills a batch never returns here
    first = await asyncio.wait_for(anext(iterator), 30)
    assert first.values == [0]
    first_seen.set()
    rest = [batch async for batch in iterator]
    assert values_of([first, *rest]) == [0, 1, 2]
    assert rest[-1].position == 3


async def test_iterable_async_error_propagates_after_items() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise RuntimeError("feed broke")

    seen: list[int] = []
    with pytest.raises(RuntimeError, match="feed broke"):
        async for batch in Iterable(broken(), batch_size=10).read(None):
            seen.extend(batch.values)
    assert seen == [1, 2]


async def test_iterable_async_stops_its_pump_when_closed() -> None:
    stopped = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0)
        finally:
            stopped.set()

    iterator = Iterable(endless, batch_size=5).read(None)
    assert (await anext(iterator)).values == [0, 1, 2, 3, 4]
    await iterator.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(stopped.wait(), 1)


def test_iterable_rejects_what_it_cannot_read() -> None:
    with pytest.raises(TypeError):
        Iterable(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Iterable([], batch_size=0)


async def test_collect_gathers_values_keys_and_records() -> None:
    sink = Collect()
    first, second = sink.open(CTX), sink.open(SinkContext("p", "sink.collect", 1))
    first.write(sink_batch([{"a": 1}, {"a": 2}], keys=["x", "y"]))
    second.write(sink_batch([{"a": 3}]))
    await first.flush()
    await second.close()
    assert sink.values == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert sink.keys == ["x", "y", None]
    assert [r.value for r in sink.records] == sink.values
    record = sink.records[0]
    assert (record.key, record.topic, record.partition, record.offset) == ("x", "t", 0, 100)
    assert int(record.timestamp.timestamp() * 1000) == STAMP
    assert len(sink) == 3
    sink.clear()
    assert sink.values == sink.keys == sink.records == []


async def test_iterable_key_function_errors_become_connector_errors() -> None:
    source = Iterable([{"user": "a"}, {}], key=lambda v: v["user"])
    with pytest.raises(ConnectorError, match="KeyError"):
        await read_to_end(source)
