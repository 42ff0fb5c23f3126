"""Benchmark Headwater's stateful steps: keyed count, tumbling windows, restore, exactly-once.

    python bench/stateful.py [--records N] [--backends embedded kafka] [--quix] [--repeat R]

The pipelines are ``bench/stateful_pipeline.py``. The input is already keyed: a 4-partition
topic (``--partitions``) of JSON events (``workload.event``), each keyed by its user and written
to the partition Kafka's partitioner gives that key, so the pipeline reads it with a
``LogTopic`` source and counts straight away, with no ``key_by``. Event times advance 1 ms per
record (1000 events/s of event time) and end a few minutes before the run, so every window can
close. Each run is one worker process started by ``pipelines.runtime.runner.run`` (as
``headwater run`` starts them), on a fresh copy of the pre-filled log (embedded) or in a fresh
consumer group with fresh output and changelog topics (Kafka).

keyed count
    ``.count("n")`` over ``--keys`` users (10,000), one output record per input record.
window count
    ``.window(Tumbling(minutes=1), idle=--idle-ms)`` then ``.count("n")`` over ``--window-keys``
    users (1,000: about 60 records per key and window), emitted when each window closes.
restore
    a keyed count over ``--restore-keys`` users (500,000), so the changelog holds about one
    record per input record; then the local state copies (``<data-dir>/state``) are deleted and
    each partition's state is restored from the changelog with
    ``pipelines.runtime.state.TaskState.restore`` (a fresh EmbeddedLog each time, as a fresh
    worker has): into memory only (no state directory), and as a fresh worker process does it
    (an empty state directory: the restored state also goes into a new local copy), then from
    the copy that wrote. Reported: changelog records read per second, best of 3, and a warning
    if the restores do not all end with the same number of keys.
exactly-once
    the keyed count again with ``processing_guarantee="exactly_once"``: its rate over the
    at-least-once rate, per backend.
``--quix``
    Quix Streams on the same Kafka input: a stateful ``apply`` that counts per message key in its
    RocksDB state (with changelog topics), writing the count per record, like ``.count``.

How a run is timed: a thread samples the group's committed input offsets (every 5 ms on the
embedded log, 50 ms on Kafka). The rate is the records committed between the first commit seen
and the whole input committed, over that time: it leaves out starting the worker process,
joining the group and, for windows, the idle wait before the last windows close. Headwater
commits every 0.5 s and as soon as its input runs dry, so both ends are commit instants. Quix
commits every 5 s, so Quix runs (and, for comparison, the Headwater Kafka runs) are also timed
on the output topic's high watermarks (``output-sampled``: records appended, inside open
transactions too), from the first output seen to the whole output appended. ``start->done`` is
records over the time from calling ``run`` (or starting the Quix process) to the end. Worker
CPU is the user + system time of the worker process, its start-up included; ``RSS MiB`` is
the most memory the worker processes held at once (``VmRSS`` summed over this process's
children, every ``RSS_SECONDS``), and the report line adds how much of it was anonymous
memory (``RssAnon``: the Python heap, not the mapped pages of the local state copies, which
the kernel can drop); ``others`` is how
many cores the rest of the machine (the Kafka broker too) kept busy meanwhile: a run that had
to share the 2 cores is slower for it. Runs are interleaved over ``--repeat`` rounds and the
best is shown, with every run's rate.

``--profile count|count-eos|window|restore`` instead runs one pipeline in this process
(``pipelines.runtime.inprocess.run_in_process``, one worker, the embedded log) three times:
plain, with CPU timers around the runtime's per-batch functions (``bench/profile_stateless.py``'s
timers, with this file's ``PROBES``), and under cProfile (CPU time); ``restore`` builds the
state first, then times runs that restore it and process one new record per partition. cProfile
slows a run about 20 times, so checkpoints (every 0.5 s of wall time) come far more often per
record than they do unprofiled: read checkpoint costs from the timers.

This is a benchmark, not a test: it prints numbers and warns when an output count is off.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import math
import multiprocessing
import os
import pstats
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import orjson
import profile_stateless
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaPartition
from aiokafka.admin import AIOKafkaAdminClient
from profile_stateless import Probe
from stateless import CpuSnapshot, machine_busy, now_ms, partitions_of
from workload import event

from pipelines.loader import load_pipeline
from pipelines.log import EmbeddedLog
from pipelines.log.base import LogBackend, RawBatch, TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.partitioner import partition_for
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.runner import RunOptions, run
from pipelines.runtime.state import TaskState
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.settings import KafkaSettings

PIPELINE = Path(__file__).resolve().with_name("stateful_pipeline.py")
COUNT_STEP = "n"
"""The count step: it owns the changelog, and for windows the late-data topic."""
WINDOW_MS = 60_000
EVENT_MS = 1
"""Event time between consecutive records: 1000 events/s of event time."""
PREFILL_BATCH = 1000
MIB = 1 << 20
KAFKA_FLUSH_EVERY = 50
"""Prefill batches sent to Kafka between two producer flushes."""
SAMPLE_SECONDS = {"embedded": 0.005, "kafka": 0.05}
RSS_SECONDS = 0.25
"""How often the sampler reads the workers' memory from ``/proc`` (a scan of every process)."""
QUIET_CORES = 0.5
"""Before a run, wait (up to ``--quiet-wait`` s) until the rest of the machine keeps fewer
cores than this busy."""
RESTORE_ATTEMPTS = 3
STOP_GRACE = 30.0

TARGET_COUNT = 200_000
TARGET_WINDOW = 150_000
TARGET_RESTORE = 1_000_000
TARGET_EOS_COST = 0.10

Backend = Literal["embedded", "kafka"]
Guarantee = Literal["at_least_once", "exactly_once"]
ALO: Guarantee = "at_least_once"
EOS: Guarantee = "exactly_once"


