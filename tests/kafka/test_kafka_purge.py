"""On Kafka, a purge is DeleteRecords: the log start of a partition moves to the offset given,
and reads from there on work; housekeeping purges a pipeline's key_by topics below the
offsets its group committed."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaPartition
from aiokafka.structs import OffsetAndMetadata
from support.logs import numbered

from connectors.memory import Collect, Iterable
from pipelines import Pipeline, Topic
from pipelines.log.base import TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.runtime.housekeeping import Housekeeping
from pipelines.runtime.topology import compile_pipeline
from pipelines.settings import KafkaSettings

NOW = int(time.time() * 1000)
"""The records' timestamp: a stamp of 0 (1970) is past the broker's 7-day retention, which
then moved the log start to the end on its own, whatever the purge did."""


async def test_a_purge_moves_the_log_start(kafka: str, kafka_names: Callable[[str], str]) -> None:
    log = KafkaLog(KafkaSettings(bootstrap_servers=kafka))
    try:
        name = kafka_names("purged")
        await log.create_topics([TopicSpec(name, 2)])
        producer = log.producer()
        tp, other = TopicPartition(name, 0), TopicPartition(name, 1)
        for start in range(0, 300, 100):
            await producer.send(name, 0, numbered(start, 100, stamp=NOW))
            await producer.send(name, 1, numbered(start, 100, stamp=NOW))
        await producer.flush()
        await producer.close()
        assert await log.start_offsets([tp, other]) == {tp: 0, other: 0}
        await log.purge({tp: 120, other: 0})
        assert await log.start_offsets([tp, other]) == {tp: 120, other: 0}
        fetched = await log.read(tp, 120, 5)
        assert fetched.records.values[0] == b"120"
    finally:
        await log.close()


async def test_housekeeping_purges_key_by_topics_below_the_committed_offsets(
    kafka: str, kafka_names: Callable[[str], str]
) -> None:
    name = kafka_names("keyed")
    pipeline = (
        Pipeline(name)
        .source(Iterable([{"user": "a"}]), into=Topic(f"{name}-in"))
        .key_by("by-user", lambda v: v["user"])
        .sink(Collect(), step_id="out")
    )
    topology = compile_pipeline(pipeline)
    log = KafkaLog(KafkaSettings(bootstrap_servers=kafka))
    try:
        await log.create_topics([t.spec for t in topology.topics])
        by_user = TopicPartition(f"{name}.by-user", 0)
        producer = log.producer()
        await producer.send(by_user.topic, 0, numbered(0, 200, stamp=NOW))
        await producer.flush()
        await producer.close()
        committer = AIOKafkaConsumer(  # committing at stop would overwrite the 150 below
            bootstrap_servers=kafka, group_id=topology.group, enable_auto_commit=False
        )
        await committer.start()
        try:  # as the group's workers would: 150 records of the topic processed
            committer.assign([KafkaPartition(by_user.topic, 0)])
            await committer.commit({KafkaPartition(by_user.topic, 0): OffsetAndMetadata(150, "")})
        finally:
            await committer.stop()
        await Housekeeping(log, topology, every=1.0).run()
        assert (await log.start_offsets([by_user]))[by_user] == 150
    finally:
        await log.close()
