"""Housekeeping keeps a running pipeline's embedded log bounded: repartition topics purged below
the group's committed offsets, topics past their ``retention_ms`` trimmed, whole sealed
segments at a time; and the pipeline's output stays what the input alone says."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from support.cli import headwater
from support.logs import numbered

from connectors.memory import Collect, Iterable
from pipelines.errors import PipelineDefinitionError
from pipelines.log._compaction import compact
from pipelines.log._partition_file import segment_paths
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.embedded import EmbeddedLog
from pipelines.pipeline import Pipeline
from pipelines.runtime.housekeeping import Housekeeping, housekeeping_seconds
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.sources import load_positions
from pipelines.runtime.topology import compile_pipeline
from pipelines.state.table import TableStore
from pipelines.topic import Topic

SMALL = 4096


PIPELINE = """
from datetime import timedelta
import os
from connectors.files import JsonLines, JsonLinesSink
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("kept", processing_guarantee=os.environ.get("GUARANTEE", "at_least_once"))
    .source(
        JsonLines("events.jsonl"),
        into=Topic("events", partitions=2, retention_ms=int(os.environ["RETENTION_MS"])),
    )
    .key_by("by-user", lambda e: e["user"])
    .count("count")
    .sink(JsonLinesSink("counts.jsonl"))
)
"""


async def test_a_round_purges_repartition_topics_below_the_committed_offsets(
    tmp_path: Path,
) -> None:
    module = tmp_path / "kept.py"
    module.write_text(PIPELINE)
    os.environ["RETENTION_MS"] = "60000"
    try:
        spec = importlib.util.spec_from_file_location("kept_pipeline", module)
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    finally:
        del os.environ["RETENTION_MS"]
    topology = compile_pipeline(loaded.pipeline)
    log = EmbeddedLog(tmp_path / "data", segment_bytes=SMALL)
    await log.create_topics([t.spec for t in (*topology.topics, topology.positions_topic)])
    by_user = TopicPartition("kept.by-user", 0)
    events = TopicPartition("events", 0)
    now = int(time.time() * 1000)
    for start in range(0, 3000, 50):
        log.append(by_user, numbered(start, 50, now))
        log.append(events, numbered(start, 50, now - 120_000 if start < 2000 else now))
    log.store_offsets(topology.group, {by_user: 1500})

    await Housekeeping(log, topology, every=1.0).run()

    repartition_start, _, _ = log.size_on_disk(by_user)
    assert 1000 < repartition_start <= 1500  # whole segments below the committed offset
    events_start, _, _ = log.size_on_disk(events)
    assert 1500 < events_start <= 2000  # whole segments older than the retention
    assert log.read_now(by_user, repartition_start, 10).records.values[0] == (
        b"%d" % repartition_start
    )
    untouched = TopicPartition("kept.by-user", 1)
    assert log.size_on_disk(untouched)[0] == 0


def test_the_round_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATER_HOUSEKEEPING_SECONDS", "0.5")
    assert housekeeping_seconds() == 0.5
    monkeypatch.setenv("HEADWATER_HOUSEKEEPING_SECONDS", "soon")
    with pytest.raises(PipelineDefinitionError, match="positive number"):
        housekeeping_seconds()


@pytest.mark.slow
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_run_keeps_its_topics_bounded_and_its_counts_exact(
    tmp_path: Path, guarantee: str
) -> None:
    """60,000 events over 500 users through a key_by: the repartition topic's start moves up
    while the run goes on, every user's last count is its number of events, a second run
    restores them from the changelog (compacted as it went), and the changelog compacts to one
    record per key."""
    (tmp_path / "kept.py").write_text(PIPELINE)
    users = [f"u{(i * 7919) % 500}" for i in range(60_000)]
    (tmp_path / "events.jsonl").write_bytes(
        b"".join(orjson.dumps({"user": u, "i": i}) + b"\n" for i, u in enumerate(users))
    )
    env = {
        "HEADWATER_SEGMENT_BYTES": "4096",
        "HEADWATER_HOUSEKEEPING_SECONDS": "0.2",
        "RETENTION_MS": str(7 * 24 * 3600 * 1000),
        "GUARANTEE": guarantee,
    }
    run = headwater("run", "kept.py", "--workers", "2", cwd=tmp_path, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    last: dict[str, int] = {}
    for line in (tmp_path / "counts.jsonl").read_bytes().splitlines():
        row = orjson.loads(line)
        last[row["key"]] = max(last.get(row["key"], 0), row["value"])
    assert last == dict(Counter(users))
    for partition in range(2):
        first = tmp_path / ".headwater" / "topics" / "kept.by-user" / f"{partition}.log"
        segments = segment_paths(first)
        assert segments[0][0] > 0, "the repartition topic was never purged"
        assert len(segments) <= 6, segments
    events = tmp_path / ".headwater" / "topics" / "events" / "0.log"
    assert segment_paths(events)[0][0] == 0  # within its retention: kept whole

    # a second run restores the counts from the compacted changelog and goes on from them
    more = [f"u{(i * 31) % 500}" for i in range(20_000)]
    with (tmp_path / "events.jsonl").open("ab") as file:
        file.write(b"".join(orjson.dumps({"user": u}) + b"\n" for u in more))
    again = headwater("run", "kept.py", "--workers", "2", cwd=tmp_path, env=env, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    last = {}
    for line in (tmp_path / "counts.jsonl").read_bytes().splitlines():
        row = orjson.loads(line)
        last[row["key"]] = max(last.get(row["key"], 0), row["value"])
    assert last == dict(Counter(users + more))

    log = EmbeddedLog(tmp_path / ".headwater")
    written = kept = 0
    # every user counted in both runs, so the changelog holds two records of each at least (one
    # run may commit every count once); compacted whole, one record per key is left
    for partition in range(2):
        changelog = TopicPartition("kept.count.changelog", partition)
        partition_file = log._file(changelog)
        partition_file.roll()
        compact(partition_file, segment_bytes=4096, now_ms=int(time.time() * 1000), force=True)
        offset, end = 0, partition_file.end_offset()
        written += end
        keys: list[bytes | None] = []
        while offset < end:
            fetched = log.read_now(changelog, offset, 1000)
            keys += fetched.records.keys
            offset = fetched.next_offset
        kept += len(keys)
        assert len(keys) == len(set(keys))
    assert kept < written, (kept, written)


def test_records_appended_while_purging_are_kept(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    asyncio.run(log.create_topics([TopicSpec("t", 1)]))
    tp = TopicPartition("t", 0)
    for start in range(0, 1000, 50):
        log.append(tp, numbered(start, 50, 0))
    asyncio.run(log.purge({tp: 10**9}))
    start = log.size_on_disk(tp)[0]
    log.append(tp, numbered(1000, 50, 0))
    values = []
    offset = start
    while offset < 1050:
        fetched = log.read_now(tp, offset, 100)
        values += fetched.records.values
        offset = fetched.next_offset
    assert values == [b"%d" % n for n in range(start, 1050)]


async def test_a_quiet_partition_s_last_records_expire_once_its_segment_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records in the active segment of a partition nobody writes to any more are sealed off
    after ``HEADWATER_SEGMENT_MS`` (or the topic's retention, if shorter) and then expire; a
    writer that comes back appends after them."""
    monkeypatch.setenv("HEADWATER_SEGMENT_MS", "5000")
    log = EmbeddedLog(tmp_path)  # 64 MiB segments: a few records never fill one
    kept = TopicSpec("kept", 1, retention_ms=60_000)
    other = TopicSpec("other", 1)  # no retention: rolled after HEADWATER_SEGMENT_MS
    await log.create_topics([kept, other])
    tp, other_tp = TopicPartition("kept", 0), TopicPartition("other", 0)
    now = int(time.time() * 1000)
    log.append(tp, numbered(0, 50, now - 120_000))
    log.append(other_tp, numbered(0, 50, now))

    await log.roll_segments([kept, other], now)  # first seen: not rolled yet
    await log.roll_segments([kept, other], now + 4_000)
    assert len(log._file(tp).segments()) == len(log._file(other_tp).segments()) == 1
    await log.roll_segments([kept, other], now + 5_000)
    assert len(log._file(tp).segments()) == len(log._file(other_tp).segments()) == 2

    await log.enforce_retention([kept], now + 5_000)
    assert log.size_on_disk(tp)[0] == 50  # the quiet records expired
    assert log.size_on_disk(other_tp)[0] == 0  # no retention: kept

    log.append(tp, numbered(50, 10, now))
    fetched = log.read_now(tp, 50, 100)
    assert list(fetched.offsets) == list(range(50, 60))
    await log.roll_segments([kept], now + 10_000)
    await log.roll_segments([kept], now + 20_000)  # a segment of new records rolls too
    assert log._file(tp).segments()[-1][0] == 60


