"""The contract every log backend keeps, written once and run on each backend (see conftest)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from pipelines.errors import LogError, TopicError
from pipelines.log.base import (
    Consumer,
    FetchedBatch,
    LogBackend,
    RawBatch,
    TopicPartition,
    TopicSpec,
)
from pipelines.record import Headers

Names = Callable[[str], str]
WAIT_SECONDS = 10.0  # upper bound for anything that should happen "soon"
NOW = int(time.time() * 1000)
"""Timestamps of the records written: a broker removes records older than its retention (7
days) on its own, which would move a topic's start while a test reads it."""

# -- helpers ---------------------------------------------------------------------------------


class RecordingListener:
    """A RebalanceListener that records every callback (and may act on revocation)."""

    def __init__(
        self, on_revoke: Callable[[frozenset[TopicPartition]], Awaitable[None]] | None = None
    ) -> None:
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []
        self._on_revoke = on_revoke

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("assigned", partitions))

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("revoked", partitions))
        if self._on_revoke is not None:
            await self._on_revoke(partitions)

    def calls(self, kind: str) -> list[frozenset[TopicPartition]]:
        return [partitions for name, partitions in self.events if name == kind]

    def ever_assigned(self) -> frozenset[TopicPartition]:
        return frozenset().union(*self.calls("assigned"))


@dataclass
class Member:
    """A consumer with its listener, what it consumed and its positions."""

    consumer: Consumer
    listener: RecordingListener = field(default_factory=RecordingListener)
    seen: list[tuple[TopicPartition, int, bytes | None]] = field(default_factory=list)
    positions: dict[TopicPartition, int] = field(default_factory=dict)

    @classmethod
    async def join(
        cls, log: LogBackend, group: str, topics: Sequence[str], *, commit_on_revoke: bool = False
    ) -> Member:
        member = cls(log.consumer(group))
        if commit_on_revoke:
            member.listener = RecordingListener(member.commit_revoked)
        await member.consumer.subscribe(topics, member.listener)
        return member

    async def commit_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        await self.consumer.commit(
            {tp: self.positions[tp] for tp in partitions if tp in self.positions}
        )

    async def poll(self, max_records: int = 100, timeout: float = 0.05) -> int:
        batches = await self.consumer.poll(max_records, timeout)
        for batch in batches:
            tp = batch.topic_partition
            self.seen.extend(
                (tp, o, v) for o, v in zip(batch.offsets, batch.records.values, strict=True)
            )
            self.positions[tp] = batch.next_offset
        return sum(len(b.records) for b in batches)

    def offsets(self, tp: TopicPartition) -> list[int]:
        return [offset for seen_tp, offset, _ in self.seen if seen_tp == tp]


