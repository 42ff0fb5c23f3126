"""The Kafka read path builds its batches straight from aiokafka's record batches
(``pipelines/log/_kafka_records.py``); the batches are exactly those made from aiokafka's
ConsumerRecords (the public ``getmany``), which is also the path taken with an aiokafka the
seam was not checked against. Compared on real fetched data: headers (a None value, unicode
names), null and empty keys and values, gzip batches, batches read from their middle, a
compacted topic with gaps, and transactional topics with aborted and interleaved transactions
under ``read_committed``; through ``KafkaLog.read`` (batch by batch) and a group consumer's
``poll`` (record by record). Record batches of an older format, which a Kafka 4 broker no
longer writes, are compared in memory against aiokafka's own iteration."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import aiokafka
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
from aiokafka.errors import KafkaError
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition as KafkaPartition
from support.kafka import consumer, create_topic_async

from pipelines.log._kafka_records import ColumnReader, _Chunks, fetched_batch
from pipelines.log.base import FetchedBatch, RawBatch, TopicPartition
from pipelines.log.kafka import KafkaConsumer, KafkaLog
from pipelines.record import Headers
from pipelines.settings import KafkaSettings

Row = tuple[int, bytes | None, bytes | None, int, Headers]
SIZES = (7, 1000)
"""``max_records`` of whole reads: chunks that cut record batches, and whole ones."""

NOW = int(time.time() * 1000)
"""The records' timestamps: older ones (past the broker's 7-day retention) are removed by the
broker on its own, which moved the log start while a test read."""


@contextlib.contextmanager
def unknown_aiokafka() -> Iterator[None]:
    """An aiokafka version the seam was not checked against: readers made meanwhile fall back
    to ConsumerRecords."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiokafka, "__version__", "0.15.0")
        yield


@contextlib.asynccontextmanager
async def two_logs(bootstrap: str) -> AsyncIterator[tuple[KafkaLog, KafkaLog]]:
    """A KafkaLog whose reader decodes record batches and one whose reader falls back."""
    direct = KafkaLog(KafkaSettings(bootstrap_servers=bootstrap))
    public = KafkaLog(KafkaSettings(bootstrap_servers=bootstrap))
    try:
        await direct.start_offsets([])  # makes the reader
        with unknown_aiokafka():
            await public.start_offsets([])
        assert direct._reader is not None and direct._reader.direct
        assert public._reader is not None and not public._reader.direct
        yield direct, public
    finally:
        await direct.close()
        await public.close()


@contextlib.asynccontextmanager
async def producer(bootstrap: str, **options: Any) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def send_batch(
    client: AIOKafkaProducer,
    topic: str,
    partition: int,
    records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
) -> None:
    """``records`` (key, value, headers) as record batches of as many as fit."""
    builder = client.create_batch()
    futures = []
    for n, (key, value, headers) in enumerate(records):
        stamp = NOW + n * 7
        if builder.append(key=key, value=value, timestamp=stamp, headers=headers) is None:
            futures.append(await client.send_batch(builder, topic, partition=partition))
            builder = client.create_batch()
            builder.append(key=key, value=value, timestamp=stamp, headers=headers)
    futures.append(await client.send_batch(builder, topic, partition=partition))
    await asyncio.gather(*futures)


def mixed(count: int, salt: str) -> list[tuple[bytes | None, bytes | None, list[Any]]]:
    """Records with and without headers, null and empty keys and values."""
    records: list[tuple[bytes | None, bytes | None, list[Any]]] = []
    for n in range(count):
        key = None if n % 3 == 0 else b"" if n % 11 == 0 else f"{salt}-k{n}".encode()
        value = None if n % 5 == 0 else b"" if n % 13 == 0 else f"{salt}-v{n}".encode() * 3
        headers: list[Any] = []
        if n % 4 == 1:
            headers = [("trace", f"t{n}".encode()), ("nothing", None), ("empty", b"")]
        elif n % 9 == 2:
            headers = [("schlüssel", "wärme".encode()), ("trace", b"second")]
        records.append((key, value, headers))
    return records


async def read_all(log: KafkaLog, tp: TopicPartition, offset: int, size: int) -> list[FetchedBatch]:
    """Every batch ``log.read`` returns from ``offset`` to the end of ``tp``."""
    end = (await log.end_offsets([tp]))[tp]
    batches = []
    while offset < end:
        batch = await log.read(tp, offset, size)
        batches.append(batch)
        assert batch.next_offset > offset
        offset = batch.next_offset
    return batches