def test_the_age_of_a_segment_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATER_SEGMENT_MS", "soon")
    with pytest.raises(PipelineDefinitionError, match="HEADWATER_SEGMENT_MS='soon'"):
        EmbeddedLog(tmp_path)


async def test_readers_from_the_beginning_start_where_the_log_now_starts(tmp_path: Path) -> None:
    """A table's bootstrap and the source positions read a topic from its first record still
    on the log, not from offset 0, which retention may have removed."""
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    table_topic = Topic("customers", partitions=1, retention_ms=60_000, key=bytes, value=bytes)
    positions_topic = Topic("positions", partitions=1, compacted=True, value=dict)
    await log.create_topics([table_topic.spec, positions_topic.spec])
    customers, positions = TopicPartition("customers", 0), TopicPartition("positions", 0)
    now = int(time.time() * 1000)
    for start in range(0, 1000, 50):
        stamp = now - 120_000 if start < 500 else now
        log.append(customers, numbered(start, 50, stamp))
        log.append(positions, RawBatch([b"source"] * 50, [b"%d" % start] * 50, [stamp] * 50))
    await log.enforce_retention([table_topic.spec], now)
    log._file(positions).drop(below=500)  # as if retention had removed them too
    start = log.size_on_disk(customers)[0]
    assert 0 < start <= 500

    table = TableStore(table_topic, 0)
    assert await table.bootstrap(log) == 1000 - start
    assert table.get(b"k999") == b"999"
    assert table.get(b"k0") is None
    assert await load_positions(log, positions_topic) == {"source": 950}