async def poll_until(members: Sequence[Member], done: Callable[[], bool]) -> None:
    """Poll every member in turn until ``done()``, failing after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the group"
        for member in members:
            await member.poll()


def partition_batch(partition: int, start: int, count: int, *, keyed: bool = True) -> RawBatch:
    """``count`` records whose values say where they belong: ``b"p<partition>-<n>"``."""
    numbers = range(start, start + count)
    return RawBatch(
        [b"k%d" % n for n in numbers] if keyed else [None] * count,
        [b"p%d-%d" % (partition, n) for n in numbers],
        [NOW + n for n in numbers],
    )


async def produce(log: LogBackend, topic: str, batches: dict[int, list[RawBatch]]) -> None:
    producer = log.producer()
    try:
        for partition, per_partition in batches.items():
            for batch in per_partition:
                await producer.send(topic, partition, batch)
        await producer.flush()
    finally:
        await producer.close()


async def topic_with_records(log: LogBackend, names: Names, partitions: int, per: int) -> str:
    """A topic of ``partitions`` partitions holding ``per`` numbered records on each."""
    topic = names("topic")
    await log.create_topics([TopicSpec(topic, partitions)])
    await produce(log, topic, {p: [partition_batch(p, 0, per)] for p in range(partitions)})
    return topic


def headers_of(batch: RawBatch) -> list[Headers]:
    return [batch.header_at(i) for i in range(len(batch))]


def all_partitions(topic: str, count: int) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(topic, p) for p in range(count))


# -- topics ----------------------------------------------------------------------------------


async def test_create_topics_is_idempotent(log: LogBackend, names: Names) -> None:
    a, b, c = TopicSpec(names("a"), 3), TopicSpec(names("b"), 1), TopicSpec(names("c"), 2)
    await log.create_topics([a, b])
    await log.create_topics([a, b])
    await log.create_topics([a, c])
    topics = await log.describe_topics()
    assert {name: topics[name].partitions for name in (a.name, b.name, c.name)} == {
        a.name: 3,
        b.name: 1,
        c.name: 2,
    }


async def test_create_topics_with_another_partition_count_raises(
    log: LogBackend, names: Names
) -> None:
    spec = TopicSpec(names("a"), 3)
    await log.create_topics([spec])
    with pytest.raises(TopicError):
        await log.create_topics([TopicSpec(spec.name, 4)])
    with pytest.raises(TopicError):
        await log.create_topics([TopicSpec(spec.name, 1)])
    assert (await log.describe_topics())[spec.name].partitions == 3


async def test_create_topics_needs_a_partition(log: LogBackend, names: Names) -> None:
    with pytest.raises(TopicError):
        await log.create_topics([TopicSpec(names("a"), 0)])


async def test_describe_topics(log: LogBackend, names: Names) -> None:
    plain = TopicSpec(names("plain"), 2)
    compacted = TopicSpec(names("compacted"), 1, compacted=True, retention_ms=60_000)
    capped = TopicSpec(names("capped"), 1, retention_bytes=1 << 20)
    assert plain.name not in await log.describe_topics()
    await log.create_topics([plain, compacted, capped])
    topics = await log.describe_topics()
    assert topics[plain.name] == plain
    assert topics[compacted.name] == compacted
    assert topics[capped.name] == capped


# -- producing and reading -------------------------------------------------------------------


async def test_produce_and_read_back_exactly(log: LogBackend, names: Names) -> None:
    topic = names("t")
    await log.create_topics([TopicSpec(topic, 3)])
    unkeyed = RawBatch([None, None, None], [b"a", None, b""], [10, 11, 12])
    with_headers = RawBatch(
        [b"k1", None, b""],
        [b"v", b"\x00\xff\n", None],
        [20, 21, 22],
        [(("h", b"1"),), (), (("x", b"\x00\xff"), ("ключ", b""), ("h", b"2"))],
    )
    keyed = RawBatch([b"k"], [b"z" * 10_000], [30])
    await produce(log, topic, {0: [unkeyed, with_headers, keyed], 1: [keyed]})

    fetched = await log.read(TopicPartition(topic, 0), 0, 100)
    assert (fetched.topic, fetched.partition) == (topic, 0)
    assert fetched.topic_partition == TopicPartition(topic, 0)
    assert list(fetched.offsets) == list(range(7))
    assert fetched.next_offset == 7
    assert fetched.records.keys == [None, None, None, b"k1", None, b"", b"k"]
    assert fetched.records.values == [b"a", None, b"", b"v", b"\x00\xff\n", None, b"z" * 10_000]
    assert fetched.records.timestamps == [10, 11, 12, 20, 21, 22, 30]
    assert headers_of(fetched.records) == [
        (),
        (),
        (),
        (("h", b"1"),),
        (),
        (("x", b"\x00\xff"), ("ключ", b""), ("h", b"2")),
        (),
    ]
    assert len(fetched.records.keys) == len(fetched.records.timestamps) == 7

    # headers are per record, whichever frames a read spans
    middle = await log.read(TopicPartition(topic, 0), 2, 2)
    assert headers_of(middle.records) == [(), (("h", b"1"),)]
    plain = await log.read(TopicPartition(topic, 0), 0, 3)
    assert headers_of(plain.records) == [(), (), ()]

    other = await log.read(TopicPartition(topic, 1), 0, 100)
    assert (other.records.keys, other.records.values, list(other.offsets)) == (
        [b"k"],
        [b"z" * 10_000],
        [0],
    )
    assert other.next_offset == 1

    empty = await log.read(TopicPartition(topic, 2), 0, 100)
    assert len(empty.records) == 0
    assert list(empty.offsets) == []
    assert empty.next_offset == 0


@pytest.mark.timeout(20)
async def test_a_sent_batch_belongs_to_the_log(log: LogBackend, names: Names) -> None:
    """A producer may reuse its batch object once send() returned: the log keeps no reference
    to it (a hot loop clears and refills its buffers)."""
    topic = names("t")
    tp = TopicPartition(topic, 0)
    await log.create_topics([TopicSpec(topic, 1)])
    producer = log.producer()
    batch = RawBatch([b"k0"], [b"v0"], [0], [(("h", b"0"),)])
    await producer.send(topic, 0, batch)
    await producer.flush()
    batch.values[0] = b"changed"
    assert (await log.read(tp, 0, 10)).records.values == [b"v0"]
    for column in (batch.keys, batch.values, batch.timestamps, batch.headers):
        assert column is not None
        column.clear()
    assert (await log.read(tp, 0, 10)).records.keys == [b"k0"]
    batch.keys.extend([b"k1", b"k2"])
    batch.values.extend([b"v1", b"v2"])
    batch.timestamps.extend([1, 2])
    batch.headers = None
    await producer.send(topic, 0, batch)
    await producer.close()
    batch.keys.clear()
    fetched = await log.read(tp, 0, 10)
    assert fetched.records.keys == [b"k0", b"k1", b"k2"]
    assert fetched.records.values == [b"v0", b"v1", b"v2"]
    assert fetched.records.timestamps == [0, 1, 2]
    assert headers_of(fetched.records) == [(("h", b"0"),), (), ()]


async def test_end_offsets(log: LogBackend, names: Names) -> None:
    topic = names("t")
    await log.create_topics([TopicSpec(topic, 3)])
    tps = sorted(all_partitions(topic, 3))
    assert await log.end_offsets(tps) == dict.fromkeys(tps, 0)
    await produce(
        log,
        topic,
        {0: [partition_batch(0, 0, 5), partition_batch(0, 5, 2)], 2: [partition_batch(2, 0, 1)]},
    )
    assert await log.end_offsets(tps) == {tps[0]: 7, tps[1]: 0, tps[2]: 1}
    assert await log.end_offsets([tps[2]]) == {tps[2]: 1}


async def test_read_with_max_records(log: LogBackend, names: Names) -> None:
    topic = names("t")
    tp = TopicPartition(topic, 0)
    await log.create_topics([TopicSpec(topic, 1)])
    await produce(
        log, topic, {0: [partition_batch(0, 0, 5), partition_batch(0, 5, 3, keyed=False)]}
    )

    def check(fetched: FetchedBatch, first: int, count: int) -> None:
        expected = range(first, first + count)
        assert list(fetched.offsets) == list(expected)
        assert fetched.records.values == [b"p0-%d" % n for n in expected]
        assert fetched.records.keys == [b"k%d" % n if n < 5 else None for n in expected]
        assert fetched.records.timestamps == [NOW + n for n in expected]
        assert fetched.next_offset == first + count

    check(await log.read(tp, 0, 2), 0, 2)  # part of the first batch
    check(await log.read(tp, 2, 2), 2, 2)  # from its middle
    check(await log.read(tp, 3, 4), 3, 4)  # spanning both batches
    check(await log.read(tp, 4, 1), 4, 1)  # the last record of the first batch
    check(await log.read(tp, 5, 3), 5, 3)  # exactly the second batch
    check(await log.read(tp, 6, 100), 6, 2)
    check(await log.read(tp, 0, 100), 0, 8)
    check(await log.read(tp, 8, 100), 8, 0)  # the end of the log

    offset, values = 0, []
    while True:
        fetched = await log.read(tp, offset, 3)
        if not len(fetched.records):
            break
        assert len(fetched.records) <= 3
        values.extend(fetched.records.values)
        offset = fetched.next_offset
    assert values == [b"p0-%d" % n for n in range(8)]


# -- consumer groups -------------------------------------------------------------------------


async def test_one_member_gets_everything_and_a_new_member_resumes(
    log: LogBackend, names: Names
) -> None:
    topic = await topic_with_records(log, names, partitions=3, per=10)
    group = names("group")
    everything = all_partitions(topic, 3)
    tp0 = TopicPartition(topic, 0)

    first = await Member.join(log, group, [topic])
    await poll_until([first], lambda: len(first.seen) >= 30)
    assert first.listener.calls("assigned") and first.listener.ever_assigned() == everything
    assert first.consumer.assignment() == everything
    assert sorted(first.seen) == sorted(
        (TopicPartition(topic, p), n, b"p%d-%d" % (p, n)) for p in range(3) for n in range(10)
    )
    assert first.positions == dict.fromkeys(everything, 10)
    assert await first.poll(timeout=0.1) == 0

    committed = {**first.positions, tp0: 4}  # partition 0 only half processed
    await first.consumer.commit(committed)
    assert await log.committed_offsets(group, sorted(everything)) == committed
    assert await log.committed_offsets(names("other-group"), sorted(everything)) == {}
    await first.consumer.close()
    assert first.listener.events[-1] == ("revoked", everything)
    assert first.consumer.assignment() == frozenset()

    await produce(log, topic, {p: [partition_batch(p, 10, 2)] for p in range(3)})
    second = await Member.join(log, group, [topic])
    await poll_until([second], lambda: len(second.seen) >= 12)
    assert second.listener.ever_assigned() == everything
    assert second.offsets(tp0) == list(range(4, 12))
    for p in (1, 2):
        assert second.offsets(TopicPartition(topic, p)) == [10, 11]
    assert await second.poll(timeout=0.1) == 0
    await second.consumer.close()


async def test_a_new_group_starts_at_the_first_record_still_on_the_log(
    log: LogBackend, names: Names
) -> None:
    """Records purged (or expired) below the log's start are not asked for: a group with
    nothing committed starts where the log now starts, with no error and nothing skipped."""
    topic = names("topic")
    await log.create_topics([TopicSpec(topic, 1)])
    tp = TopicPartition(topic, 0)
    await produce(log, topic, {0: [partition_batch(0, n, 20) for n in range(0, 1000, 20)]})
    await log.purge({tp: 600})
    start = (await log.start_offsets([tp]))[tp]
    assert start <= 600
    if log.name != "memory":  # the memory log keeps everything
        assert start > 0
    member = await Member.join(log, names("group"), [topic])
    try:
        await poll_until([member], lambda: len(member.seen) >= 1000 - start)
        assert member.offsets(tp) == list(range(start, 1000))
    finally:
        await member.consumer.close()


async def test_two_members_split_partitions_and_consume_once(log: LogBackend, names: Names) -> None:
    topic = await topic_with_records(log, names, partitions=4, per=25)
    group = names("group")
    a = await Member.join(log, group, [topic], commit_on_revoke=True)
    b = await Member.join(log, group, [topic], commit_on_revoke=True)

    def split() -> bool:
        both = a.consumer.assignment(), b.consumer.assignment()
        return all(both) and both[0] | both[1] == all_partitions(topic, 4)

    await poll_until([a, b], lambda: split() and len(a.seen) + len(b.seen) >= 100)
    assert not a.consumer.assignment() & b.consumer.assignment()
    consumed = Counter((tp, offset) for tp, offset, _ in a.seen + b.seen)
    assert set(consumed) == {(tp, n) for tp in all_partitions(topic, 4) for n in range(25)}
    assert max(consumed.values()) == 1
    for member in (a, b):
        assert {tp for tp, _, _ in member.seen} <= member.listener.ever_assigned()
    await a.consumer.close()
    await b.consumer.close()


async def test_a_leaving_member_hands_its_partitions_over(log: LogBackend, names: Names) -> None:
    topic = await topic_with_records(log, names, partitions=4, per=10)
    group = names("group")
    leaving = await Member.join(log, group, [topic])
    staying = await Member.join(log, group, [topic])
    await poll_until(
        [leaving, staying],
        lambda: (
            len(leaving.seen) + len(staying.seen) >= 40
            and len(leaving.consumer.assignment()) == len(staying.consumer.assignment()) == 2
        ),
    )
    handed_over = leaving.consumer.assignment()
    kept = staying.consumer.assignment()
    assert handed_over | kept == all_partitions(topic, 4)
    await leaving.consumer.commit(dict.fromkeys(handed_over, 6))  # processed up to 6 only
    await leaving.consumer.close()
    assert leaving.listener.events[-1] == ("revoked", handed_over)

    before = len(staying.seen)
    await poll_until(
        [staying],
        lambda: (
            staying.consumer.assignment() == all_partitions(topic, 4)
            and len(staying.seen) >= before + 8
        ),
    )
    for tp in handed_over:
        assert staying.offsets(tp) == [6, 7, 8, 9]
    if log.name == "kafka":
        # Kafka's eager protocol revokes every partition and assigns the new set: the staying
        # member replays what it had not committed of the partitions it kept
        assert staying.listener.events[-1] == ("assigned", all_partitions(topic, 4))
        for tp in kept:
            assert set(staying.offsets(tp)) == set(range(10))
    else:
        assert staying.listener.events[-1] == ("assigned", handed_over)
        assert not staying.listener.calls("revoked")
        for tp in kept:
            assert staying.offsets(tp) == list(range(10))
    assert await staying.poll(timeout=0.1) == 0
    await staying.consumer.close()
    assert staying.listener.events[-1] == ("revoked", all_partitions(topic, 4))


async def test_commit_of_a_partition_not_owned_raises(log: LogBackend, names: Names) -> None:
    topic = await topic_with_records(log, names, partitions=2, per=1)
    group = names("group")
    unassigned = log.consumer(group)
    with pytest.raises(LogError):
        await unassigned.commit({TopicPartition(topic, 0): 0})

    a = await Member.join(log, group, [topic])
    b = await Member.join(log, group, [topic])
    await poll_until([a, b], lambda: bool(a.consumer.assignment() and b.consumer.assignment()))
    (theirs,) = b.consumer.assignment()
    (mine,) = a.consumer.assignment()
    with pytest.raises(LogError):
        await a.consumer.commit({theirs: 1})
    with pytest.raises(LogError):
        await a.consumer.commit({mine: 1, theirs: 1})
    with pytest.raises(LogError):
        await a.consumer.commit({TopicPartition(names("elsewhere"), 0): 1})
    assert await log.committed_offsets(group, [mine, theirs]) == {}
    await a.consumer.commit({mine: 1})
    assert await log.committed_offsets(group, [mine, theirs]) == {mine: 1}
    await a.consumer.close()
    await b.consumer.close()


async def test_poll_on_an_empty_topic_returns_promptly(log: LogBackend, names: Names) -> None:
    topic = names("t")
    await log.create_topics([TopicSpec(topic, 2)])
    member = await Member.join(log, names("group"), [topic])
    started = time.monotonic()
    assert await member.consumer.poll(100, 0.3) == []
    waited = time.monotonic() - started
    # a bound on real time is what this contract is about: it waits its timeout, not more
    assert 0.25 <= waited < 1.5
    started = time.monotonic()
    assert await member.consumer.poll(100, 0.0) == []
    assert time.monotonic() - started < 0.5
    assert member.consumer.assignment() == all_partitions(topic, 2)
    await member.consumer.close()


async def test_poll_returns_as_soon_as_records_arrive(log: LogBackend, names: Names) -> None:
    topic = names("t")
    await log.create_topics([TopicSpec(topic, 1)])
    member = await Member.join(log, names("group"), [topic])
    await member.poll(timeout=0.0)  # joined and assigned

    async def produce_later() -> None:
        await asyncio.sleep(0.1)
        await produce(log, topic, {0: [partition_batch(0, 0, 3)]})

    started = time.monotonic()
    producing = asyncio.create_task(produce_later())
    batches = await member.consumer.poll(100, 60.0)
    await producing
    assert time.monotonic() - started < 30.0  # far from its timeout, however loaded the machine
    assert [v for b in batches for v in b.records.values] == [b"p0-0", b"p0-1", b"p0-2"]
    await member.consumer.close()


async def test_subscribe_to_a_missing_topic_raises(log: LogBackend, names: Names) -> None:
    topic = names("t")
    await log.create_topics([TopicSpec(topic, 1)])
    consumer = log.consumer(names("group"))
    with pytest.raises(TopicError):
        await consumer.subscribe([names("missing")], RecordingListener())
    with pytest.raises(TopicError):
        await consumer.subscribe([topic, names("missing")], RecordingListener())


async def test_poll_before_subscribe_raises(log: LogBackend, names: Names) -> None:
    consumer = log.consumer(names("group"))
    with pytest.raises(LogError):
        await consumer.poll(10, 0.0)