@dataclass(frozen=True, slots=True)
class Config:
    """The command line."""

    records: int
    backends: list[Backend]
    quix: bool
    tests: list[str]
    partitions: int
    keys: int
    window_keys: int
    restore_keys: int
    idle_ms: int
    repeat: int
    timeout: float
    quiet_wait: float
    bootstrap: str
    data_root: Path | None
    profile: str | None


@dataclass(frozen=True, slots=True)
class Workload:
    """The pre-filled input of a test: ``records`` events keyed over ``keys`` users."""

    name: str
    kind: Literal["count", "window"]
    records: int
    keys: int

    def key(self, n: int) -> str:
        return f"u{n % self.keys}"

    def expected_output(self) -> int:
        """Output records: one per input record for a count; for the window count, one per key
        and window (record ``n`` has key ``n % keys`` and time ``base + n``, so a window of
        ``m`` consecutive records holds ``min(m, keys)`` keys)."""
        if self.kind == "count":
            return self.records
        base = event_base_ms(self.records)
        total = 0
        first = 0
        while first < self.records:
            window_end = (base + first * EVENT_MS) // WINDOW_MS * WINDOW_MS + WINDOW_MS
            last = min(self.records, -(-(window_end - base) // EVENT_MS))
            total += min(last - first, self.keys)
            first = last
        return total


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One configuration to time."""

    test: str
    workload: Workload
    backend: Backend
    guarantee: Guarantee
    framework: Literal["headwater", "quix"] = "headwater"

    @property
    def label(self) -> str:
        short = "eos" if self.guarantee == EOS else "alo"
        return f"{self.framework}-{self.workload.name}-{self.backend}-{short}"


@dataclass(slots=True)
class Samples:
    """What the sampler saw: (time, records) of the committed input and of the output."""

    committed: list[tuple[float, int]] = field(default_factory=list)
    output: list[tuple[float, int]] = field(default_factory=list)
    done: float | None = None
    timed_out: bool = False
    peak_rss: int = 0
    """The most bytes the worker processes held resident at once."""
    peak_anon: int = 0
    """Of that (its peak, sampled with it), anonymous memory: heaps, not mapped files."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """One timed run."""

    spec: RunSpec
    started: float
    samples: Samples
    cpu: CpuSnapshot
    output: int
    late: int

    @property
    def records(self) -> int:
        return self.spec.workload.records

    @property
    def commit_rate(self) -> float:
        """Records/s between the first commit seen and the whole input committed."""
        return interval_rate(self.samples.committed, self.records)

    @property
    def output_rate(self) -> float:
        """Input records/s between the first output seen and the whole output out (the count
        writes one output record per input record)."""
        return interval_rate(self.samples.output, self.spec.workload.expected_output())

    @property
    def rate(self) -> float:
        """The rate this run is judged by: commit-sampled for Headwater, output-sampled for
        Quix (which commits only every 5 s)."""
        return self.output_rate if self.spec.framework == "quix" else self.commit_rate

    @property
    def total_rate(self) -> float:
        done = self.samples.done
        return self.records / (done - self.started) if done else math.nan

    @property
    def first_commit(self) -> float:
        first = next((t for t, count in self.samples.committed if count > 0), None)
        return first - self.started if first is not None else math.nan

    @property
    def cpu_per_record(self) -> float:
        return self.cpu.workers / self.records * 1e6


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """Restoring every partition's count state of the ``restore`` run, local copies deleted."""

    changelog_records: int
    applied: int
    keys: int
    replay_seconds: list[float]
    """Per attempt: ``TaskState.restore`` without a state directory (the changelog into memory
    only, as an in-process run restores)."""
    fresh_seconds: list[float]
    """Per attempt: with an empty state directory, as a fresh worker process restores (it also
    writes the restored state into a new local copy)."""
    copy_seconds: list[float]
    """Per attempt: from the local copy the fresh restore just wrote (its snapshot)."""
    local_entries: int
    local_seconds: float
    """Restoring from the local SQLite copies (before they were deleted), for comparison."""
    same_keys: bool
    """Whether every restore ended with the same number of keys."""

    @property
    def replay_rate(self) -> float:
        return self.changelog_records / min(self.replay_seconds)

    @property
    def fresh_rate(self) -> float:
        return self.changelog_records / min(self.fresh_seconds)


def interval_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Records/s from the first sample above zero to the first that reached ``total``."""
    first = next(((t, n) for t, n in samples if n > 0), None)
    last = next(((t, n) for t, n in samples if n >= total), None)
    if first is None or last is None or last[0] <= first[0]:
        return math.nan
    return (total - first[1]) / (last[0] - first[0])


def event_base_ms(records: int) -> int:
    """Event time of record 0: whole minutes, so that the last record is at least two minutes
    old when the run starts (the idle watermark then closes every window)."""
    span_minutes = -(-records * EVENT_MS // WINDOW_MS)
    return (now_ms() // WINDOW_MS - span_minutes - 2) * WINDOW_MS


# -- set-up ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000, help="input records per test")
    parser.add_argument(
        "--backends", nargs="+", choices=["embedded", "kafka"], default=["embedded", "kafka"]
    )
    parser.add_argument("--quix", action="store_true", help="also run Quix Streams on Kafka")
    parser.add_argument(
        "--tests",
        nargs="+",
        choices=["count", "window", "restore", "eos"],
        default=["count", "window", "restore", "eos"],
    )
    parser.add_argument("--partitions", type=int, default=4, help="input topic partitions")
    parser.add_argument("--keys", type=int, default=10_000, help="users in the keyed count")
    parser.add_argument("--window-keys", type=int, default=1_000, help="users in the windows")
    parser.add_argument("--restore-keys", type=int, default=500_000, help="users, restore test")
    parser.add_argument("--idle-ms", type=int, default=1000, help="the window step's idle")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of runs; best shown")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run, at most")
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine"
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap server")
    parser.add_argument("--data-root", type=Path, default=None, help="where data dirs go")
    parser.add_argument(
        "--profile",
        choices=["count", "count-eos", "window", "restore"],
        default=None,
        help="instead: cProfile one in-process run on the embedded log",
    )
    args = parser.parse_args(argv)
    return Config(
        records=args.records,
        backends=args.backends,
        quix=args.quix,
        tests=args.tests,
        partitions=args.partitions,
        keys=args.keys,
        window_keys=args.window_keys,
        restore_keys=args.restore_keys,
        idle_ms=args.idle_ms,
        repeat=args.repeat,
        timeout=args.timeout,
        quiet_wait=args.quiet_wait,
        bootstrap=args.bootstrap,
        data_root=args.data_root,
        profile=args.profile,
    )


def workloads(config: Config) -> dict[str, Workload]:
    return {
        "count": Workload("count", "count", config.records, config.keys),
        "window": Workload("window", "window", config.records, config.window_keys),
        "restore": Workload("restore", "count", config.records, config.restore_keys),
    }


def run_specs(config: Config) -> list[RunSpec]:
    """Every configuration to time, in the order of one round."""
    loads = workloads(config)
    specs = []
    for backend in config.backends:
        if "count" in config.tests or "eos" in config.tests:
            specs.append(RunSpec("keyed count", loads["count"], backend, ALO))
        if "eos" in config.tests:
            specs.append(RunSpec("keyed count", loads["count"], backend, EOS))
        if "window" in config.tests:
            specs.append(RunSpec("window count", loads["window"], backend, ALO))
    if "restore" in config.tests and "embedded" in config.backends:
        specs.append(RunSpec("keyed count, restore", loads["restore"], "embedded", ALO))
    if config.quix:
        specs += [
            RunSpec("keyed count", loads["count"], "kafka", guarantee, "quix")
            for guarantee in (ALO, EOS)
        ]
    return specs


@dataclass(frozen=True, slots=True)
class Names:
    """Topics and groups of one benchmark invocation (on Kafka all start with ``prefix``)."""

    prefix: str

    def input(self, workload: Workload) -> str:
        return f"{self.prefix}-{workload.name}-in"

    def pipeline(self, spec: RunSpec, attempt: int) -> str:
        return f"{self.prefix}-{spec.label}-{attempt}"

    def output(self, spec: RunSpec, attempt: int) -> str:
        return f"{self.pipeline(spec, attempt)}-out"


def pipeline_env(config: Config, spec: RunSpec, names: Names, attempt: int) -> dict[str, str]:
    """What ``bench/stateful_pipeline.py`` reads, in this process and the workers it spawns."""
    return {
        "BENCH_KIND": spec.workload.kind,
        "BENCH_PIPELINE": names.pipeline(spec, attempt),
        "BENCH_GUARANTEE": spec.guarantee,
        "BENCH_INPUT_TOPIC": names.input(spec.workload),
        "BENCH_OUTPUT_TOPIC": names.output(spec, attempt),
        "BENCH_PARTITIONS": str(config.partitions),
        "BENCH_IDLE_MS": str(config.idle_ms),
    }


def load_topology(env: dict[str, str]) -> Topology:
    os.environ.update(env)
    return compile_pipeline(load_pipeline(str(PIPELINE)))


def kafka_settings(config: Config, group: str | None = None) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=config.bootstrap, client_id="headwater-bench", group_id=group
    )


def open_log(config: Config, backend: Backend, data_dir: Path) -> LogBackend:
    if backend == "kafka":
        return KafkaLog(kafka_settings(config))
    return EmbeddedLog(data_dir)


# -- input ----------------------------------------------------------------------------------


def keyed_batches(workload: Workload, partitions: int) -> Iterator[tuple[int, RawBatch]]:
    """The workload's events as (partition, batch): each keyed by its user, on the partition
    Kafka's partitioner gives that key, with event times ``EVENT_MS`` apart."""
    base = event_base_ms(workload.records)
    dumps = orjson.dumps
    places: dict[bytes, int] = {}
    pending: dict[int, RawBatch] = {}
    for n in range(workload.records):
        user = workload.key(n)
        key = user.encode()
        partition = places.get(key)
        if partition is None:
            partition = places[key] = partition_for(key, partitions)
        batch = pending.setdefault(partition, RawBatch([], [], []))
        stamp = base + n * EVENT_MS
        batch.keys.append(key)
        batch.values.append(dumps({**event(n, stamp), "user": user}))
        batch.timestamps.append(stamp)
        if len(batch) >= PREFILL_BATCH:
            yield partition, pending.pop(partition)
    yield from pending.items()


async def prefill(log: LogBackend, topic: str, workload: Workload, partitions: int) -> None:
    """Create ``topic`` and append the workload to it."""
    await log.create_topics([TopicSpec(topic, partitions)])
    producer = log.producer()
    try:
        for index, (partition, batch) in enumerate(keyed_batches(workload, partitions)):
            await producer.send(topic, partition, batch)
            if index % KAFKA_FLUSH_EVERY == KAFKA_FLUSH_EVERY - 1:
                await producer.flush()
    finally:
        await producer.close()


async def prefill_in(
    config: Config, backend: Backend, data_dir: Path, topic: str, workload: Workload
) -> None:
    log = open_log(config, backend, data_dir)
    try:
        await prefill(log, topic, workload, config.partitions)
    finally:
        await log.close()


async def delete_kafka_topics(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic whose name contains ``prefix`` (Quix's changelog topics embed the
    consumer group in the middle of their names)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-bench")
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if prefix in t]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


# -- sampling -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Watch:
    """What a sampler watches in one run, and when it calls the run done."""

    backend: Backend
    group: str
    inputs: list[TopicPartition]
    outputs: list[TopicPartition]
    """Sampled too when not empty (Kafka runs)."""
    records: int
    expected_output: int
    done_on_output: bool
    """Done when the output is complete (Quix) rather than the input committed."""
    deadline: float
    on_timeout: Callable[[], None]


class Sampler(threading.Thread):
    """Samples committed input offsets (and output end offsets) from outside the run, on the
    wall clock, until the run is done or its time is up."""

    def __init__(self, config: Config, watch: Watch, data_dir: Path) -> None:
        super().__init__(name="sampler", daemon=True)
        self._config = config
        self._watch = watch
        self._data_dir = data_dir
        self._halt = threading.Event()
        self.samples = Samples()

    def run(self) -> None:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        asyncio.run(self._loop())

    def stop(self) -> None:
        self._halt.set()
        self.join()

    async def _loop(self) -> None:
        watch = self._watch
        log = open_log(self._config, watch.backend, self._data_dir)
        appended = AppendedRecords(self._config.bootstrap, watch.outputs)
        pause = SAMPLE_SECONDS[watch.backend]
        next_rss = 0.0
        try:
            await appended.start()
            while not self._halt.is_set() and self.samples.done is None:
                await self._sample(log, appended)
                if time.monotonic() >= next_rss:
                    self._sample_memory()
                    next_rss = time.monotonic() + RSS_SECONDS
                if time.time() > watch.deadline and self.samples.done is None:
                    self.samples.timed_out = True
                    watch.on_timeout()
                    return
                await asyncio.sleep(pause)
        finally:
            await appended.close()
            await log.close()

    def _sample_memory(self) -> None:
        resident, anonymous = children_memory(os.getpid())
        if resident > self.samples.peak_rss:
            self.samples.peak_rss, self.samples.peak_anon = resident, anonymous

    async def _sample(self, log: LogBackend, appended: AppendedRecords) -> None:
        watch = self._watch
        committed = sum((await log.committed_offsets(watch.group, watch.inputs)).values())
        now = time.time()
        self.samples.committed.append((now, committed))
        finished = committed >= watch.records
        if watch.outputs:
            output = await appended.total()
            self.samples.output.append((time.time(), output))
            if watch.done_on_output:
                finished = output >= watch.expected_output
        if finished:
            self.samples.done = self.samples.output[-1][0] if watch.done_on_output else now


def children_memory(parent: int) -> tuple[int, int]:
    """Resident and anonymous bytes of ``parent``'s child processes, summed (``/proc``; a
    process that ends while it is read counts as nothing)."""
    resident = anonymous = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
            if int(fields[1]) != parent:  # the fields after the name: state, ppid, ...
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        sizes = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        resident += int(sizes.get("VmRSS", "0 kB").split()[0]) * 1024
        anonymous += int(sizes.get("RssAnon", "0 kB").split()[0]) * 1024
    return resident, anonymous


class AppendedRecords:
    """The high watermarks of Kafka partitions: records appended so far, in open transactions
    too (so an exactly-once run's progress shows before its commit; commit markers count, a
    handful per commit)."""

    def __init__(self, bootstrap: str, partitions: list[TopicPartition]) -> None:
        self._bootstrap = bootstrap
        self._partitions = [KafkaPartition(tp.topic, tp.partition) for tp in partitions]
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        if not self._partitions:
            return
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id="headwater-bench",
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_uncommitted",
        )
        await self._consumer.start()

    async def total(self) -> int:
        assert self._consumer is not None
        return sum((await self._consumer.end_offsets(self._partitions)).values())

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


def wait_for_quiet(limit: float) -> float:
    """Wait up to ``limit`` seconds for the machine to keep fewer than ``QUIET_CORES`` busy
    (over one second); returns the busy cores last measured."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy()
        time.sleep(1.0)
        busy = machine_busy() - before
        if busy < QUIET_CORES or time.monotonic() >= deadline or math.isnan(busy):
            return busy


# -- Headwater runs -------------------------------------------------------------------------


def interrupt_self() -> None:
    """Stop ``runner.run`` in this process as Ctrl-C does: its workers commit and leave."""
    os.kill(os.getpid(), signal.SIGINT)


def headwater_run(
    config: Config, spec: RunSpec, names: Names, attempt: int, data_dir: Path
) -> RunResult:
    """Run the pipeline with one worker process until the input is committed (and, for
    windows, every window has closed)."""
    env = pipeline_env(config, spec, names, attempt)
    topology = load_topology(env)
    group = topology.group
    output = names.output(spec, attempt)
    watch = Watch(
        backend=spec.backend,
        group=group,
        inputs=partitions_of(names.input(spec.workload), config.partitions),
        outputs=partitions_of(output, config.partitions) if spec.backend == "kafka" else [],
        records=spec.workload.records,
        expected_output=spec.workload.expected_output(),
        done_on_output=False,
        deadline=time.time() + config.timeout,
        on_timeout=interrupt_self,
    )
    options = RunOptions(
        spec=str(PIPELINE),
        workers=1,
        backend=spec.backend,
        data_dir=data_dir,
        progress=False,
        kafka=kafka_settings(config, group) if spec.backend == "kafka" else None,
    )
    sampler = Sampler(config, watch, data_dir)
    sampler.start()
    before = CpuSnapshot.now()
    started = time.time()
    try:
        run(options)
    finally:
        sampler.stop()
    cpu = CpuSnapshot.now().minus(before)
    produced, late = asyncio.run(count_output(config, spec, data_dir, output, topology))
    return RunResult(spec, started, sampler.samples, cpu, produced, late)


async def count_output(
    config: Config, spec: RunSpec, data_dir: Path, output: str, topology: Topology | None
) -> tuple[int, int]:
    """Records on the output topic, and on the window step's late-data topic."""
    log = open_log(config, spec.backend, data_dir)
    try:
        produced = await log.end_offsets(partitions_of(output, config.partitions))
        late = 0
        if topology is not None and spec.workload.kind == "window":
            topic = topology.late_topic(COUNT_STEP)
            late = sum(
                (await log.end_offsets(partitions_of(topic.name, topic.partitions))).values()
            )
        return sum(produced.values()), late
    finally:
        await log.close()


# -- restore --------------------------------------------------------------------------------


async def time_restore(
    data_dir: Path, topology: Topology, state_dir: Path | None
) -> tuple[float, int, int, int]:
    """Restore every partition's count state as a fresh worker would (a fresh log object):
    seconds, changelog records read, records applied, keys restored."""
    log = EmbeddedLog(data_dir)
    try:
        sub = topology.subtopologies[0]
        inputs = [TopicPartition(t.name, p) for t in sub.topics for p in range(sub.partitions)]
        committed = await log.committed_offsets(topology.group, inputs)
        changelog = topology.changelog_topic(COUNT_STEP)
        ends = await log.end_offsets(partitions_of(changelog.name, changelog.partitions))
        applied = keys = 0
        started = time.perf_counter()
        for partition in range(sub.partitions):
            state = TaskState(topology, sub, partition, state_dir)
            await state.restore(log, committed)
            applied += state.restored
            keys += sum(len(store) for store in state.stores.values())
            state.close()
        return time.perf_counter() - started, sum(ends.values()), applied, keys
    finally:
        await log.close()


def measure_restore(data_dir: Path, topology: Topology) -> RestoreResult:
    """Time a restore from the local copies; delete them; time restores from the changelog,
    into memory only and as a fresh worker (an empty state directory of its own), then from
    the copy that fresh restore wrote."""
    local_seconds, _, _, local_keys = asyncio.run(
        time_restore(data_dir, topology, data_dir / "state")
    )
    shutil.rmtree(data_dir / "state")
    replay, fresh, copy = [], [], []
    keys = {local_keys}
    for attempt in range(RESTORE_ATTEMPTS):
        elapsed, read, applied, restored = asyncio.run(time_restore(data_dir, topology, None))
        replay.append(elapsed)
        state_dir = data_dir / f"state-fresh-{attempt}"
        for seconds in (fresh, copy):  # the first writes the copy, the second reads it
            elapsed, _, _, restored_here = asyncio.run(time_restore(data_dir, topology, state_dir))
            seconds.append(elapsed)
            keys.add(restored_here)
        shutil.rmtree(state_dir)
        keys.add(restored)
    return RestoreResult(
        read, applied, restored, replay, fresh, copy, local_keys, local_seconds, len(keys) == 1
    )


# -- Quix Streams ---------------------------------------------------------------------------


def quix_main(
    bootstrap: str, source: str, sink: str, group: str, state_dir: str, guarantee: str
) -> None:
    """The body of a Quix Streams worker process: count per message key into RocksDB state
    and write each new count, JSON, keyed like the input; until SIGTERM."""
    from quixstreams import Application  # noqa: PLC0415 (optional: only with --quix)
    from quixstreams.state import State  # noqa: PLC0415 (optional: only with --quix)

    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        processing_guarantee="exactly-once" if guarantee == EOS else "at-least-once",
        loglevel="WARNING",
    )
    frame = app.dataframe(app.topic(source, key_deserializer="bytes", value_deserializer="json"))

    def count(value: Any, state: State) -> int:
        total: int = state.get("n", 0) + 1
        state.set("n", total)
        return total

    frame = frame.apply(count, stateful=True)
    frame.to_topic(app.topic(sink, key_serializer="bytes", value_serializer="json"))
    app.run()


