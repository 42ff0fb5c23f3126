"""Benchmark a stateless JSON filter + map pipeline on the embedded log, with worker processes.

    python bench/stateless.py [--records N] [--workers 1 2] [--rate R] [--partitions P]

The pipeline is ``bench/stateless_pipeline.py``: read a P-partition topic of JSON events, keep
the clicks (half), map each to a smaller dict, write to a P-partition topic. Per worker count:

throughput
    N events are appended to the input topic first (``EmbeddedLog.producer()``, batches of 1000),
    then the pipeline runs as ``headwater run`` runs it (``pipelines.runtime.runner.run``, real
    spawned worker processes) on a fresh copy of that log, until the input is drained. A thread
    watches the output files and the group's committed offsets, so besides start -> drained it
    reports rates without the fixed costs: *processing* (first output record -> last) leaves out
    starting the worker processes and noticing the end; *steady* (the middle half of the output)
    also leaves out the group join and the tail. It also reports the CPU the workers and the
    runner used, and how many cores the rest of the machine kept busy meanwhile (a run that had
    to share the CPU is not comparable). Worker counts are interleaved over ``--repeat`` rounds.
latency
    the runner runs the pipeline without sources (``RunOptions(sources=False)``, as ``headwater
    worker`` does, so it does not stop when the input is drained; stopped with SIGTERM at the
    end, which stops its worker processes cleanly) while a producer process of its own
    appends at a steady ``--rate`` in small batches every ``--tick-ms``, each record's timestamp
    the wall-clock ms at which its batch is due (the batches are appended on the tick: see
    :func:`produce`), and a reader tails the output topic, woken by the log's appends as the
    workers are. (Until 2026-12-07 the producer shared the reader's process and event loop,
    each append holding the reader up, and the reader slept 1 ms whenever it found nothing:
    both waits counted as latency.) The events are encoded before the run (a pool of
    ``EVENT_POOL``, cycled): encoding them as they are sent would cost the producer ~2 µs each,
    a core the workers need at hundreds of thousands of records/s. Timestamps travel with
    records, so latency = time read - record timestamp. Records sent during the ``--warmup``
    seconds (workers starting, joining the group) are not measured.
    ``--poll-ms`` (an experiment) overrides the embedded log's idle poll interval in the
    workers (through ``bench/stateless_pipeline.py``, which they import): the interval of the
    polling fallback, which workers use only where they cannot be woken (no inotify).

This is a benchmark, not a test: it prints numbers, and checks only that every record came out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import resource
import shlex
import shutil
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from workload import clicks_below, encoded_events

from pipelines.loader import load_pipeline
from pipelines.log import EmbeddedLog
from pipelines.log._local import AppendWaiter
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.runner import RunOptions, run
from pipelines.runtime.topology import Topology, compile_pipeline

PIPELINE = Path(__file__).resolve().with_name("stateless_pipeline.py")
INPUT_TOPIC = "bench-in"
OUTPUT_TOPIC = "bench-out"
GROUP = "bench"
PREFILL_BATCH = 1000
SAMPLE_SECONDS = 0.005
EVENT_POOL = 100_000
"""Events the latency phase's producer encodes beforehand and cycles through (an even number:
event ``i`` of the pool is a click as event ``i`` of the stream is)."""
READ_BATCH = 10_000
DRAIN_GRACE = 10.0
"""Seconds the latency reader waits for the last records after the producer stops."""
STOP_GRACE = 15.0


@dataclass(frozen=True, slots=True)
class Config:
    """The command line."""

    records: int
    workers: list[int]
    rate: int
    partitions: int
    seconds: float
    warmup: float
    tick_ms: float
    repeat: int
    phase: str
    data_root: Path | None
    poll_ms: float | None
    timeline: bool


@dataclass(frozen=True, slots=True)
class ThroughputRun:
    """One timed ``runner.run`` over the pre-filled input."""

    workers: int
    records: int
    output: int
    total: float
    """Seconds from calling ``run`` to the input found drained (every offset committed)."""
    startup: float
    """Seconds from calling ``run`` to the first output record."""
    processing: float
    """Seconds from the first output record to the last (appended)."""
    steady: float
    """Seconds the middle half of the output took (see :meth:`OffsetSampler.steady`)."""
    timeline: list[tuple[float, float]]
    """Input records/s every 100 ms (see :meth:`OffsetSampler.timeline`)."""
    committed_rate: float
    """Records/s from the first commit seen to the input drained (sampling committed offsets)."""
    worker_cpu: float
    """CPU seconds (user + system) the worker processes used, start-up included."""
    runner_cpu: float
    """CPU seconds the runner's process used (this process: the benchmark's sampler too)."""
    worker_faults: int
    """Minor page faults in the worker processes, start-up included."""
    other_cores: float
    """Cores the rest of the machine kept busy meanwhile, on average (not the workers, not this
    process): how much the run had to share the CPU. NaN where ``/proc/stat`` is missing."""

    @property
    def rate(self) -> float:
        return self.records / self.total

    @property
    def processing_rate(self) -> float:
        return self.records / self.processing

    @property
    def steady_rate(self) -> float:
        return self.records / 2 / self.steady


@dataclass(frozen=True, slots=True)
class LatencyRun:
    """One steady-rate run: how late the output records were read."""

    workers: int
    sent: int
    received: int
    expected: int
    rate: float
    latencies_ms: list[float]
    other_cores: float = float("nan")
    """Cores the rest of the machine kept busy meanwhile, on average."""

    def percentile(self, q: float) -> float:
        ordered = self.latencies_ms
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- set-up ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000, help="input records")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    parser.add_argument("--rate", type=int, default=50_000, help="latency phase, records/s")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency phase, measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="latency phase, not measured")
    parser.add_argument("--tick-ms", type=float, default=5.0, help="latency phase, send period")
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs per worker count")
    parser.add_argument("--phase", choices=["all", "throughput", "latency"], default="all")
    parser.add_argument("--data-root", type=Path, default=None, help="where data dirs go")
    parser.add_argument(
        "--timeline", action="store_true", help="throughput: print records/s every 100 ms"
    )
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=None,
        help="experiment: override the embedded log's idle poll interval in the workers "
        "(its polling fallback, used only where inotify is unavailable)",
    )
    args = parser.parse_args(argv)
    return Config(
        records=args.records,
        workers=args.workers,
        rate=args.rate,
        partitions=args.partitions,
        seconds=args.seconds,
        warmup=args.warmup,
        tick_ms=args.tick_ms,
        repeat=args.repeat,
        phase=args.phase,
        data_root=args.data_root,
        poll_ms=args.poll_ms,
        timeline=args.timeline,
    )


def load_topology(partitions: int, poll_ms: float | None = None) -> Topology:
    """The pipeline, with its topic names and partitions (and the ``--poll-ms`` experiment)
    exported for the runner and worker processes."""
    os.environ["BENCH_INPUT_TOPIC"] = INPUT_TOPIC
    os.environ["BENCH_OUTPUT_TOPIC"] = OUTPUT_TOPIC
    os.environ["BENCH_PARTITIONS"] = str(partitions)
    if poll_ms is not None:
        os.environ["BENCH_POLL_MS"] = str(poll_ms)
    return compile_pipeline(load_pipeline(str(PIPELINE)))


def partitions_of(topic: str, partitions: int) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(partitions)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def prefill(data_dir: Path, topology: Topology, records: int, partitions: int) -> None:
    """Create the pipeline's topics and append ``records`` events to the input topic."""
    log = EmbeddedLog(data_dir)
    try:
        await prepare_topics(log, topology)
        producer = log.producer()
        stamp = now_ms()
        for index, start in enumerate(range(0, records, PREFILL_BATCH)):
            count = min(PREFILL_BATCH, records - start)
            batch = RawBatch([None] * count, encoded_events(start, count, stamp), [stamp] * count)
            await producer.send(INPUT_TOPIC, index % partitions, batch)
        await producer.close()
    finally:
        await log.close()


