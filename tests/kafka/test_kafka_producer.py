"""The Kafka producers queue what is sent per partition and hand it to aiokafka in the
background (``pipelines/log/_kafka_sends.py``): a send returns before the broker answers, what
is sent while a partition's hand-over is under way goes in its next record batch, order within
a partition is kept, a full queue makes the sender wait, a failed hand-over fails the next
flush, and a transaction's commit holds every batch sent before it (an abort none)."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from pipelines.errors import LogError
from pipelines.log import _kafka_sends
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.settings import KafkaSettings


def unkeyed(start: int, count: int) -> RawBatch:
    values: list[bytes | None] = [b"%d" % i for i in range(start, start + count)]
    return RawBatch([None] * count, values, [1_700_000_000_000 + i for i in range(count)])


@pytest.fixture
async def kafka_log(kafka: str) -> AsyncIterator[KafkaLog]:
    kafka_log = KafkaLog(KafkaSettings(bootstrap_servers=kafka))
    try:
        yield kafka_log
    finally:
        await kafka_log.close()


@pytest.fixture
def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every Kafka record batch the producers hand to aiokafka: topic, partition, records."""
    handed: list[tuple[str, int, int]] = []
    send_batch = AIOKafkaProducer.send_batch

    async def counted(self: AIOKafkaProducer, batch: object, topic: str, *, partition: int):  # type: ignore[no-untyped-def]
        handed.append((topic, partition, batch.record_count()))  # type: ignore[attr-defined]
        return await send_batch(self, batch, topic, partition=partition)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", counted)
    return handed


async def values_on(kafka_log: KafkaLog, tp: TopicPartition) -> list[bytes | None]:
    end = (await kafka_log.end_offsets([tp]))[tp]
    values: list[bytes | None] = []
    offset = 0
    while offset < end:
        fetched = await kafka_log.read(tp, offset, 10_000)
        values += fetched.records.values
        offset = fetched.next_offset
    return values


async def test_sends_queue_and_go_as_one_record_batch_per_partition(
    kafka_log: KafkaLog,
    kafka_names: Callable[[str], str],
    record_batches: list[tuple[str, int, int]],
) -> None:
    topic = kafka_names("queued")
    await kafka_log.create_topics([TopicSpec(topic, 2)])
    producer = kafka_log.producer()
    try:
        await producer.send(topic, 0, unkeyed(0, 1))  # starts the client
        await producer.flush()
        record_batches.clear()
        for start in range(0, 500, 10):  # nothing lets the hand-over run in between
            await producer.send(topic, 0, unkeyed(start, 10))
            await producer.send(topic, 1, unkeyed(start, 10))
        await producer.flush()
    finally:
        await producer.close()
    assert sorted(record_batches) == [(topic, 0, 500), (topic, 1, 500)]
    assert await values_on(kafka_log, TopicPartition(topic, 0)) == [b"0", *unkeyed(0, 500).values]
    assert await values_on(kafka_log, TopicPartition(topic, 1)) == unkeyed(0, 500).values