def quix_run(config: Config, spec: RunSpec, names: Names, attempt: int, scratch: Path) -> RunResult:
    """Run one Quix Streams worker process until the whole output is on the topic."""
    group, output = names.pipeline(spec, attempt), names.output(spec, attempt)
    asyncio.run(create_kafka_topic(config, output))
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=quix_main,
        args=(
            config.bootstrap,
            names.input(spec.workload),
            output,
            group,
            str(scratch / group),
            spec.guarantee,
        ),
        name="quix-worker",
    )
    watch = Watch(
        backend="kafka",
        group=group,
        inputs=partitions_of(names.input(spec.workload), config.partitions),
        outputs=partitions_of(output, config.partitions),
        records=spec.workload.records,
        expected_output=spec.workload.expected_output(),
        done_on_output=True,
        deadline=time.time() + config.timeout,
        on_timeout=lambda: None,
    )
    sampler = Sampler(config, watch, scratch)
    before = CpuSnapshot.now()
    started = time.time()
    process.start()
    sampler.start()
    try:
        while sampler.is_alive() and process.is_alive():
            sampler.join(0.2)
    finally:
        sampler.stop()
        stop_process(process)
    cpu = CpuSnapshot.now().minus(before)
    produced, late = asyncio.run(count_output(config, spec, scratch, output, None))
    return RunResult(spec, started, sampler.samples, cpu, produced, late)


