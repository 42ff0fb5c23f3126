"""A consumer of the embedded log is woken when another process appends to its partitions
(inotify, :mod:`pipelines.log._wakeup`) instead of finding the records at its next poll; it
falls back to polling where inotify is unavailable, and leaves no file descriptor behind."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from pipelines.log import _local, _wakeup, embedded
from pipelines.log._local import AppendWaiter
from pipelines.log._partition_file import segment_paths
from pipelines.log.base import Consumer, RawBatch, TopicPartition, TopicSpec
from pipelines.log.embedded import EmbeddedLog

from .test_embedded_durability import _PRELUDE, Child

TOPIC = "events"
PARTITIONS = 2
LONG = 10.0
"""Seconds a poll may wait: far beyond any wake-up."""
FAIL_AFTER = 2.0
"""Seconds after which a consumer is taken not to have been woken at all."""
WAKE_UPS = 20
WAKE_LIMIT = 0.05
"""Seconds from an append to the waiting consumer's poll returning with it, at most: generous,
so that a busy machine does not fail the test (it takes well under 1 ms on an idle one)."""

# On each line "<partition> <records>" from stdin, appends that many 100-byte records to the
# partition, then prints "appended <time.monotonic()>" (the clock is the whole machine's).
APPENDER = (
    _PRELUDE
    + """
import time
segment_bytes = int(sys.argv[3])

async def main():
    producer = EmbeddedLog(data_dir, segment_bytes=segment_bytes).producer()
    print("ready", flush=True)
    for line in sys.stdin:
        partition, count = map(int, line.split())
        batch = RawBatch([None] * count, [b"x" * 100] * count, [0] * count)
        await producer.send(topic, partition, batch)
        print("appended", time.monotonic(), flush=True)

asyncio.run(main())
"""
)


class _Listener:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


@pytest.fixture
def backstops_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a wake-up ends a wait early: no 5 ms poll, no membership check within the test."""
    monkeypatch.setattr(embedded, "_POLL_SECONDS", 60.0)
    monkeypatch.setattr(_local, "REBALANCE_CHECK_SECONDS", 60.0)


@pytest.fixture
def appender(tmp_path: Path) -> Iterator[Callable[[int], Child]]:
    """Starts the appender process on ``tmp_path/log`` with the given segment size."""
    started: list[Child] = []

    def start(segment_bytes: int) -> Child:
        child = Child(APPENDER, tmp_path / "log", TOPIC, segment_bytes)
        started.append(child)
        child.expect(lambda line: line == "ready")
        return child

    yield start
    for child in started:
        child.stop()


async def _log(tmp_path: Path, segment_bytes: int | None = None) -> EmbeddedLog:
    log = EmbeddedLog(tmp_path / "log", segment_bytes=segment_bytes)
    await log.create_topics([TopicSpec(TOPIC, PARTITIONS)])
    return log


async def _member(log: EmbeddedLog, group: str = "readers") -> Consumer:
    """A consumer that owns every partition of the topic (none of them has records)."""
    consumer = log.consumer(group)
    await consumer.subscribe([TOPIC], _Listener())
    assert await consumer.poll(100, 0) == []
    assert len(consumer.assignment()) == PARTITIONS
    return consumer


async def _woken(consumers: list[Consumer], child: Child, partition: int, count: int) -> float:
    """Seconds from the child's append of ``count`` records to the last of ``consumers``, all
    waiting in ``poll``, returning with them."""
    polls = [asyncio.create_task(c.poll(1000, LONG)) for c in consumers]
    await asyncio.sleep(0.02)  # every poll has looked and is waiting now
    assert not any(poll.done() for poll in polls)
    child.send(f"{partition} {count}")
    fetched = await asyncio.wait_for(asyncio.gather(*polls), FAIL_AFTER)
    returned = time.monotonic()
    appended = float(child.expect(lambda line: line.startswith("appended")).split()[1])
    for batches in fetched:
        assert [(b.partition, len(b.records)) for b in batches] == [(partition, count)]
    return max(returned - appended, 0.0)