async def test_a_full_queue_makes_the_sender_wait_and_keeps_the_order(
    kafka_log: KafkaLog,
    kafka_names: Callable[[str], str],
    record_batches: list[tuple[str, int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kafka_sends, "MAX_QUEUED", 25)
    topic = kafka_names("full")
    await kafka_log.create_topics([TopicSpec(topic, 1)])
    producer = kafka_log.producer()
    try:
        for start in range(0, 300, 10):
            await producer.send(topic, 0, unkeyed(start, 10))
        await producer.flush()
    finally:
        await producer.close()
    assert len(record_batches) > 1
    assert max(records for *_, records in record_batches) <= 30
    assert await values_on(kafka_log, TopicPartition(topic, 0)) == unkeyed(0, 300).values


async def test_a_long_queue_holds_its_records_at_their_size(
    kafka_log: KafkaLog,
    kafka_names: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """orjson gives each ``dumps`` result a buffer of ~4 KiB: 5,000 of them queued as sent
    would hold ~20 MB; queued past ``COMPACT_FROM`` they are copied at their size."""
    monkeypatch.setattr(_kafka_sends, "COMPACT_FROM", 100)
    topic = kafka_names("compact")
    await kafka_log.create_topics([TopicSpec(topic, 1)])
    producer = kafka_log.producer()
    try:
        await producer.send(topic, 0, unkeyed(0, 1))  # starts the client
        await producer.flush()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for start in range(0, 5_000, 100):  # nothing lets the hand-over run in between
                await producer.send(topic, 0, dumped(start, 100))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        await producer.flush()
    finally:
        await producer.close()
    assert held < 4_000_000, f"{held:,} bytes held for 5,000 queued records"
    tp = TopicPartition(topic, 0)
    assert await values_on(kafka_log, tp) == [b"0", *dumped(0, 5_000).values]


def dumped(start: int, count: int) -> RawBatch:
    """Records whose keys and values come straight from ``orjson.dumps``; every tenth value
    None."""
    numbers = range(start, start + count)
    keys: list[bytes | None] = [orjson.dumps(f"k{i % 7}") for i in numbers]
    values = [None if i % 10 == 0 else orjson.dumps({"n": i}) for i in numbers]
    return RawBatch(keys, values, [1_700_000_000_000] * count)


async def test_linger_gathers_what_is_sent_meanwhile(
    kafka: str, kafka_names: Callable[[str], str], record_batches: list[tuple[str, int, int]]
) -> None:
    kafka_log = KafkaLog(KafkaSettings(bootstrap_servers=kafka, producer_linger_ms=300))
    topic = kafka_names("linger")
    producer = kafka_log.producer()
    try:
        await kafka_log.create_topics([TopicSpec(topic, 1)])
        await producer.send(topic, 0, unkeyed(0, 5))
        await producer.send(topic, 0, unkeyed(5, 5))  # meanwhile: the first has not gone
        await producer.flush()
        assert record_batches == [(topic, 0, 10)]
        assert await values_on(kafka_log, TopicPartition(topic, 0)) == unkeyed(0, 10).values
    finally:
        await producer.close()
        await kafka_log.close()


async def test_a_failed_hand_over_fails_the_flush(
    kafka_log: KafkaLog, kafka_names: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = kafka_names("refused")
    await kafka_log.create_topics([TopicSpec(topic, 1)])

    async def full(*args: object, **kwargs: object) -> None:
        raise KafkaTimeoutError()  # aiokafka's queue for the partition stayed full

    producer = kafka_log.producer()
    try:
        await producer.send(topic, 0, unkeyed(0, 1))
        await producer.flush()
        monkeypatch.setattr(AIOKafkaProducer, "send_batch", full)
        await producer.send(topic, 0, unkeyed(1, 1))
        with pytest.raises(LogError, match="Kafka did not acknowledge a batch") as failed:
            await producer.flush()
        assert failed.value.retriable
        monkeypatch.undo()
        await producer.send(topic, 0, unkeyed(2, 1))  # the failure was raised once
        await producer.flush()
    finally:
        await producer.close()
    assert await values_on(kafka_log, TopicPartition(topic, 0)) == [b"0", b"2"]


async def test_a_record_larger_than_the_topic_allows_fails_the_flush(
    kafka_log: KafkaLog, kafka_names: Callable[[str], str]
) -> None:
    topic = kafka_names("large")
    await kafka_log.create_topics([TopicSpec(topic, 1)])
    producer = kafka_log.producer()
    try:
        huge: list[bytes | None] = [b"x" * (2 << 20)]  # past max.message.bytes (1 MiB)
        await producer.send(topic, 0, RawBatch([None], huge, [0]))
        with pytest.raises(LogError, match="Kafka did not acknowledge a batch"):
            await producer.flush()
    finally:
        await producer.close()


async def test_a_commit_holds_every_queued_batch_and_an_abort_none(
    kafka_log: KafkaLog, kafka_names: Callable[[str], str]
) -> None:
    topic, group = kafka_names("txn"), kafka_names("group")
    await kafka_log.create_topics([TopicSpec(topic, 2)])
    transaction = kafka_log.transactional_producer(kafka_names("task"))
    try:
        await transaction.send(topic, 0, unkeyed(0, 3))
        await transaction.abort()  # queued, never handed over: dropped
        for start in range(0, 200, 20):
            await transaction.send(topic, 0, unkeyed(start, 20))
            await transaction.send(topic, 1, unkeyed(start, 20))
        await transaction.commit({}, group)
    finally:
        await transaction.close()
    for partition in (0, 1):
        values = await values_on(kafka_log, TopicPartition(topic, partition))
        assert values == unkeyed(0, 200).values