async def output_count(data_dir: Path, partitions: int) -> int:
    log = EmbeddedLog(data_dir)
    try:
        return sum((await log.end_offsets(partitions_of(OUTPUT_TOPIC, partitions))).values())
    finally:
        await log.close()


# -- throughput -----------------------------------------------------------------------------


class OffsetSampler(threading.Thread):
    """Watches a throughput run from outside, on the wall clock: when the first output record
    lands, when the first commit lands, and when every input offset is committed.

    The output topic is watched through its partition files' sizes and modification times (the
    layout ``pipelines/log/embedded.py`` documents), not by reading it: indexing the output as a
    reader would costs CPU the workers need. Committed offsets come from the log's API.
    """

    def __init__(self, data_dir: Path, partitions: int, records: int) -> None:
        super().__init__(name="offset-sampler", daemon=True)
        self._data_dir = data_dir
        self._inputs = partitions_of(INPUT_TOPIC, partitions)
        self.output_files = [
            data_dir / "topics" / OUTPUT_TOPIC / f"{p}.log" for p in range(partitions)
        ]
        self._records = records
        self._halt = threading.Event()
        self.first_output: float | None = None
        self.output_sizes: list[tuple[float, int]] = []
        """(time, bytes in the output files) at every sample."""
        self.first_commit: tuple[float, int] | None = None
        self.drained: float | None = None

    def run(self) -> None:
        asyncio.run(self._watch())

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def last_output(self) -> float:
        """When the last output record was appended (the newest output file's mtime)."""
        return max(path.stat().st_mtime_ns for path in self.output_files) / 1e9

    async def _watch(self) -> None:
        log = EmbeddedLog(self._data_dir)
        try:
            while not self._halt.is_set() and self.drained is None:
                await self._sample(log, time.time())
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await log.close()

    async def _sample(self, log: EmbeddedLog, now: float) -> None:
        size = sum(map(_size, self.output_files))
        self.output_sizes.append((now, size))
        if size and self.first_output is None:
            self.first_output = now
        committed = sum((await log.committed_offsets(GROUP, self._inputs)).values())
        if committed and self.first_commit is None:
            self.first_commit = (now, committed)
        if committed >= self._records:
            self.drained = now

    def steady(self) -> float:
        """Seconds between the output files reaching a quarter and three quarters of their
        final size: the middle half of the run, without start-up, group join and tail."""
        final = sum(map(_size, self.output_files))
        quarter = next(t for t, size in self.output_sizes if size >= final / 4)
        three_quarters = next(t for t, size in self.output_sizes if size >= final * 3 / 4)
        return three_quarters - quarter

    def timeline(self, started: float, records: int) -> list[tuple[float, float]]:
        """(seconds since ``started``, input records/s) per 100 ms: the output's growth, read
        as input records (output bytes are proportional to the records processed)."""
        final = sum(map(_size, self.output_files)) or 1
        first_in_bucket: dict[int, tuple[float, int]] = {}
        for t, size in self.output_sizes:
            first_in_bucket.setdefault(int((t - started) * 10), (t, size))
        marks = [first_in_bucket[b] for b in sorted(first_in_bucket)]
        return [
            (t0 - started, (s1 - s0) / final * records / (t1 - t0))
            for (t0, s0), (t1, s1) in pairwise(marks)
        ]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def throughput_run(
    config: Config,
    template: Path,
    scratch: Path,
    workers: int,
    attempt: int,
    metrics_port: int | None = None,
) -> ThroughputRun:
    """Copy the pre-filled log and run the pipeline over it until drained (serving the run's
    metrics on ``metrics_port`` if given, as ``headwater run --metrics-port`` does)."""
    data_dir = scratch / f"throughput-{workers}w-{attempt}"
    shutil.copytree(template, data_dir)
    os.sync()  # so writing back the copy does not overlap the timed run
    sampler = OffsetSampler(data_dir, config.partitions, config.records)
    sampler.start()
    before = CpuSnapshot.now()
    started = time.time()
    options = RunOptions(
        spec=str(PIPELINE),
        workers=workers,
        data_dir=data_dir,
        progress=False,
        metrics_port=metrics_port,
    )
    try:
        run(options)
    finally:
        sampler.stop()
    cpu = CpuSnapshot.now().minus(before)  # the runner has joined its workers: counted
    output = asyncio.run(output_count(data_dir, config.partitions))
    result = summarize_throughput(config, workers, output, started, cpu, sampler)
    shutil.rmtree(data_dir)
    return result


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds used so far: by this process's reaped children (the workers), by this
    process (the runner, and the sampler thread), and by the whole machine."""

    workers: float
    runner: float
    machine: float
    at: float
    worker_faults: int
    """Minor page faults of the reaped children."""

    @classmethod
    def now(cls) -> CpuSnapshot:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            workers=children.ru_utime + children.ru_stime,
            runner=own.ru_utime + own.ru_stime,
            machine=machine_busy(),
            at=time.time(),
            worker_faults=children.ru_minflt,
        )

    def minus(self, before: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(
            workers=self.workers - before.workers,
            runner=self.runner - before.runner,
            machine=self.machine - before.machine,
            at=self.at - before.at,
            worker_faults=self.worker_faults - before.worker_faults,
        )

    @property
    def other_cores(self) -> float:
        """Cores the rest of the machine kept busy on average."""
        return (self.machine - self.workers - self.runner) / self.at


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (NaN without ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def summarize_throughput(
    config: Config,
    workers: int,
    output: int,
    started: float,
    cpu: CpuSnapshot,
    sampler: OffsetSampler,
) -> ThroughputRun:
    first, drained = sampler.first_output, sampler.drained
    if first is None or drained is None or sampler.first_commit is None:
        raise RuntimeError("the run returned before the sampler saw the input drained")
    last = sampler.last_output()
    commit_time, commit_count = sampler.first_commit
    return ThroughputRun(
        workers=workers,
        records=config.records,
        output=output,
        total=drained - started,
        startup=first - started,
        processing=last - first,
        steady=sampler.steady(),
        timeline=sampler.timeline(started, config.records),
        committed_rate=(config.records - commit_count) / max(drained - commit_time, 1e-9),
        worker_cpu=cpu.workers,
        runner_cpu=cpu.runner,
        worker_faults=cpu.worker_faults,
        other_cores=cpu.other_cores,
    )


def throughput_phase(config: Config, topology: Topology, scratch: Path) -> list[ThroughputRun]:
    """Runs for each worker count, interleaved (1, 2, 1, 2, ...) so that a slow spell of the
    machine does not land on one worker count only."""
    template = scratch / "template"
    print(f"pre-filling {config.records:,} records ...", flush=True)
    asyncio.run(prefill(template, topology, config.records, config.partitions))
    runs = []
    for attempt in range(config.repeat):
        for workers in config.workers:
            result = throughput_run(config, template, scratch, workers, attempt)
            report_throughput(config, result)
            runs.append(result)
    shutil.rmtree(template)
    return runs


def report_throughput(config: Config, result: ThroughputRun) -> None:
    print(
        f"  throughput {result.workers} worker(s): {result.rate:,.0f} rec/s start->drained "
        f"({result.total:.2f} s), {result.processing_rate:,.0f} rec/s processing "
        f"({result.processing:.2f} s), {result.steady_rate:,.0f} rec/s steady, "
        f"start-up {result.startup:.2f} s, commit-sampled {result.committed_rate:,.0f} rec/s, "
        f"worker CPU {result.worker_cpu:.2f} s ({result.worker_cpu / result.records * 1e6:.2f} "
        f"µs/record, {result.worker_faults / result.records:.3f} faults/record), "
        f"runner CPU {result.runner_cpu:.2f} s, "
        f"other processes {result.other_cores:.2f} cores",
        flush=True,
    )
    if config.timeline:
        rates = [f"{t:.1f}s {rate / 1000:,.0f}k" for t, rate in result.timeline if t >= 0]
        print("    records/s per 100 ms: " + ", ".join(rates), flush=True)
    check_output("throughput", result.output, clicks_below(config.records))


def check_output(phase: str, received: int, expected: int) -> None:
    if received != expected:
        print(f"  WARNING {phase}: {received:,} output records, expected {expected:,}")


# -- latency --------------------------------------------------------------------------------


def runner_main(data_dir: str, workers: int) -> None:
    """The latency phase's runner process: ``runner.run`` with ``sources=False`` (as
    ``headwater worker`` runs), so it never stops on drain. SIGTERM stops it, and it stops its
    worker processes cleanly."""
    options = RunOptions(
        spec=str(PIPELINE),
        workers=workers,
        data_dir=Path(data_dir),
        progress=False,
        sources=False,
    )
    run(options)


def start_runner(data_dir: Path, workers: int) -> BaseProcess:
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=runner_main, args=(str(data_dir), workers), name="bench-runner"
    )
    process.start()
    return process


def stop_runner(process: BaseProcess) -> None:
    process.terminate()  # SIGTERM: the workers finish their batch, commit and leave
    process.join(STOP_GRACE)
    if process.is_alive():
        process.kill()
        process.join()


async def produce(log: EmbeddedLog, config: Config) -> int:
    """Append at ``config.rate`` for warm-up + measured seconds; returns the records sent.

    A batch is appended at a multiple of ``--tick-ms`` on the wall clock and stamped with that
    moment. Record timestamps are whole milliseconds: a stamp taken at any moment within a
    millisecond is up to 1 ms (0.5 on average) older than the append, and every latency
    measured would carry that. The wait is ``time.sleep``, which wakes within a fraction of a
    millisecond; the event loop's timers round up to the next one (this process runs nothing
    else on its loop)."""
    producer = log.producer()
    pool = encoded_events(0, EVENT_POOL, now_ms())
    start = time.monotonic()
    end = start + config.warmup + config.seconds
    sent = rotation = 0
    while True:
        tick = next_tick(config.tick_ms)
        time.sleep(max(0.0, tick / 1000 - time.time()))
        if (now := time.monotonic()) >= end:
            break
        due = int((now - start) * config.rate) - sent
        if due > 0:
            values = cycled(pool, sent, due)
            stamp = int(tick)  # at or before the append: a late wake-up counts as latency
            batch = RawBatch([None] * due, values, [stamp] * due)
            await producer.send(INPUT_TOPIC, rotation % config.partitions, batch)
            rotation += 1
            sent += due
    await producer.close()
    return sent


def next_tick(period_ms: float) -> float:
    """The next multiple of ``period_ms`` on the wall clock, in ms since the epoch."""
    return (math.floor(time.time() * 1000 / period_ms) + 1) * period_ms


def cycled(pool: list[bytes], start: int, count: int) -> list[bytes]:
    """``count`` items of ``pool`` from index ``start`` on, going round it as often as needed."""
    items: list[bytes] = []
    while count:
        at = start % len(pool)
        piece = pool[at : at + count]
        items += piece
        start += len(piece)
        count -= len(piece)
    return items


async def tail(
    log: EmbeddedLog, config: Config, producer: Producing, measure_from: int
) -> tuple[int, array[float]]:
    """Read the output topic until every record the producer sent is out (or a grace period
    after it stopped); the latency of each record stamped at or after ``measure_from``."""
    partitions = partitions_of(OUTPUT_TOPIC, config.partitions)
    waiter = log.append_waiter()  # woken as the workers are (inotify), not by a 1 ms poll
    waiter.follow(partitions)
    try:
        return await _read_all(log, waiter, partitions, producer, measure_from)
    finally:
        waiter.close()


async def _read_all(
    log: EmbeddedLog,
    waiter: AppendWaiter,
    partitions: list[TopicPartition],
    producer: Producing,
    measure_from: int,
) -> tuple[int, array[float]]:
    """:func:`tail`'s loop: read what is there, else wait for an append.

    The latencies go to an array of doubles, not a list of floats: millions of float objects
    are memory the reader allocates and faults in as it reads, time it spends away from the
    output it times."""
    offsets = dict.fromkeys(partitions, 0)
    latencies = array("d")
    received = 0
    deadline: float | None = None
    while True:
        got = 0
        for tp, offset in offsets.items():
            fetched = await log.read(tp, offset, READ_BATCH)
            if len(fetched.records):
                read_at = time.time() * 1000
                stamps = fetched.records.timestamps
                latencies.extend(read_at - ts for ts in stamps if ts >= measure_from)
                offsets[tp] = fetched.next_offset
                got += len(stamps)
        received += got
        if producer.sent() is not None:
            if received >= clicks_below(producer.total):
                return received, latencies
            deadline = deadline or time.monotonic() + DRAIN_GRACE
            if time.monotonic() > deadline:
                return received, latencies
        if got:
            await asyncio.sleep(0)
        else:
            await waiter.wait(0.01)


class Producing:
    """The producer, in a process of its own: in the reader's process it held the reader up
    while it appended (the two took turns on one event loop and one GIL), and that wait
    counted as latency."""

    def __init__(self, config: Config, data_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=produce_main, args=(config, data_dir, sender), daemon=True
        )
        self._process.start()
        sender.close()
        self.total = 0

    def sent(self) -> int | None:
        """The records it sent, once it is done."""
        if self._process.is_alive() and not self._receiver.poll():
            return None
        if not self.total:
            self.total = self._receiver.recv()
            self._process.join()
        return self.total


def produce_main(config: Config, data_dir: Path, sent: Connection) -> None:
    """The producer process: :func:`produce`, then how many it sent."""

    async def go() -> int:
        log = EmbeddedLog(data_dir)
        try:
            return await produce(log, config)
        finally:
            await log.close()

    sent.send(asyncio.run(go()))


async def drive(config: Config, data_dir: Path, workers: int) -> LatencyRun:
    log = EmbeddedLog(data_dir)
    try:
        measure_from = now_ms() + int(config.warmup * 1000)
        producer = Producing(config, data_dir)
        received, latencies = await tail(log, config, producer, measure_from)
        return LatencyRun(
            workers=workers,
            sent=producer.total,
            received=received,
            expected=clicks_below(producer.total),
            rate=producer.total / (config.warmup + config.seconds),
            latencies_ms=sorted(latencies),
        )
    finally:
        await log.close()


def latency_run(config: Config, topology: Topology, scratch: Path, workers: int) -> LatencyRun:
    data_dir = scratch / f"latency-{workers}w"
    asyncio.run(prefill(data_dir, topology, 0, config.partitions))
    before = CpuSnapshot.now()
    runner = start_runner(data_dir, workers)
    try:
        result = asyncio.run(drive(config, data_dir, workers))
    finally:
        stop_runner(runner)
    result = replace(result, other_cores=CpuSnapshot.now().minus(before).other_cores)
    shutil.rmtree(data_dir)
    print(
        f"  latency {workers} worker(s): sent {result.sent:,} at {result.rate:,.0f} rec/s, "
        f"{len(result.latencies_ms):,} measured: p50 {result.percentile(0.5):.1f} ms, "
        f"p99 {result.percentile(0.99):.1f} ms, max {result.percentile(1.0):.1f} ms, "
        f"other processes {result.other_cores:.2f} cores",
        flush=True,
    )
    check_output("latency", result.received, result.expected)
    return result


def latency_phase(config: Config, topology: Topology, scratch: Path) -> list[LatencyRun]:
    return [latency_run(config, topology, scratch, workers) for workers in config.workers]


# -- report ---------------------------------------------------------------------------------


def best(runs: list[ThroughputRun], workers: int) -> ThroughputRun | None:
    mine = [r for r in runs if r.workers == workers]
    return max(mine, key=lambda r: r.steady_rate) if mine else None


COLUMNS = (
    "workers",
    "rec/s steady",
    "rec/s processing",
    "rec/s start->drained",
    "start-up s",
    "worker CPU µs/rec",
    "others' cores",
    "p50 ms",
    "p99 ms",
    "max ms",
)


def throughput_cells(result: ThroughputRun | None) -> list[str]:
    if result is None:
        return ["-"] * 6
    return [
        f"{result.steady_rate:,.0f}",
        f"{result.processing_rate:,.0f}",
        f"{result.rate:,.0f}",
        f"{result.startup:.2f}",
        f"{result.worker_cpu / result.records * 1e6:.2f}",
        f"{result.other_cores:.2f}",
    ]


def latency_cells(result: LatencyRun | None) -> list[str]:
    if result is None:
        return ["-"] * 3
    return [f"{result.percentile(q):.1f}" for q in (0.5, 0.99, 1.0)]


def print_table(config: Config, throughput: list[ThroughputRun], latency: list[LatencyRun]) -> None:
    """One row per worker count: the best throughput run (by steady rate) and latency."""
    print()
    if config.repeat > 1:
        print(f"throughput: best of {config.repeat} runs")
    print("  ".join(COLUMNS))
    for workers in config.workers:
        cells = [
            str(workers),
            *throughput_cells(best(throughput, workers)),
            *latency_cells(next((r for r in latency if r.workers == workers), None)),
        ]
        print("  ".join(cell.rjust(len(name)) for cell, name in zip(cells, COLUMNS, strict=True)))
    print_ratio(throughput)


def print_ratio(throughput: list[ThroughputRun]) -> None:
    """2 workers against 1, each measure taken from its best run."""
    one = [r for r in throughput if r.workers == 1]
    two = [r for r in throughput if r.workers == 2]
    if not one or not two:
        return
    measures: dict[str, Callable[[ThroughputRun], float]] = {
        "steady": lambda r: r.steady_rate,
        "processing": lambda r: r.processing_rate,
        "start->drained": lambda r: r.rate,
    }
    ratios = [
        f"{max(map(rate, two)) / max(map(rate, one)):.2f}x {name}"
        for name, rate in measures.items()
    ]
    print("2 workers / 1 worker: " + ", ".join(ratios))


def describe(config: Config) -> str:
    parts = [f"{config.partitions} partitions", f"workers {config.workers}"]
    if config.phase != "latency":
        parts.append(f"throughput over {config.records:,} records x {config.repeat}")
    if config.phase != "throughput":
        parts.append(
            f"latency at {config.rate:,} rec/s for {config.seconds:g} s "
            f"(+{config.warmup:g} s warm-up)"
        )
    if config.poll_ms is not None:
        parts.append(f"embedded log poll {config.poll_ms:g} ms")
    return "stateless filter+map on the embedded log: " + ", ".join(parts)


def main(argv: Sequence[str]) -> None:
    config = parse_args(argv)
    topology = load_topology(config.partitions, config.poll_ms)
    print(describe(config), flush=True)
    with tempfile.TemporaryDirectory(prefix="headwater-bench-", dir=config.data_root) as tmp:
        scratch = Path(tmp)
        throughput = (
            throughput_phase(config, topology, scratch) if config.phase != "latency" else []
        )
        latency = latency_phase(config, topology, scratch) if config.phase != "throughput" else []
    print_table(config, throughput, latency)
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