def _inotify_fds() -> list[str]:
    """The inotify instances this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listdir itself used
            continue
        if target == "anon_inode:inotify":
            found.append(fd)
    return found


@pytest.fixture
async def events_log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    """An embedded log with the topic, closed after the test."""
    opened = await _log(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.slow
@pytest.mark.usefixtures("backstops_off")
async def test_a_waiting_consumer_wakes_on_each_append_of_another_process(
    events_log: EmbeddedLog, appender: Callable[[int], Child]
) -> None:
    consumer = await _member(events_log)
    child = appender(1 << 20)
    delays = [await _woken([consumer], child, i % PARTITIONS, 1) for i in range(WAKE_UPS)]
    assert max(delays) < WAKE_LIMIT, delays
    # well under the 2.5 ms a 5 ms poll averages
    assert statistics.median(delays) < 0.002, delays
    await consumer.close()


@pytest.mark.slow
@pytest.mark.usefixtures("backstops_off")
async def test_consumers_sharing_a_log_are_each_woken(
    events_log: EmbeddedLog, appender: Callable[[int], Child]
) -> None:
    """Two consumers on one log (an in-process run's workers; here of two groups, so both own
    every partition): one's wake-up does not swallow the other's."""
    consumers = [await _member(events_log, "first"), await _member(events_log, "second")]
    child = appender(1 << 20)
    for i in range(5):
        assert await _woken(consumers, child, i % PARTITIONS, 3) < WAKE_LIMIT
    for consumer in consumers:
        await consumer.close()


@pytest.mark.slow
@pytest.mark.usefixtures("backstops_off")
async def test_a_waiting_consumer_wakes_for_a_segment_a_roll_created(
    tmp_path: Path, appender: Callable[[int], Child]
) -> None:
    log = await _log(tmp_path, segment_bytes=4096)
    consumer = await _member(log)
    child = appender(4096)
    segments = len(segment_paths(tmp_path / "log" / "topics" / TOPIC / "0.log"))
    for _ in range(6):  # ~1.7 KB a batch: a roll every third append, into a new segment file
        assert await _woken([consumer], child, 0, 15) < WAKE_LIMIT
    assert len(segment_paths(tmp_path / "log" / "topics" / TOPIC / "0.log")) >= segments + 2
    await consumer.close()
    await log.close()


async def _woken_within(waiter: AppendWaiter, timeout: float = 0.3) -> bool:
    """Whether ``waiter`` returns well before ``timeout`` (woken), or by it."""
    started = time.monotonic()
    await waiter.wait(timeout)
    return time.monotonic() - started < timeout * 0.8


@pytest.mark.usefixtures("backstops_off")
async def test_the_watches_follow_the_assignment(events_log: EmbeddedLog, tmp_path: Path) -> None:
    """A topic no longer followed does not wake the waiter; one followed does, also when its
    directory is created after the waiter started following it, or deleted and created again."""
    waiter = events_log.append_waiter()
    writer = await _log(tmp_path)  # as another process would
    producer = writer.producer()
    waiter.follow([TopicPartition(TOPIC, 0)])
    waiter.follow([TopicPartition("later", 0)])  # TOPIC revoked; "later" has no directory
    await waiter.wait(0.1)  # (drains what the change queued)
    await producer.send(TOPIC, 1, _one_record())
    assert not await _woken_within(waiter)
    await writer.create_topics([TopicSpec("later", 1)])  # creates its directory
    assert await _woken_within(waiter)
    await producer.send("later", 0, _one_record())
    assert await _woken_within(waiter)
    waiter.follow([TopicPartition("later", 0), TopicPartition(TOPIC, 1)])
    await producer.send(TOPIC, 1, _one_record())
    assert await _woken_within(waiter)

    await writer.close()  # (while its files in the directory are open, the directory stays)
    shutil.rmtree(tmp_path / "log" / "topics" / "later")
    await writer.create_topics([TopicSpec("later", 1)])
    await waiter.wait(0.1)  # the old directory's watch going away, or a timeout
    await waiter.wait(0.1)  # a timeout at the latest: the new directory is watched then
    await producer.send("later", 0, _one_record())
    assert await _woken_within(waiter)
    waiter.close()
    await writer.close()


def _one_record() -> RawBatch:
    return RawBatch([None], [b"x"], [0])


def _no_instance_left(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails() -> int:
        raise OSError(errno.EMFILE, "inotify_init1: Too many open files")

    monkeypatch.setattr(_wakeup, "_open_inotify", fails)


def _no_watch_left(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _wakeup._inotify()

    def fails(fd: int, path: bytes, events: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(
        _wakeup, "_inotify", lambda: _wakeup._Inotify(calls.init1, fails, calls.rm_watch)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("breaks", "fix"),
    [(_no_instance_left, "max_user_instances"), (_no_watch_left, "max_user_watches")],
)
async def test_without_inotify_the_consumer_polls(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    appender: Callable[[int], Child],
    breaks: Callable[[pytest.MonkeyPatch], None],
    fix: str,
) -> None:
    """Where inotify cannot be set up (here at the per-user limit of instances, or of
    watches), the consumer finds appended records by polling every 5 ms, and says why."""
    breaks(monkeypatch)
    monkeypatch.setattr(_local, "REBALANCE_CHECK_SECONDS", 60.0)  # only the poll finds records
    others = _inotify_fds()
    log = await _log(tmp_path)
    with caplog.at_level(logging.WARNING, logger=_wakeup.__name__):
        consumer = await _member(log)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == _wakeup.__name__]
    assert fix in warning and str(tmp_path / "log") in warning
    assert _inotify_fds() == others
    child = appender(1 << 20)
    for i in range(5):
        assert await _woken([consumer], child, i % PARTITIONS, 2) < 1.0
    await consumer.close()
    await log.close()


async def test_closing_leaves_no_file_descriptor(tmp_path: Path) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    others = _inotify_fds()
    for _ in range(3):
        log = await _log(tmp_path)
        consumer = await _member(log)
        await consumer.poll(100, 0.05)  # waits with the inotify fd registered in the loop
        assert len(_inotify_fds()) == len(others) + 1
        await consumer.close()
        assert _inotify_fds() == others
        waiter = log.append_waiter()  # one its consumer never closed: closed with the log
        waiter.follow([TopicPartition(TOPIC, 0)])
        assert len(_inotify_fds()) == len(others) + 1
        await log.close()
        assert _inotify_fds() == others
    assert sorted(os.listdir("/proc/self/fd")) == before
