"""A keyed windowed pipeline left running on Kafka keeps its internal topics bounded: the
repartition topic's log start follows the group's commits while it runs, and once the broker's
cleaner has been over the window's changelog, no closed window is left in it (each was
tombstoned when it closed). Its output equals the counts computed from the input alone."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson
from aiokafka import TopicPartition as KafkaPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from support.cli import Cli, background
from support.kafka import admin, consumer

from operators.windowed import WINDOWS
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.kafka import KafkaLog
from pipelines.settings import KafkaSettings
from pipelines.state.store import split_key

WINDOW_MS = 2000

PIPELINE = """
from datetime import timedelta

from connectors.files import JsonLines, JsonLinesSink
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("{name}")
    .source(
        JsonLines("clicks.jsonl", follow=True, poll_interval=0.05),
        into=Topic("{name}-clicks", partitions=2),
    )
    .key_by("by-user", lambda click: click["user"])
    .window(
        "windows",
        Tumbling(timedelta(milliseconds={window_ms})),
        time=lambda click: click["ts"],
        lateness=timedelta(milliseconds=500),
        idle=timedelta(seconds=1),
    )
    .count("count")
    .sink(JsonLinesSink("counts.jsonl"))
)
"""

CLEANER = {  # let the broker compact the changelog within the test (AlterConfigs replaces all)
    "cleanup.policy": "compact",
    "segment.ms": "1000",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "1000",
}


def write_clicks(path: Path, seconds: float, rate: int) -> None:
    """``rate`` clicks a second over 50 users, stamped with the time of writing."""
    started, n = time.monotonic(), 0
    with path.open("ab") as file:
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate)
            now_ms = int(time.time() * 1000)
            lines = [orjson.dumps({"user": f"u{i % 50}", "ts": now_ms}) for i in range(n, due)]
            if lines:
                file.write(b"\n".join(lines) + b"\n")
                file.flush()
                n = due
            time.sleep(0.05)


def reference_counts(path: Path) -> Counter[tuple[str, int]]:
    counts: Counter[tuple[str, int]] = Counter()
    for line in path.read_bytes().splitlines():
        click = orjson.loads(line)
        counts[(click["user"], click["ts"] // WINDOW_MS * WINDOW_MS)] += 1
    return counts


def emitted(path: Path) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():
            row = orjson.loads(line)
            start = int(datetime.fromisoformat(row["start"]).timestamp() * 1000)
            counts[(row["key"], start)] = row["value"]
    return counts


async def window_values(bootstrap: str, changelog: str) -> tuple[int, int]:
    """(records, records holding the value of a window) in the whole changelog."""
    async with consumer(bootstrap) as reader:
        kafka_tps = [KafkaPartition(changelog, p) for p in range(2)]
        reader.assign(kafka_tps)
        ends = await reader.end_offsets(kafka_tps)
        read = values = 0
        while [tp for tp in kafka_tps if await reader.position(tp) < ends[tp]]:
            for records in (await reader.getmany(timeout_ms=1000)).values():
                read += len(records)
                values += sum(
                    1
                    for r in records
                    if r.key is not None and r.value is not None and split_key(r.key)[0] == WINDOWS
                )
    return read, values


async def set_cleaner(bootstrap: str, topic: str) -> None:
    async with admin(bootstrap) as client:
        await client.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=CLEANER)]
        )


async def roll(bootstrap: str, changelog: str) -> None:
    """Append a tombstone of a key no step uses to each partition, so the segment holding the
    run's records is no longer the active one (only those are cleaned). It is stamped now: the
    broker rolls by the time between the segment's first record and the new one."""
    log = KafkaLog(KafkaSettings(bootstrap_servers=bootstrap))
    try:
        producer = log.producer()
        for partition in range(2):
            await producer.send(
                changelog, partition, RawBatch([b'["rolled"]'], [None], [int(time.time() * 1000)])
            )
        await producer.flush()
        await producer.close()
    finally:
        await log.close()


async def watch(bootstrap: str, name: str, writing: threading.Thread, run: Cli) -> list[int]:
    """While ``writing`` runs: sample the repartition topic's log start (summed over its
    partitions) every 2 s, and give the changelog the cleaner settings once it exists."""
    repartition = [TopicPartition(f"{name}.by-user", p) for p in range(2)]
    changelog = f"{name}.count.changelog"
    log = KafkaLog(KafkaSettings(bootstrap_servers=bootstrap))
    starts: list[int] = []
    configured = False
    try:
        while writing.is_alive():
            await asyncio.sleep(2)
            assert run.running(), run.stderr()[-3000:]
            if not configured and changelog in await log.describe_topics():
                await set_cleaner(bootstrap, changelog)
                configured = True
            starts.append(sum((await log.start_offsets(repartition)).values()))
    finally:
        await log.close()
    assert configured, "the changelog was never created"
    return starts


def test_a_windowed_run_keeps_kafka_topics_bounded(
    tmp_path: Path, kafka: str, kafka_names: Callable[[str], str]
) -> None:
    name = kafka_names("soak")
    (tmp_path / "soak.py").write_text(PIPELINE.format(name=name, window_ms=WINDOW_MS))
    (tmp_path / "clicks.jsonl").touch()
    args = ["run", "soak.py", "--backend", "kafka", "--bootstrap-servers", kafka, "--workers", "2"]
    env = {"HEADWATER_HOUSEKEEPING_SECONDS": "1"}
    with background(args, cwd=tmp_path, name="run", env=env) as run:
        writer = threading.Thread(target=write_clicks, args=(tmp_path / "clicks.jsonl", 20, 300))
        writer.start()
        try:
            starts = asyncio.run(watch(kafka, name, writer, run))
        finally:
            writer.join()
        expected = reference_counts(tmp_path / "clicks.jsonl")
        deadline = time.monotonic() + 60
        while emitted(tmp_path / "counts.jsonl") != expected and time.monotonic() < deadline:
            time.sleep(1)
        assert run.terminate() == 128 + signal.SIGTERM, run.stderr()[-3000:]
        assert "Traceback" not in run.stderr(), run.stderr()[-3000:]

    assert emitted(tmp_path / "counts.jsonl") == expected
    # the repartition topic was purged as the group committed, again and again
    assert starts[-1] > 0, starts
    assert len(set(starts)) >= 3, starts
    assert starts == sorted(starts), starts

    # every window closed, each with a tombstone: once the broker's cleaner has been over the
    # changelog, no window's value is left in it
    changelog = f"{name}.count.changelog"
    _, before = asyncio.run(window_values(kafka, changelog))
    assert before > 0  # the segment still being written was not cleaned
    time.sleep(1.5)  # past segment.ms: the next append rolls that segment
    asyncio.run(roll(kafka, changelog))
    deadline = time.monotonic() + 90  # the cleaner looks every log.cleaner.backoff.ms
    read, values = asyncio.run(window_values(kafka, changelog))
    while values and time.monotonic() < deadline:
        time.sleep(2)
        read, values = asyncio.run(window_values(kafka, changelog))
    assert values == 0, f"{values} values of closed windows still in the changelog ({read} records)"
