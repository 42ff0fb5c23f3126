"""Transactions on the embedded log: records are appended as they are sent, invisible until the
transaction's commit marker; readers stop before an open transaction (the last stable offset)
and pass over aborted ones, across segment rolls, compaction and retention; a zombie's frames
never become visible; data directories of earlier versions read back. (Crashes at each step of
a commit: ``tests/chaos/test_exactly_once.py``.)"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import orjson
import pytest
from support.logs import EmbeddedView

from pipelines.errors import FencedError
from pipelines.log._commits import CommitRecord, pending_commits
from pipelines.log._compaction import compact
from pipelines.log._partition_file import PartitionFile, encode_frame
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.check import check_log
from pipelines.log.embedded import EmbeddedLog

OUT = TopicPartition("out", 0)
IN = TopicPartition("in", 0)


def values_batch(*values: bytes, key: bytes | None = None) -> RawBatch:
    return RawBatch([key] * len(values), list(values), [1] * len(values))


async def opened(data_dir: Path, **kwargs: int) -> EmbeddedLog:
    log = EmbeddedLog(data_dir, **kwargs)  # type: ignore[arg-type]
    await log.create_topics([TopicSpec("out", 1), TopicSpec("in", 1)])
    return log


async def visible(log: EmbeddedLog, tp: TopicPartition = OUT) -> list[tuple[int, bytes | None]]:
    """Every record a reader sees on ``tp``, with its offset, read to the last stable offset."""
    found: list[tuple[int, bytes | None]] = []
    offset = 0
    end = (await log.end_offsets([tp]))[tp]
    while offset < end:
        fetched = await log.read(tp, offset, 3)
        found += zip(fetched.offsets, fetched.records.values, strict=True)
        assert fetched.next_offset > offset, f"stuck at {offset} below the end {end}"
        offset = fetched.next_offset
    return found


async def test_a_reader_waits_at_an_open_transaction_then_sees_it_in_order(
    tmp_path: Path,
) -> None:
    log = await opened(tmp_path)
    try:
        log.append(OUT, values_batch(b"before"))
        transaction = log.transactional_producer("g.1.0")
        await transaction.send("out", 0, values_batch(b"t1"))
        log.append(OUT, values_batch(b"plain"))  # after the open transaction's first frame
        await transaction.send("out", 0, values_batch(b"t2", b"t3"))
        # a reader stops before the open transaction, and so does the end it is told
        assert await visible(log) == [(0, b"before")]
        fetched = await log.read(OUT, 1, 100)
        assert (len(fetched.records), fetched.next_offset) == (0, 1)
        # a consumer polling there waits, then gets everything once committed, in offset order
        consumer = log.consumer("readers")
        got: list[bytes | None] = []

        class Listener:
            async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None: ...

            async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None: ...

        await consumer.subscribe(["out"], Listener())
        for fetched in await consumer.poll(100, timeout=0.5):
            got += fetched.records.values
        assert got == [b"before"]
        await transaction.commit({IN: 1}, "g")
        deadline = time.monotonic() + 5
        while len(got) < 5 and time.monotonic() < deadline:
            for fetched in await consumer.poll(100, timeout=0.5):
                got += fetched.records.values
        await consumer.close()
        assert got == [b"before", b"t1", b"plain", b"t2", b"t3"]
        assert await visible(log) == list(enumerate(got))
        assert await log.committed_offsets("g", [IN]) == {IN: 1}
        await transaction.close()
    finally:
        await log.close()


async def test_aborted_records_are_passed_over_and_never_counted(tmp_path: Path) -> None:
    log = await opened(tmp_path)
    try:
        transaction = log.transactional_producer("g.1.0")
        await transaction.send("out", 0, values_batch(b"a"))
        await transaction.commit({}, "g")
        await transaction.send("out", 0, values_batch(b"x", b"y"))
        await transaction.abort()
        log.append(OUT, values_batch(b"plain"))
        await transaction.send("out", 0, values_batch(b"b"))
        await transaction.close()  # closing aborts what is open
        await transaction.close()
        expected = [(0, b"a"), (3, b"plain")]
        assert await visible(log) == expected
        fetched = await log.read(OUT, 1, 100)  # a read that starts in an aborted frame
        assert (fetched.records.values, list(fetched.offsets)) == ([b"plain"], [3])
    finally:
        await log.close()
    fresh = await opened(tmp_path)  # read again by a new process
    try:
        assert await visible(fresh) == expected
        assert (await fresh.end_offsets([OUT]))[OUT] == 5
    finally:
        await fresh.close()


async def test_the_shared_log_view_reads_on_past_a_segment_of_aborted_records(
    tmp_path: Path,
) -> None:
    """A read that starts in a segment holding only aborted records returns none but moves
    on; whoever reads to the end (here the tests' own view of a data directory) must go on
    from ``next_offset`` rather than stop at the first empty batch."""
    log = await opened(tmp_path, segment_bytes=400)
    try:
        transaction = log.transactional_producer("g.1.0")
        for n in range(12):
            await transaction.send("out", 0, values_batch(b"x%02d" % n + b"." * 60))
        await transaction.abort()
        await transaction.send("out", 0, values_batch(b"kept"))
        await transaction.commit({}, "g")
        await transaction.close()
        first = await log.read(OUT, 0, 100)
        assert (len(first.records), first.next_offset > 0) == (0, True)
        expected = await visible(log)
    finally:
        await log.close()
    assert [value for _, value in expected] == [b"kept"]
    view = EmbeddedView(tmp_path)  # synchronous: it runs a loop of its own
    assert await asyncio.to_thread(view.values, "out", 1) == [[b"kept"]]


async def test_a_transaction_across_segment_rolls(tmp_path: Path) -> None:
    """A transaction open while its partition rolls: the seal lists it open, so a new reader
    of the next segment stops before it too; its marker in a later segment decides it."""
    log = await opened(tmp_path, segment_bytes=400)
    try:
        transaction = log.transactional_producer("g.1.0")
        log.append(OUT, values_batch(b"p0"))
        sent = []
        for n in range(12):
            value = b"t%02d" % n + b"." * 60
            await transaction.send("out", 0, values_batch(value))
            sent.append(value)
            if n % 3 == 0:
                log.append(OUT, values_batch(b"plain%d" % n))
        assert len(log._file(OUT).segments()) > 3
        fresh = await opened(tmp_path, segment_bytes=400)
        try:
            assert await visible(fresh) == [(0, b"p0")]
            assert (await fresh.end_offsets([OUT]))[OUT] == 1
        finally:
            await fresh.close()
        await transaction.commit({}, "g")
        await transaction.close()
        seen = [value for _, value in await visible(log)]
        assert [v for v in seen if v is not None and v.startswith(b"t")] == sent
        assert len(seen) == 1 + 12 + 4
    finally:
        await log.close()
    fresh = await opened(tmp_path, segment_bytes=400)
    try:
        assert [v for _, v in await visible(fresh)] == seen
    finally:
        await fresh.close()


async def test_fencing_alone_stops_the_earlier_owner(tmp_path: Path) -> None:
    """What a task's new owner does before it reads the offsets it resumes from: ``fence()``,
    with nothing sent yet, makes the earlier owner's commit fail (and returns once that owner
    let go), so the offsets read next are final."""
    log = await opened(tmp_path)
    try:
        old = log.transactional_producer("g.1.0")
        await old.send("out", 0, values_batch(b"old"))
        new = log.transactional_producer("g.1.0")
        fencing = asyncio.create_task(new.fence())
        await asyncio.sleep(0.1)
        assert not fencing.done(), "the new owner took the id while the old one held it"
        with pytest.raises(FencedError):
            await old.commit({IN: 9}, "g")
        await old.close()
        await asyncio.wait_for(fencing, 5)
        assert await log.committed_offsets("g", [IN]) == {}
        await new.close()
        assert await visible(log) == []
    finally:
        await log.close()


async def test_a_zombies_frames_never_become_visible(tmp_path: Path) -> None:
    """The next owner of a transactional id fences the one still open: the old owner's next
    commit fails, and what it sent, before and after, is aborted when it closes; the new owner
    starts once it has."""
    log = await opened(tmp_path)
    try:
        old = log.transactional_producer("g.1.0")
        await old.send("out", 0, values_batch(b"old-1"))
        new = log.transactional_producer("g.1.0")
        taking_over = asyncio.create_task(new.send("out", 0, values_batch(b"new")))
        await asyncio.sleep(0.1)
        assert not taking_over.done(), "the new owner wrote while the old one held the id"
        await old.send("out", 0, values_batch(b"old-2"))  # late: after the new owner asked
        with pytest.raises(FencedError):
            await old.commit({IN: 9}, "g")
        await old.close()
        await asyncio.wait_for(taking_over, 5)
        await new.commit({IN: 1}, "g")
        await new.close()
        assert [v for _, v in await visible(log)] == [b"new"]
        assert await log.committed_offsets("g", [IN]) == {IN: 1}
    finally:
        await log.close()


async def test_a_dead_owners_open_transaction_is_aborted_by_the_next_claim(
    tmp_path: Path,
) -> None:
    """An owner gone without a word (its owner lock released, as the kernel does on kill -9):
    a member claiming a partition of any group aborts what it left open."""
    log = await opened(tmp_path)
    try:
        dead = log.transactional_producer("g.1.0")
        await dead.send("out", 0, values_batch(b"lost"))
        os.close(dead._owner)  # type: ignore[attr-defined]
        log.append(OUT, values_batch(b"after"))
        assert await visible(log) == []
        log.recover_transactions("some-group")
        assert await visible(log) == [(1, b"after")]
    finally:
        await log.close()


async def test_compaction_drops_aborted_records_and_keeps_committed_ones(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=300)
    tp = TopicPartition("table", 0)
    try:
        await log.create_topics([TopicSpec("table", 1, compacted=True)])
        transaction = log.transactional_producer("g.1.0")
        for n in range(20):
            await transaction.send("table", 0, values_batch(b"c%d" % n, key=b"k%d" % (n % 3)))
            await transaction.commit({}, "g")
            await transaction.send("table", 0, values_batch(b"x%d" % n, key=b"k%d" % (n % 3)))
            await transaction.abort()
        await transaction.send("table", 0, values_batch(b"open", key=b"k0"))  # stays open
        before = await visible(log, tp)
        assert [v for _, v in before if v and v.startswith(b"x")] == []
        file = PartitionFile(log._file(tp).path, segment_bytes=300)
        try:
            dropped = compact(file, segment_bytes=300, now_ms=int(time.time() * 1000), force=True)
        finally:
            file.close()
        after = await visible(log, tp)
        assert dropped > 0 and len(after) < len(before)
        assert set(after) <= set(before)  # nothing aborted came back, every offset kept
        assert latest_by_value(after) == latest_by_value(before)
        await transaction.commit({}, "g")
        await transaction.close()
        assert (await visible(log, tp))[-1][1] == b"open"
    finally:
        await log.close()
    assert check_log(tmp_path).exit_code == 0


def latest_by_value(records: list[tuple[int, bytes | None]]) -> dict[int, bytes | None]:
    """The last value of each key k0..k2 (values c<n> are of key n % 3)."""
    return {int(v[1:]) % 3: v for _, v in records if v is not None}


async def test_retention_never_drops_past_an_open_transaction(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=300)
    spec = TopicSpec("short", 1, retention_ms=1)
    tp = TopicPartition("short", 0)
    try:
        await log.create_topics([spec])
        log.append(tp, values_batch(b"old" * 40))
        transaction = log.transactional_producer("g.1.0")
        await transaction.send("short", 0, values_batch(b"open" * 40))
        for _ in range(4):
            log.append(tp, values_batch(b"later" * 30))
        file = log._file(tp)
        assert len(file.segments()) > 2
        await log.enforce_retention([spec], now_ms=int(time.time() * 1000) + 10_000)
        assert file.log_start() <= 1, "retention dropped an open transaction's records"
        await transaction.commit({}, "g")
        await transaction.close()
        await log.enforce_retention([spec], now_ms=int(time.time() * 1000) + 10_000)
        assert file.log_start() > 1
    finally:
        await log.close()


# -- data directories of earlier versions ----------------------------------------------------


def write_old_commit(directory: Path, record: CommitRecord) -> Path:
    """A commit file as earlier versions wrote them (see :mod:`pipelines.log._commits`)."""
    frames = [encode_frame(0, records) for _, records in record.batches]
    meta = orjson.dumps(
        {
            "transaction": record.transaction,
            "sequence": record.sequence,
            "group": record.group,
            "offsets": [[tp.topic, tp.partition, o] for tp, o in record.offsets.items()],
            "frames": [
                [tp.topic, tp.partition, len(frame)]
                for (tp, _), frame in zip(record.batches, frames, strict=True)
            ],
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.transaction:016x}-{record.sequence}.commit"
    path.write_bytes(b"".join([struct.pack("<I", len(meta)), meta, *frames]))
    return path


async def test_a_directory_of_an_earlier_version_reads_back(tmp_path: Path) -> None:
    """Frames an earlier version's commits appended (marked, not pending) are committed
    records; a commit file it left behind is applied by the next claim, once."""
    log = await opened(tmp_path)
    try:
        log._file(OUT).append(values_batch(b"a", b"b"), (7, 1))  # as the old apply appended them
        log.append(OUT, values_batch(b"c"))
        commits = tmp_path / "groups" / "g" / "commits"
        record = CommitRecord(7, 2, "g", {IN: 4}, [(OUT, values_batch(b"d"))])
        path = write_old_commit(commits, record)
        stale = path.read_bytes()
        assert await visible(log) == [(0, b"a"), (1, b"b"), (2, b"c")]
        log.recover_transactions("g")
        assert pending_commits(commits) == []
        path.write_bytes(stale)  # applied again, as after a crash before its removal
        log.recover_transactions("g")
        assert await visible(log) == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]
        assert await log.committed_offsets("g", [IN]) == {IN: 4}
    finally:
        await log.close()


async def test_a_reader_with_records_ahead_sees_the_marker_that_unblocks_it(
    tmp_path: Path,
) -> None:
    """A reader blocked at an open transaction, with many records indexed past it, reads on as
    soon as the transaction's marker is appended."""
    log = await opened(tmp_path)
    reader = await opened(tmp_path)  # another process's view of the partition
    try:
        transaction = log.transactional_producer("g.1.0")
        await transaction.send("out", 0, values_batch(b"t"))
        log.append(OUT, values_batch(*[b"%d" % n for n in range(50)]))
        assert (await reader.read(OUT, 0, 5)).next_offset == 0
        await transaction.commit({}, "g")
        fetched = await reader.read(OUT, 0, 5)
        assert fetched.records.values == [b"t", b"0", b"1", b"2", b"3"]
        await transaction.close()
    finally:
        await reader.close()
        await log.close()
