"""A task's transactional producer on Kafka, fenced by the task's next owner: the old owner's
commit fails with :class:`~pipelines.errors.FencedError` (which the worker handles by dropping
the task), never with the client's internal assertion, and it still closes cleanly. Only the
new owner's records become visible. A worker whose task is fenced drops that task with a warning
and goes on, instead of dying."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest
from support.kafka import KAFKA_BOOTSTRAP

import connectors
from pipelines import Pipeline, Topic
from pipelines.errors import FencedError
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.worker import Worker
from pipelines.settings import KafkaSettings


def _batch(*values: bytes) -> RawBatch:
    return RawBatch([None] * len(values), list(values), [0] * len(values))


async def test_a_fenced_owner_fails_its_commit_with_fenced_error(
    names: Callable[[str], str],
) -> None:
    log = KafkaLog(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    topic, group, task = names("fenced"), names("group"), names("task")
    tp = TopicPartition(topic, 0)
    try:
        await log.create_topics([TopicSpec(topic, 1)])
        old = log.transactional_producer(task)
        await old.send(topic, 0, _batch(b"old-1"))
        new = log.transactional_producer(task)  # the next owner starts: it fences the old one
        await new.send(topic, 0, _batch(b"new-1"))
        await new.commit({tp: 1}, group)

        try:
            # the client may know it is fenced already (its sender learnt it in the background)
            # and refuse the send, or learn it only when it commits
            await old.send(topic, 0, _batch(b"old-2"))
            await old.commit({tp: 2}, group)
        except FencedError as error:
            assert task in str(error)
        else:
            raise AssertionError("a fenced producer committed")
        await old.close()  # no open transaction to abort: closes without raising
        await new.close()

        deadline = time.monotonic() + 10
        while (end := (await log.end_offsets([tp]))[tp]) == 0:
            assert time.monotonic() < deadline, "the new owner's commit never became visible"
        values: list[bytes | None] = []
        offset = 0
        while offset < end:
            fetched = await log.read(tp, offset, 100)
            if fetched.next_offset <= offset:
                break
            values += fetched.records.values
            offset = fetched.next_offset
        assert values == [b"new-1"]
        assert (await log.committed_offsets(group, [tp])) == {tp: 1}
    finally:
        await log.close()


async def test_fencing_alone_stops_the_earlier_owner(names: Callable[[str], str]) -> None:
    """What a task's new owner does before it reads the offsets it resumes from: ``fence()``,
    with nothing sent yet, makes the earlier owner's commit fail, so the offsets read next are
    final."""
    log = KafkaLog(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    topic, group, task = names("fenced-first"), names("group"), names("task")
    tp = TopicPartition(topic, 0)
    try:
        await log.create_topics([TopicSpec(topic, 1)])
        old = log.transactional_producer(task)
        await old.send(topic, 0, _batch(b"old-1"))
        new = log.transactional_producer(task)
        await new.fence()
        with pytest.raises(FencedError, match=task):
            await old.send(topic, 0, _batch(b"old-2"))
            await old.commit({tp: 2}, group)
        await old.close()
        assert await log.committed_offsets(group, [tp]) == {}
        await new.commit({tp: 1}, group)
        await new.close()
        assert await log.committed_offsets(group, [tp]) == {tp: 1}
    finally:
        await log.close()


async def _committed(log: KafkaLog, group: str, tp: TopicPartition, offset: int) -> None:
    deadline = time.monotonic() + 30
    while (await log.committed_offsets(group, [tp])).get(tp) != offset:
        assert time.monotonic() < deadline, f"the worker never committed offset {offset} on {tp}"
        await asyncio.sleep(0.05)


async def _values(log: KafkaLog, tp: TopicPartition) -> list[object]:
    """The committed values of ``tp``, decoded."""
    values: list[object] = []
    offset, end = 0, (await log.end_offsets([tp]))[tp]
    while offset < end:
        fetched = await log.read(tp, offset, 100)
        if fetched.next_offset <= offset:
            break
        values += [orjson.loads(v or b"") for v in fetched.records.values]
        offset = fetched.next_offset
    return values


async def test_a_fenced_task_is_dropped_and_its_worker_goes_on(
    names: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """An exactly-once worker commits a first batch; then a newer producer takes the task's
    transactional id over (its next owner, in a rebalance this worker has not seen). The worker
    drops the task with a warning when its next transaction is refused, and runs on until it is
    told to stop; only the first batch's results are on the output."""
    source, output = names("fence-in"), names("fence-out")
    pipeline = (
        Pipeline(names("fence"), processing_guarantee="exactly_once")
        .source(connectors.Iterable([]), into=Topic(source, partitions=1))
        .map("double", lambda v: {"n": v["n"] * 2})
        .sink(connectors.LogTopic(Topic(output, partitions=1)))
    )
    topology = compile_pipeline(pipeline)
    task = f"{topology.by_topic[source].index}.0"
    tp = TopicPartition(source, 0)
    first, second = list(range(10)), list(range(10, 20))
    log = KafkaLog(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    producer = log.producer()
    try:
        await prepare_topics(log, topology)
        await producer.send(source, 0, _batch(*(orjson.dumps({"n": n}) for n in first)))
        await producer.flush()
        worker = Worker(topology, log)
        running = asyncio.create_task(worker.run())
        try:
            await _committed(log, topology.group, tp, len(first))
            # the task's next owner starts its producer: that fences this worker's
            owner = log.transactional_producer(f"{topology.group}.{task}")
            await owner.send(output, 0, _batch(b"{}"))
            await owner.close()  # aborted: never visible
            await producer.send(source, 0, _batch(*(orjson.dumps({"n": n}) for n in second)))
            await producer.flush()

            deadline = time.monotonic() + 30
            while not any("dropped" in r.getMessage() for r in caplog.records):
                assert not running.done(), "the worker ended instead of dropping its task"
                assert time.monotonic() < deadline, "the fenced task was never dropped"
                await asyncio.sleep(0.05)
            assert not running.done(), "the worker ended after dropping its task"
        finally:
            worker.stop.set()
            await asyncio.wait([running], timeout=60)
        assert running.done(), "the worker did not stop"
        assert running.exception() is None, f"the worker died: {running.exception()!r}"
        (warning,) = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert warning.levelname == "WARNING"
        assert f"task {task} dropped" in warning.getMessage()
        assert "taken over by a newer producer" in warning.getMessage()
        assert await _values(log, TopicPartition(output, 0)) == [{"n": n * 2} for n in first]
        assert (await log.committed_offsets(topology.group, [tp])) == {tp: len(first)}
    finally:
        await producer.close()
        await log.close()
