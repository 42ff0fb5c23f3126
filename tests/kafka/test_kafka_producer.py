"""The Kafka producers queue what is sent per partition and hand it to aiokafka in the
background (``pipelines/log/_kafka_sends.py``): a send returns before the broker answers, what
is sent while a partition's hand-over is under way goes in its next record batch, order within
a partition is kept, a full queue makes the sender wait, a failed hand-over fails the next
flush, and a transaction's commit holds every batch sent before it (an abort none)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from pipelines.errors import LogError
from pipelines.log import _kafka_sends
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.settings import KafkaSettings


def _batch(start: int, count: int) -> RawBatch:
    values: list[bytes | None] = [b"%d" % i for i in range(start, start + count)]
    return RawBatch([None] * count, values, [1_700_000_000_000 + i for i in range(count)])


@pytest.fixture
async def log(kafka: str) -> AsyncIterator[KafkaLog]:
    log = KafkaLog(KafkaSettings(bootstrap_servers=kafka))
    try:
        yield log
    finally:
        await log.close()


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


async def _values(log: KafkaLog, tp: TopicPartition) -> list[bytes | None]:
    end = (await log.end_offsets([tp]))[tp]
    values: list[bytes | None] = []
    offset = 0
    while offset < end:
        fetched = await log.read(tp, offset, 10_000)
        values += fetched.records.values
        offset = fetched.next_offset
    return values


async def test_sends_queue_and_go_as_one_record_batch_per_partition(
    log: KafkaLog, kafka_names: Callable[[str], str], record_batches: list[tuple[str, int, int]]
) -> None:
    topic = kafka_names("queued")
    await log.create_topics([TopicSpec(topic, 2)])
    producer = log.producer()
    try:
        await producer.send(topic, 0, _batch(0, 1))  # starts the client
        await producer.flush()
        record_batches.clear()
        for start in range(0, 500, 10):  # nothing lets the hand-over run in between
            await producer.send(topic, 0, _batch(start, 10))
            await producer.send(topic, 1, _batch(start, 10))
        await producer.flush()
    finally:
        await producer.close()
    assert sorted(record_batches) == [(topic, 0, 500), (topic, 1, 500)]
    assert await _values(log, TopicPartition(topic, 0)) == [b"0", *_batch(0, 500).values]
    assert await _values(log, TopicPartition(topic, 1)) == _batch(0, 500).values


async def test_a_full_queue_makes_the_sender_wait_and_keeps_the_order(
    log: KafkaLog,
    kafka_names: Callable[[str], str],
    record_batches: list[tuple[str, int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kafka_sends, "MAX_QUEUED", 25)
    topic = kafka_names("full")
    await log.create_topics([TopicSpec(topic, 1)])
    producer = log.producer()
    try:
        for start in range(0, 300, 10):
            await producer.send(topic, 0, _batch(start, 10))
        await producer.flush()
    finally:
        await producer.close()
    assert len(record_batches) > 1
    assert max(records for *_, records in record_batches) <= 30
    assert await _values(log, TopicPartition(topic, 0)) == _batch(0, 300).values


async def test_linger_gathers_what_is_sent_meanwhile(
    kafka: str, kafka_names: Callable[[str], str], record_batches: list[tuple[str, int, int]]
) -> None:
    log = KafkaLog(KafkaSettings(bootstrap_servers=kafka, producer_linger_ms=300))
    topic = kafka_names("linger")
    producer = log.producer()
    try:
        await log.create_topics([TopicSpec(topic, 1)])
        await producer.send(topic, 0, _batch(0, 5))
        await producer.send(topic, 0, _batch(5, 5))  # meanwhile: the first has not gone
        await producer.flush()
        assert record_batches == [(topic, 0, 10)]
        assert await _values(log, TopicPartition(topic, 0)) == _batch(0, 10).values
    finally:
        await producer.close()
        await log.close()


async def test_a_failed_hand_over_fails_the_flush(
    log: KafkaLog, kafka_names: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = kafka_names("refused")
    await log.create_topics([TopicSpec(topic, 1)])

    async def full(*args: object, **kwargs: object) -> None:
        raise KafkaTimeoutError()  # aiokafka's queue for the partition stayed full

    producer = log.producer()
    try:
        await producer.send(topic, 0, _batch(0, 1))
        await producer.flush()
        monkeypatch.setattr(AIOKafkaProducer, "send_batch", full)
        await producer.send(topic, 0, _batch(1, 1))
        with pytest.raises(LogError, match="Kafka did not acknowledge a batch") as failed:
            await producer.flush()
        assert failed.value.retriable
        monkeypatch.undo()
        await producer.send(topic, 0, _batch(2, 1))  # the failure was raised once
        await producer.flush()
    finally:
        await producer.close()
    assert await _values(log, TopicPartition(topic, 0)) == [b"0", b"2"]


async def test_a_record_larger_than_the_topic_allows_fails_the_flush(
    log: KafkaLog, kafka_names: Callable[[str], str]
) -> None:
    topic = kafka_names("large")
    await log.create_topics([TopicSpec(topic, 1)])
    producer = log.producer()
    try:
        huge: list[bytes | None] = [b"x" * (2 << 20)]  # past max.message.bytes (1 MiB)
        await producer.send(topic, 0, RawBatch([None], huge, [0]))
        with pytest.raises(LogError, match="Kafka did not acknowledge a batch"):
            await producer.flush()
    finally:
        await producer.close()


async def test_a_commit_holds_every_queued_batch_and_an_abort_none(
    log: KafkaLog, kafka_names: Callable[[str], str]
) -> None:
    topic, group = kafka_names("txn"), kafka_names("group")
    await log.create_topics([TopicSpec(topic, 2)])
    transaction = log.transactional_producer(kafka_names("task"))
    try:
        await transaction.send(topic, 0, _batch(0, 3))
        await transaction.abort()  # queued, never handed over: dropped
        for start in range(0, 200, 20):
            await transaction.send(topic, 0, _batch(start, 20))
            await transaction.send(topic, 1, _batch(start, 20))
        await transaction.commit({}, group)
    finally:
        await transaction.close()
    for partition in (0, 1):
        values = await _values(log, TopicPartition(topic, partition))
        assert values == _batch(0, 200).values
