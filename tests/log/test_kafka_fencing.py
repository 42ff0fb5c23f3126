"""A task's transactional producer on Kafka, fenced by the task's next owner: the old owner's
commit fails with :class:`~pipelines.errors.FencedError` (which the worker handles by dropping
the task), never with the client's internal assertion, and it still closes cleanly. Only the
new owner's records become visible."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipelines.errors import FencedError
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.settings import KafkaSettings

from .conftest import KAFKA_BOOTSTRAP


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
            if not len(fetched.records):
                break
            values += fetched.records.values
            offset = fetched.next_offset
        assert values == [b"new-1"]
        assert (await log.committed_offsets(group, [tp])) == {tp: 1}
    finally:
        await log.close()