async def test_an_in_process_run_keeps_its_log_bounded_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run inside the process (a notebook's ``watch``, ``pipelines.testing``) has the same
    housekeeping as ``headwater run``: its repartition topic is purged as it goes."""
    monkeypatch.setenv("HEADWATER_HOUSEKEEPING_SECONDS", "0.05")
    users = [f"u{(i * 7919) % 500}" for i in range(40_000)]
    counts = Collect()
    pipeline = (
        Pipeline("inside")
        .source(Iterable([{"user": u} for u in users]), into=Topic("events", partitions=2))
        .key_by("by-user", lambda e: e["user"])
        .count("count")
        .sink(counts)
    )
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    await run_in_process(compile_pipeline(pipeline), log, max_batch=500)
    starts = await log.start_offsets([TopicPartition("inside.by-user", p) for p in range(2)])
    assert all(start > 0 for start in starts.values()), starts
    last: dict[str, int] = {}
    for user, count in zip(counts.keys, counts.values, strict=True):
        last[user] = max(last.get(user, 0), count)
    assert last == dict(Counter(users))


async def test_a_size_limit_keeps_the_newest_segments_that_hold_it(tmp_path: Path) -> None:
    """``retention_bytes``, per partition as on Kafka: the oldest sealed segments go while
    the ones after them still hold that many bytes; a round drops nothing more after."""
    log = EmbeddedLog(tmp_path, segment_bytes=SMALL)
    capped = Topic("capped", partitions=1, retention_bytes=5 * SMALL).spec
    await log.create_topics([capped])
    tp = TopicPartition("capped", 0)
    now = int(time.time() * 1000)
    for start in range(0, 3000, 50):
        log.append(tp, numbered(start, 50, now))
    before = log.size_on_disk(tp)
    await log.enforce_retention([capped], now)
    start, segments, size = log.size_on_disk(tp)
    assert before[2] > 10 * SMALL
    assert 5 * SMALL <= size < 6 * SMALL + SMALL // 2, (size, segments)
    fetched = log.read_now(tp, start, 10)
    assert fetched.records.values[0] == b"%d" % start
    await log.enforce_retention([capped], now)
    assert log.size_on_disk(tp) == (start, segments, size)


def test_a_retention_must_be_a_positive_whole_number() -> None:
    with pytest.raises(PipelineDefinitionError, match="retention_bytes= needs a positive"):
        Topic("t", retention_bytes=0)
    with pytest.raises(PipelineDefinitionError, match="retention_ms= needs a positive"):
        Topic("t", retention_ms=1.5)  # type: ignore[arg-type]