def rows_of(batch: FetchedBatch) -> list[Row]:
    records = batch.records
    return list(
        zip(
            batch.offsets,
            records.keys,
            records.values,
            records.timestamps,
            map(records.header_at, range(len(records))),
            strict=True,
        )
    )


async def assert_reads_alike(
    bootstrap: str, topic: str, partitions: int
) -> dict[TopicPartition, list[Row]]:
    """Both readers return the same batches, from the start and from inside record batches;
    the records of each partition."""
    rows: dict[TopicPartition, list[Row]] = {}
    async with two_logs(bootstrap) as (direct, public):
        for partition in range(partitions):
            tp = TopicPartition(topic, partition)
            for size in SIZES:
                batches = await read_all(direct, tp, 0, size)
                assert batches == await read_all(public, tp, 0, size), (tp, size)
                rows[tp] = [row for batch in batches for row in rows_of(batch)]
            end = (await direct.end_offsets([tp]))[tp]
            for offset in range(1, end, max(1, end // 25)):
                for size in (1, 50):
                    alike = await direct.read(tp, offset, size) == await public.read(
                        tp, offset, size
                    )
                    assert alike, (tp, offset, size)
    return rows


class _Joined:
    """A rebalance listener that keeps what it was assigned."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.assigned |= partitions

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.assigned -= partitions


async def poll_all(
    log: KafkaLog, group: str, topic: str, ends: dict[TopicPartition, int], *, direct: bool
) -> dict[TopicPartition, list[Row]]:
    """The records a group consumer polls, partition by partition, until it is past ``ends``
    (batches of 300 or fewer, each with headers only where a record has some)."""
    member = log.consumer(group)
    assert isinstance(member, KafkaConsumer)
    rows: dict[TopicPartition, list[Row]] = {tp: [] for tp in ends}
    reached: dict[TopicPartition, int] = dict.fromkeys(ends, 0)
    try:
        await member.subscribe([topic], _Joined())
        assert member._columns is not None and member._columns.direct == direct
        deadline = time.monotonic() + 60
        while any(reached[tp] < end for tp, end in ends.items()):
            assert time.monotonic() < deadline, f"polled up to {reached}, not {ends}"
            for batch in await member.poll(300, 0.2):
                records = batch.records
                assert len(records) <= 300  # none: past transaction markers
                headers = list(map(records.header_at, range(len(records))))
                assert (records.headers is None) == (not any(headers))
                reached[batch.topic_partition] = batch.next_offset
                rows[batch.topic_partition] += rows_of(batch)
    finally:
        await member.close()
    return rows


async def assert_polls_alike(
    bootstrap: str, topic: str, read: dict[TopicPartition, list[Row]], group: str
) -> None:
    """A group consumer polls the same records on both paths, those ``read`` returned."""
    async with two_logs(bootstrap) as (direct, public):
        ends = await direct.end_offsets(list(read))
        assert await poll_all(direct, f"{group}-direct", topic, ends, direct=True) == read
        with unknown_aiokafka():
            polled = await poll_all(public, f"{group}-public", topic, ends, direct=False)
        assert polled == read


async def test_headers_nulls_and_gzip_come_out_as_from_consumer_records(
    kafka: str, kafka_names: Callable[[str], str]
) -> None:
    topic = kafka_names("read-mixed")
    await create_topic_async(kafka, topic, 2)
    async with producer(kafka, linger_ms=0) as single:
        for key, value, headers in mixed(40, "single"):
            # send() wants a key or a value (a batch does not)
            sent_key = b"single" if key is None and value is None else key
            await single.send_and_wait(topic, value, key=sent_key, headers=headers, partition=0)
    async with producer(kafka, max_batch_size=16_384) as batched:
        await send_batch(batched, topic, 0, mixed(1500, "batched"))
        await send_batch(batched, topic, 1, [(None, b"v%d" % n, []) for n in range(900)])
    async with producer(kafka, compression_type="gzip", max_batch_size=65_536) as gzip:
        await send_batch(gzip, topic, 0, mixed(700, "gzip"))
        await send_batch(gzip, topic, 1, [(b"k", None, []) for _ in range(300)])

    read = await assert_reads_alike(kafka, topic, 2)
    first, second = read.values()
    assert (len(first), len(second)) == (40 + 1500 + 700, 900 + 300)
    seen = {row[4] for row in first}
    assert (("trace", b"t1"), ("nothing", b""), ("empty", b"")) in seen
    assert (("schlüssel", "wärme".encode()), ("trace", b"second")) in seen
    assert {row[1] for row in first} >= {None, b""}
    assert {row[2] for row in first} >= {None, b""}
    await assert_polls_alike(kafka, topic, read, kafka_names("read-mixed-group"))


async def markers_written(bootstrap: str, topic: str, partitions: int) -> None:
    """Wait for the last stable offsets to reach the ends of the logs: a transaction's markers
    are written to its partitions after the commit (or abort) returns."""
    tps = [KafkaPartition(topic, p) for p in range(partitions)]
    async with (
        consumer(bootstrap, "read_uncommitted") as uncommitted,
        consumer(bootstrap, "read_committed") as committed,
    ):
        deadline = time.monotonic() + 30
        while await committed.end_offsets(tps) != (ends := await uncommitted.end_offsets(tps)):
            assert time.monotonic() < deadline, f"the markers did not reach {ends}"
            await asyncio.sleep(0.1)


async def test_aborted_and_interleaved_transactions_are_skipped_alike(
    kafka: str, kafka_names: Callable[[str], str]
) -> None:
    topic = kafka_names("read-txn")
    await create_topic_async(kafka, topic, 2)
    async with (
        producer(kafka, transactional_id=kafka_names("txn-a")) as first,
        producer(kafka, transactional_id=kafka_names("txn-b")) as second,
        producer(kafka, enable_idempotence=True) as plain,
    ):
        for round_ in range(3):
            for partition in range(2):
                await first.begin_transaction()
                await send_batch(first, topic, partition, mixed(30, f"committed{round_}"))
                await first.commit_transaction()
                await first.begin_transaction()
                await send_batch(first, topic, partition, mixed(25, f"aborted{round_}"))
                await first.abort_transaction()
                # two open transactions whose batches interleave: one aborted, one committed
                await first.begin_transaction()
                await second.begin_transaction()
                for n in range(4):
                    await send_batch(first, topic, partition, mixed(5, f"late{round_}-{n}"))
                    await send_batch(second, topic, partition, mixed(6, f"gone{round_}-{n}"))
                    await send_batch(plain, topic, partition, mixed(2, f"plain{round_}-{n}"))
                await second.abort_transaction()
                await first.commit_transaction()
        await first.begin_transaction()  # the log ends with an abort marker on partition 0
        await send_batch(first, topic, 0, mixed(10, "last"))
        await first.abort_transaction()

    await markers_written(kafka, topic, 2)
    read = await assert_reads_alike(kafka, topic, 2)
    for rows in read.values():
        assert len(rows) == 3 * (30 + 4 * 5 + 4 * 2)
        values = [row[2] for row in rows if row[2]]
        assert not [v for v in values if v.startswith((b"aborted", b"gone", b"last"))]
        assert rows[-1][0] - rows[0][0] + 1 > len(rows)  # gaps: markers, aborted records
    await assert_polls_alike(kafka, topic, read, kafka_names("read-txn-group"))


async def test_a_compacted_topic_with_gaps_reads_alike(
    kafka: str, kafka_names: Callable[[str], str]
) -> None:
    topic = kafka_names("read-compacted")
    cleaner = {
        "cleanup.policy": "compact",
        "segment.ms": "1000",
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
    }
    await create_topic_async(kafka, topic, 1, **cleaner)
    async with producer(kafka, max_batch_size=4096) as client:
        for round_ in range(4):
            records: list[tuple[bytes | None, bytes | None, list[Any]]] = [
                (b"k%d" % (n % 40), None if round_ == 3 and n % 7 == 0 else b"r%d" % round_, [])
                for n in range(120)
            ]
            records[5] = (records[5][0], records[5][1], [("round", b"%d" % round_)])
            await send_batch(client, topic, 0, records)
            await asyncio.sleep(1.2)  # past segment.ms: the next append rolls the segment
        await client.send_and_wait(topic, b"roll", key=b"roll", partition=0)

    tp = TopicPartition(topic, 0)
    deadline = time.monotonic() + 120  # the broker's cleaner looks every 15 s
    async with two_logs(kafka) as (direct, _):
        end = (await direct.end_offsets([tp]))[tp]
        while sum(len(b.offsets) for b in await read_all(direct, tp, 0, 10_000)) == end:
            assert time.monotonic() < deadline, "the broker's cleaner did not compact the topic"
            await asyncio.sleep(2)

    read = await assert_reads_alike(kafka, topic, 1)
    rows = read[tp]
    assert rows[0][0] > 0 or rows[-1][0] + 1 > len(rows)  # gaps where the cleaner removed records
    assert rows[-1][2] == b"roll"
    await assert_polls_alike(kafka, topic, read, kafka_names("read-compacted-group"))


def test_legacy_record_batches_come_out_as_from_consumer_records() -> None:
    tp = KafkaPartition("legacy", 0)
    data = b""
    offset = 0
    for magic, compression, count in ((0, 0, 5), (1, 0, 9), (1, 1, 12), (1, 0, 3)):
        builder = LegacyRecordBatchBuilder(magic, compression, 1 << 20)
        for n in range(count):
            key = None if n % 3 == 0 else b"k%d" % n
            value = None if n % 4 == 0 else b"v%d" % (offset + n)
            stamp = None if magic == 0 else 1_700_000_000_000 + n
            builder.append(offset + n, timestamp=stamp, key=key, value=value)
        data += bytes(builder.build())
        offset += count

    def records(fetch_offset: int) -> Any:
        return PartitionRecords(
            tp, MemoryRecords(data), [], fetch_offset, None, None, True, READ_COMMITTED
        )

    for fetch_offset in (0, 6, 15):
        for size in (1, 4, 100):
            reader = ColumnReader(None)
            assert not reader.direct
            reader.budget = size
            consumer_records = list(records(fetch_offset))
            public = [
                fetched_batch(tp, consumer_records[start : start + size])
                for start in range(0, len(consumer_records), size)
            ]
            chunks = _Chunks(records(fetch_offset), reader)
            assert list(chunks) == public
            assert chunks.next_fetch_offset == offset


def test_the_seam_is_only_put_into_a_fresh_fetcher_of_the_known_shape() -> None:
    def fake(results: object) -> Any:
        return SimpleNamespace(_fetcher=SimpleNamespace(_records=results))

    fresh = fake(collections.OrderedDict())
    assert ColumnReader(fresh).direct
    assert type(fresh._fetcher._records) is not collections.OrderedDict  # swapped
    busy = collections.OrderedDict({KafkaPartition("t", 0): object()})
    assert not ColumnReader(fake(busy)).direct
    assert not ColumnReader(fake({})).direct
    assert not ColumnReader(SimpleNamespace()).direct
    with unknown_aiokafka():
        assert not ColumnReader(fake(collections.OrderedDict())).direct


@pytest.mark.parametrize("enabled", [True, False])
def test_decoding_leaves_the_garbage_collector_as_it_was(enabled: bool) -> None:
    builder = LegacyRecordBatchBuilder(1, 0, 1 << 20)
    for n in range(10):
        builder.append(n, timestamp=n, key=None, value=b"v%d" % n)
    fetched = PartitionRecords(
        KafkaPartition("gc", 0),
        MemoryRecords(bytes(builder.build())),
        [],
        0,
        None,
        None,
        True,
        READ_COMMITTED,
    )
    reader = ColumnReader(None)
    reader.budget = 4
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        assert [len(b.records) for b in _Chunks(fetched, reader)] == [4, 4, 2]
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


async def test_an_error_after_some_batches_comes_with_the_next_fetch() -> None:
    """As getmany does: what was drained is returned, the error is raised by the next call."""
    tp = KafkaPartition("t", 0)
    drained = FetchedBatch("t", 0, RawBatch([None], [b"v"], [0]), [0], 1)
    answers: list[Any] = [{tp: [drained]}, KafkaError("the broker said no")]

    async def getmany(*partitions: KafkaPartition, timeout_ms: int, max_records: int) -> Any:
        assert max_records == 1
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    fetcher = SimpleNamespace(_records=collections.OrderedDict())
    reader = ColumnReader(SimpleNamespace(_fetcher=fetcher, getmany=getmany))
    assert reader.direct
    assert await reader.fetch((), 0.1, 100) == [drained]
    with pytest.raises(KafkaError, match="the broker said no"):
        await reader.fetch((), 0.1, 100)