async def create_kafka_topic(config: Config, name: str) -> None:
    log = KafkaLog(kafka_settings(config))
    try:
        await log.create_topics([TopicSpec(name, config.partitions)])
    finally:
        await log.close()


def stop_process(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.terminate()  # SIGTERM: Quix commits and leaves
    process.join(STOP_GRACE)
    if process.is_alive():
        process.kill()
        process.join()


# -- the runs -------------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    """One invocation: where its data goes, and what it measured."""

    config: Config
    scratch: Path
    names: Names
    results: list[RunResult] = field(default_factory=list)
    restore: RestoreResult | None = None
    prefilled: set[tuple[str, Backend]] = field(default_factory=set)

    def template(self, workload: Workload) -> Path:
        return self.scratch / f"template-{workload.name}"

    def ensure_input(self, spec: RunSpec) -> None:
        """Pre-fill the workload's input on the run's backend, once."""
        if (spec.workload.name, spec.backend) in self.prefilled:
            return
        print(
            f"pre-filling {spec.workload.records:,} records over {spec.workload.keys:,} keys "
            f"({spec.workload.name}, {spec.backend}) ...",
            flush=True,
        )
        topic = self.names.input(spec.workload)
        data_dir = self.template(spec.workload)
        asyncio.run(prefill_in(self.config, spec.backend, data_dir, topic, spec.workload))
        self.prefilled.add((spec.workload.name, spec.backend))

    def run(self, spec: RunSpec, attempt: int) -> None:
        self.ensure_input(spec)
        busy = wait_for_quiet(self.config.quiet_wait)
        data_dir = self.scratch / f"{spec.label}-{attempt}"
        if spec.framework == "quix":
            result = quix_run(self.config, spec, self.names, attempt, self.scratch)
        else:
            if spec.backend == "embedded":
                shutil.copytree(self.template(spec.workload), data_dir)
                os.sync()  # so writing back the copy does not overlap the timed run
            result = headwater_run(self.config, spec, self.names, attempt, data_dir)
            if spec.workload.name == "restore" and attempt == 0:
                topology = load_topology(pipeline_env(self.config, spec, self.names, attempt))
                self.restore = measure_restore(data_dir, topology)
                report_restore(self.restore)
        shutil.rmtree(data_dir, ignore_errors=True)
        self.results.append(result)
        report_run(result, busy)


def report_run(result: RunResult, busy_before: float) -> None:
    spec = result.spec
    parts = [
        f"  {spec.framework} {spec.test} ({spec.workload.keys:,} keys), {spec.backend}, "
        f"{spec.guarantee}: {result.rate:,.0f} rec/s",
        f"start->done {result.total_rate:,.0f} rec/s",
        f"first commit after {result.first_commit:.2f} s",
    ]
    if spec.workload.kind == "count" and result.samples.output:
        parts.append(f"output-sampled {result.output_rate:,.0f} rec/s")
    parts += [
        f"worker CPU {result.cpu.workers:.2f} s ({result.cpu_per_record:.2f} µs/record)",
        f"others {result.cpu.other_cores:.2f} cores (before: {busy_before:.2f})",
        f"peak worker RSS {result.samples.peak_rss / MIB:,.0f} MiB "
        f"(anonymous {result.samples.peak_anon / MIB:,.0f})",
    ]
    print(", ".join(parts), flush=True)
    expected = spec.workload.expected_output()
    if result.samples.timed_out:
        print("    WARNING: timed out; stopped before the input was processed")
    if output_off(result):
        print(f"    WARNING: {result.output:,} output records, expected {expected:,}")
    if result.late:
        print(f"    WARNING: {result.late:,} records went to the late-data topic")


def output_off(result: RunResult) -> bool:
    """Whether the output count is wrong. End offsets on Kafka count the commit markers of
    transactions too, so an exactly-once run there may show a few more."""
    expected = result.spec.workload.expected_output()
    if result.spec.backend == "kafka" and result.spec.guarantee == EOS:
        return result.output < expected
    return result.output != expected


def report_restore(result: RestoreResult) -> None:
    def attempts(seconds: list[float]) -> str:
        return ", ".join(f"{s:.2f}" for s in seconds)

    print(
        f"  restore: {result.changelog_records:,} changelog records ({result.applied:,} applied, "
        f"{result.keys:,} keys): into memory in {attempts(result.replay_seconds)} s "
        f"({result.replay_rate:,.0f}/s); as a fresh worker in {attempts(result.fresh_seconds)} s "
        f"({result.fresh_rate:,.0f}/s); from the local copies: {result.local_entries:,} keys "
        f"in {result.local_seconds:.2f} s",
        flush=True,
    )
    print(
        f"  restore from the copy the fresh worker wrote: {attempts(result.copy_seconds)} s "
        f"({result.keys / min(result.copy_seconds):,.0f} keys/s)",
        flush=True,
    )
    if not result.same_keys:
        print("    WARNING: the restores did not all end with the same number of keys")


def run_all(config: Config, bench: Bench) -> None:
    specs = run_specs(config)
    kafka = any(s.backend == "kafka" for s in specs)
    try:
        for attempt in range(config.repeat):
            for spec in specs:
                bench.run(spec, attempt)
    finally:
        if kafka:
            asyncio.run(delete_kafka_topics(config.bootstrap, bench.names.prefix))


# -- report ---------------------------------------------------------------------------------


def best(results: list[RunResult], spec: RunSpec) -> RunResult | None:
    mine = [r for r in results if r.spec == spec and not math.isnan(r.rate)]
    return max(mine, key=lambda r: r.rate) if mine else None


COLUMNS = (
    ("framework", 9),
    ("test", 21),
    ("keys", 7),
    ("backend", 8),
    ("guarantee", 13),
    ("rec/s", 9),
    ("output-sampled", 14),
    ("start->done", 11),
    ("1st commit s", 12),
    ("CPU µs/rec", 10),
    ("others", 6),
    ("RSS MiB", 7),
)


def row(result: RunResult) -> list[str]:
    spec = result.spec

    def num(value: float, spec_: str = ",.0f") -> str:
        return "-" if math.isnan(value) else f"{value:{spec_}}"

    return [
        spec.framework,
        spec.test,
        f"{spec.workload.keys // 1000}k",
        spec.backend,
        spec.guarantee,
        num(result.rate),
        num(result.output_rate) if result.samples.output else "-",
        num(result.total_rate),
        num(result.first_commit, ".2f"),
        num(result.cpu_per_record, ".2f"),
        num(result.cpu.other_cores, ".2f"),
        f"{result.samples.peak_rss / MIB:,.0f}",
    ]


def print_table(config: Config, bench: Bench) -> None:
    print()
    if config.repeat > 1:
        print(f"best of {config.repeat} runs each")
    print("  ".join(name.rjust(width) for name, width in COLUMNS) + "  rec/s of every run")
    for spec in run_specs(config):
        result = best(bench.results, spec)
        if result is not None:
            cells = row(result)
            every = " / ".join(f"{rate:,.0f}" for rate in rates(bench.results, spec))
            print("  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)), every)
    if bench.restore is not None:
        restore = bench.restore
        print(
            f"restore from the changelog, {restore.changelog_records:,} records: into memory "
            f"{restore.replay_rate:,.0f}/s, as a fresh worker {restore.fresh_rate:,.0f}/s; "
            f"from the local copies {restore.local_entries / restore.local_seconds:,.0f} keys/s"
        )
    print()
    for line in verdicts(config, bench):
        print(line)


def rates(results: list[RunResult], spec: RunSpec) -> list[float]:
    """The rate of every run of ``spec``, round by round."""
    return [r.rate for r in results if r.spec == spec]


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def rate_of(bench: Bench, spec: RunSpec) -> float:
    result = best(bench.results, spec)
    return result.rate if result is not None else math.nan


def verdicts(config: Config, bench: Bench) -> list[str]:
    loads = workloads(config)
    lines = []
    count = rate_of(bench, RunSpec("keyed count", loads["count"], "embedded", ALO))
    if not math.isnan(count):
        lines.append(
            f"keyed count, embedded: {count:,.0f} rec/s "
            f"(target {TARGET_COUNT:,}: {verdict(count >= TARGET_COUNT)})"
        )
    window = rate_of(bench, RunSpec("window count", loads["window"], "embedded", ALO))
    if not math.isnan(window):
        lines.append(
            f"window count, embedded: {window:,.0f} rec/s "
            f"(target {TARGET_WINDOW:,}: {verdict(window >= TARGET_WINDOW)})"
        )
    if bench.restore is not None:
        replay, fresh = bench.restore.replay_rate, bench.restore.fresh_rate
        lines.append(
            f"restore, changelog records/s: {fresh:,.0f} as a fresh worker, {replay:,.0f} "
            f"into memory only (target {TARGET_RESTORE:,}: {verdict(fresh >= TARGET_RESTORE)}, "
            f"{verdict(replay >= TARGET_RESTORE)})"
        )
    lines += [eos_ratio(bench, loads["count"], backend) for backend in config.backends]
    lines += quix_ratios(config, bench)
    return [line for line in lines if line]


def eos_ratio(bench: Bench, load: Workload, backend: Backend) -> str:
    """Exactly-once over at-least-once: best over best, and round by round."""
    alo = RunSpec("keyed count", load, backend, ALO)
    eos = RunSpec("keyed count", load, backend, EOS)
    best_alo, best_eos = rate_of(bench, alo), rate_of(bench, eos)
    if math.isnan(best_alo) or math.isnan(best_eos):
        return ""
    ratio = best_eos / best_alo
    paired = zip(rates(bench.results, alo), rates(bench.results, eos), strict=False)
    rounds = ", ".join(f"{e / a:.2f}" for a, e in paired)
    return (
        f"exactly-once / at-least-once, {backend}: {ratio:.2f} best/best (per round {rounds}; "
        f"costs {1 - ratio:.0%}, target <= {TARGET_EOS_COST:.0%}: "
        f"{verdict(1 - ratio <= TARGET_EOS_COST)})"
    )


def quix_ratios(config: Config, bench: Bench) -> list[str]:
    """Headwater over Quix on Kafka, output-sampled for both."""
    lines = []
    load = workloads(config)["count"]
    for guarantee in (ALO, EOS):
        ours = best(bench.results, RunSpec("keyed count", load, "kafka", guarantee))
        theirs = best(bench.results, RunSpec("keyed count", load, "kafka", guarantee, "quix"))
        if ours is None or theirs is None:
            continue
        lines.append(
            f"Headwater / Quix Streams, Kafka keyed count, {guarantee}: "
            f"{ours.output_rate / theirs.output_rate:.2f}x output-sampled "
            f"({ours.output_rate:,.0f} vs {theirs.output_rate:,.0f} rec/s)"
        )
    return lines


# -- profile --------------------------------------------------------------------------------


PROBES: list[Probe] = [
    (0, "pipelines.log._local", "GroupConsumer._fetch", "consumer fetch"),
    (1, "pipelines.log._partition_file", "_Segment._frame_containing", "read frame (all)"),
    (2, "pipelines.log._partition_file", "_decode", "decode a frame (all)"),
    (0, "pipelines.runtime.task", "Task.process", "Task.process"),
    (1, "pipelines.runtime.task", "Task._decode", "Task._decode"),
    (2, "pipelines.serde", "Json.deserialize_many", "Json.deserialize_many (values)"),
    (2, "pipelines.serde", "Serde.deserialize_many", "Str.deserialize_many (keys)"),
    (1, "operators.stateful", "Aggregate.process", "Aggregate.process"),
    (1, "operators.windowed", "WindowedAggregate.process", "WindowedAggregate.process"),
    (2, "operators.windowed", "WindowedAggregate._close_windows", "close windows"),
    (1, "pipelines.runtime.task", "Task._write_topic", "Task._write_topic"),
    (2, "pipelines.runtime.outbox", "Outbox.add", "Outbox.add (partition by key)"),
    (0, "pipelines.runtime.task", "Task.advance", "Task.advance (watermarks)"),
    (0, "pipelines.runtime.outbox", "Outbox.send", "Outbox.send (incl. in checkpoints)"),
    (1, "pipelines.log._transactions", "EmbeddedTransaction.send", "EmbeddedTransaction.send"),
    (1, "pipelines.log._partition_file", "PartitionFile.append", "PartitionFile.append (all)"),
    (0, "pipelines.runtime.worker", "Worker._checkpoint", "Worker._checkpoint"),
    (1, "pipelines.runtime.state", "TaskState.flush", "TaskState.flush"),
    (2, "pipelines.state.store", "KeyValueStore.changes", "KeyValueStore.changes"),
    (1, "pipelines.log._transactions", "EmbeddedTransaction.commit", "EmbeddedTransaction.commit"),
    (2, "pipelines.log._transactions", "Transactions.write", "Transactions.write (commit record)"),
    (2, "pipelines.log._partition_file", "PartitionFile.mark", "PartitionFile.mark (markers)"),
    (1, "pipelines.log._local", "GroupConsumer.commit", "GroupConsumer.commit"),
    (0, "pipelines.runtime.state", "TaskState.restore", "TaskState.restore"),
    (1, "pipelines.log.embedded", "EmbeddedLog.read_now", "EmbeddedLog.read_now (all)"),
    (1, "pipelines.state.store", "KeyValueStore.apply", "KeyValueStore.apply"),
]
"""Per-batch functions timed by ``--profile`` (see ``bench/profile_stateless.py``)."""


def profile(config: Config, scratch: Path) -> None:
    """One in-process run (one worker, the embedded log) plain, with stage timers, and under
    cProfile. ``restore``: a keyed count over the restore keys builds the changelog first;
    the measured runs then restore it (no local copies in process) and process one new record
    per partition."""
    kind = config.profile
    assert kind is not None
    chosen = {"window": "window", "restore": "restore"}.get(kind, "count")
    workload = workloads(config)[chosen]
    spec = RunSpec(kind, workload, "embedded", EOS if kind == "count-eos" else ALO)
    names = Names("bench")
    topology = load_topology(pipeline_env(config, spec, names, 0))
    template = scratch / "template"
    print(f"pre-filling {workload.records:,} records over {workload.keys:,} keys ...", flush=True)
    asyncio.run(prefill_in(config, "embedded", template, names.input(workload), workload))
    units = workload.records
    if kind == "restore":
        in_process_run(template, topology, "building the state", workload.records)
        units = asyncio.run(changelog_size(template, topology))
        topic = names.input(workload)
        asyncio.run(append_one_each(template, topic, config.partitions))
    for mode in ("plain", "timers", "cprofile"):
        data_dir = scratch / mode
        shutil.copytree(template, data_dir)
        if mode == "cprofile":
            profiler = cProfile.Profile(time.process_time)
            with profiler:
                in_process_run(data_dir, topology, f"{kind}, {mode}", units)
            print_profile(profiler)
        elif mode == "timers":
            totals: dict[str, float] = {}
            with mock.patch.object(profile_stateless, "PROBES", PROBES):
                with profile_stateless.timers(totals):
                    cpu = in_process_run(data_dir, topology, f"{kind}, {mode}", units)
                profile_stateless.print_timers(totals, units, cpu)
        else:
            in_process_run(data_dir, topology, f"{kind}, {mode}", units)
        shutil.rmtree(data_dir)


def in_process_run(data_dir: Path, topology: Topology, what: str, units: int) -> float:
    """Run to the end in this process; print the rate and CPU per unit (input records, or
    changelog records for a restore); return the CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    asyncio.run(in_process(data_dir, topology))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"{what}: {units:,} in {elapsed:.2f} s = {units / elapsed:,.0f}/s wall (windows: idle "
        f"wait included), CPU {cpu:.2f} s = {cpu / units * 1e6:.2f} µs each",
        flush=True,
    )
    return cpu


async def in_process(data_dir: Path, topology: Topology) -> None:
    log = EmbeddedLog(data_dir)
    try:
        await run_in_process(topology, log, workers=1)
    finally:
        await log.close()


async def append_one_each(data_dir: Path, topic: str, partitions: int) -> None:
    """One more input record per partition, so that a run on a drained input restores the
    state and processes something before it ends (from start to the first processing)."""
    log = EmbeddedLog(data_dir)
    producer = log.producer()
    try:
        for partition in range(partitions):
            value = orjson.dumps(event(0, now_ms()))
            await producer.send(topic, partition, RawBatch([b"probe"], [value], [now_ms()]))
    finally:
        await producer.close()
        await log.close()


async def changelog_size(data_dir: Path, topology: Topology) -> int:
    log = EmbeddedLog(data_dir)
    try:
        topic = topology.changelog_topic(COUNT_STEP)
        return sum((await log.end_offsets(partitions_of(topic.name, topic.partitions))).values())
    finally:
        await log.close()


def print_profile(profiler: cProfile.Profile, top: int = 25) -> None:
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order)
        stats.print_stats(top)
        print(f"--- by {order} (CPU seconds; cProfile inflates per-call costs several times)")
        print(text.getvalue().split("\n\n", 2)[-1].rstrip())


# -- main -----------------------------------------------------------------------------------


def describe(config: Config) -> str:
    parts = [
        f"{config.records:,} records per test",
        f"{config.partitions} partitions",
        "1 worker",
        f"backends {' '.join(config.backends)}",
        f"tests {' '.join(config.tests)}",
    ]
    if config.quix:
        parts.append("Quix Streams")
    if config.repeat > 1:
        parts.append(f"{config.repeat} rounds")
    return "stateful benchmark: " + ", ".join(parts)


def main(argv: Sequence[str]) -> None:
    config = parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="headwater-bench-", dir=config.data_root) as tmp:
        if config.profile is not None:
            profile(config, Path(tmp))
        else:
            print(describe(config), flush=True)
            bench = Bench(config, Path(tmp), Names(f"stateful-bench-{uuid.uuid4().hex[:8]}"))
            run_all(config, bench)
            print_table(config, bench)
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
