"""Headwater against Quix Streams and faust-streaming: one stateless pipeline, Kafka to Kafka.

    python bench/kafka/compare.py [--records N] [--workers 1 2] [--repeat R] [--rate R]

Every framework does the same work (``bench/kafka/clicks.py``: JSON in from a 4-partition
topic, keep ``kind == "click"``, map to a small dict, JSON out to a 4-partition topic) on the
same broker, in worker processes of its own (``run_headwater.py``, ``run_quix.py``,
``run_faust.py``), each run in a fresh consumer group with fresh topics.

throughput
    Per framework, worker count and attempt, the same N events are written to the run's input
    topic in one Kafka transaction that stays open (``broker.Gate``); the workers start, and
    once the group is stable with all of them in it the transaction is committed, so the whole
    input becomes readable at once. The watch polls the output topic's end offsets until every
    click is out. Output topics use ``LogAppendTime``, so the broker stamps when each output
    record landed: records/s = N / (append time of the last output record - gate opened).
    faust reads uncommitted data, so it starts as soon as it is assigned partitions; what it
    wrote before the gate opened is left out of its count (``early %``).
latency
    Per framework and worker count, a fresh input topic; a producer sends ``--rate`` events/s
    in batches every ``--tick-ms``, each event stamped with the wall-clock ms it was sent, and
    a reader takes ``now - stamp`` for every output record. Measured: the records stamped from
    ``--warmup`` seconds after the first output record and a stable group, for ``--seconds``.
    ``--latency-repeat`` runs of each, interleaved; the table's percentiles are over all of
    their measured records.

Each throughput attempt also reports who used the CPU from the gate opening to the output
complete: the framework's processes (µs per input record), the broker, and the rest of the
machine (``others``: cores other work kept busy, which the run had to share).

Throughput runs are interleaved (framework by framework, attempt by attempt); the best and the
median attempt are shown, and drift over time hits every framework alike.
This is a benchmark, not a test: it prints numbers and warns when output counts are off.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import math
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker import (
    Clock,
    Gate,
    Watch,
    WatchTarget,
    create_topics,
    delete_topics,
    latency_reader,
    steady_producer,
    wait_for_broker,
    watch_group,
    watch_throughput,
)
from clicks import clicks_below

HERE = Path(__file__).resolve().parent
STOP_GRACE = 30.0
BROKER_WAIT = 60.0
TARGET_PER_WORKER = 450_000
TARGET_VS = {"quix": 4.0, "faust": 10.0}


@dataclass(frozen=True, slots=True)
class Framework:
    """How to start one framework's workers."""

    name: str
    script: str
    requires: str
    """The module it imports, to tell whether it is installed."""
    process_per_worker: bool
    """True: one process per worker; False: one process that starts ``--workers`` itself."""

    def installed(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None

    def commands(self, args: list[str], workers: int) -> list[list[str]]:
        script = [sys.executable, str(HERE / self.script), *args]
        if self.process_per_worker:
            return [script] * workers
        return [[*script, "--workers", str(workers)]]


FRAMEWORKS = {
    "headwater": Framework("headwater", "run_headwater.py", "pipelines", False),
    "quix": Framework("quix", "run_quix.py", "quixstreams", True),
    "faust": Framework("faust", "run_faust.py", "faust", True),
}


@dataclass(frozen=True, slots=True)
class Config:
    """The command line."""

    bootstrap: str
    records: int
    workers: list[int]
    partitions: int
    frameworks: list[str]
    rate: int
    seconds: float
    warmup: float
    tick_ms: float
    repeat: int
    latency_repeat: int
    phase: str
    timeout: float
    keep_topics: bool


@dataclass(frozen=True, slots=True)
class ThroughputRun:
    framework: str
    workers: int
    records: int
    watch: Watch

    @property
    def expected(self) -> int:
        return clicks_below(self.records)

    @property
    def window(self) -> float:
        """Seconds from the gate opening to the broker appending the last output record."""
        watch = self.watch
        if watch.opened is None or watch.last_append is None or watch.error:
            return float("nan")
        return max(watch.last_append - watch.opened, 1e-3)

    @property
    def early(self) -> float:
        """The share of the output written before the gate opened (read uncommitted)."""
        return min(1.0, self.watch.output_at_open / self.expected)

    @property
    def rate(self) -> float:
        """Input records/s over :attr:`window`, leaving out those processed before it."""
        return self.records * (1 - self.early) / self.window

    @property
    def startup(self) -> float:
        ready = self.watch.ready
        return float("nan") if ready is None else ready - self.watch.launched

    @property
    def cpu_per_record(self) -> float:
        """µs of the framework's CPU per input record processed after the gate opened."""
        cpu = self.watch.cpu
        counted = self.records * (1 - self.early)
        return float("nan") if cpu is None or not counted else cpu.framework / counted * 1e6

    @property
    def framework_cores(self) -> float:
        cpu = self.watch.cpu
        return float("nan") if cpu is None or cpu.at <= 0 else cpu.framework / cpu.at

    @property
    def broker_cores(self) -> float:
        cpu = self.watch.cpu
        return float("nan") if cpu is None or cpu.at <= 0 else cpu.broker / cpu.at

    @property
    def other_cores(self) -> float:
        cpu = self.watch.cpu
        return float("nan") if cpu is None else cpu.other_cores


@dataclass(frozen=True, slots=True)
class LatencyRun:
    framework: str
    workers: int
    sent: int
    received: int
    rate: float
    latencies_ms: list[float]

    def percentile(self, q: float) -> float:
        ordered = self.latencies_ms
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- set-up ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--records", type=int, default=500_000, help="input records")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument(
        "--frameworks", nargs="+", choices=list(FRAMEWORKS), default=list(FRAMEWORKS)
    )
    parser.add_argument("--rate", type=int, default=2_000, help="latency phase, records/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency phase, measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="latency phase, not measured")
    parser.add_argument("--tick-ms", type=float, default=5.0, help="latency phase, send period")
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs of each; best shown")
    parser.add_argument(
        "--latency-repeat",
        type=int,
        default=1,
        help="latency runs of each, interleaved; percentiles over all their records",
    )
    parser.add_argument("--phase", choices=["all", "throughput", "latency"], default="all")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run, at most")
    parser.add_argument("--keep-topics", action="store_true", help="do not delete the topics")
    args = parser.parse_args(argv)
    return Config(
        bootstrap=args.bootstrap,
        records=args.records,
        workers=args.workers,
        partitions=args.partitions,
        frameworks=args.frameworks,
        rate=args.rate,
        seconds=args.seconds,
        warmup=args.warmup,
        tick_ms=args.tick_ms,
        repeat=args.repeat,
        latency_repeat=args.latency_repeat,
        phase=args.phase,
        timeout=args.timeout,
        keep_topics=args.keep_topics,
    )


def available(config: Config) -> list[Framework]:
    chosen = []
    for name in config.frameworks:
        framework = FRAMEWORKS[name]
        if framework.installed():
            chosen.append(framework)
        else:
            print(f"skipping {name}: `{framework.requires}` is not installed (pip install ...)")
    return chosen


# -- processes ------------------------------------------------------------------------------


@dataclass(slots=True)
class Launched:
    """A framework's running worker processes and where their output goes."""

    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # every framework commits and leaves
        deadline = time.monotonic() + STOP_GRACE
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def tail(self, lines: int = 15) -> str:
        text = []
        for log in self.logs:
            content = log.read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {log.name}\n" + "\n".join(content))
        return "\n".join(text)


def launch(
    framework: Framework, args: list[str], workers: int, scratch: Path, label: str
) -> Launched:
    """Start the workers, each in ``scratch`` (faust and Quix write state directories to the
    working directory) with its output in a log file there."""
    processes, logs = [], []
    for index, command in enumerate(framework.commands(args, workers)):
        log = scratch / f"{label}-{index}.log"
        with log.open("wb") as out:
            processes.append(
                subprocess.Popen(command, cwd=scratch, stdout=out, stderr=subprocess.STDOUT)
            )
        logs.append(log)
    return Launched(processes, logs)


@dataclass(frozen=True, slots=True)
class Names:
    """Topic and group names, all under the benchmark's prefix."""

    prefix: str

    def run(self, phase: str, framework: str, workers: int, attempt: int = 0) -> str:
        """The consumer group of one run; its topics are ``<group>-in`` and ``<group>-out``
        (Headwater adds ``<group>.source-positions`` and ``<group>.dead-letters``)."""
        return f"{self.prefix}-{phase}{attempt}-{framework}-{workers}w"


def app_args(config: Config, group: str) -> list[str]:
    return [
        "--bootstrap",
        config.bootstrap,
        "--input",
        f"{group}-in",
        "--output",
        f"{group}-out",
        "--group",
        group,
        "--partitions",
        str(config.partitions),
    ]


# -- throughput -----------------------------------------------------------------------------


def throughput_run(
    config: Config, names: Names, framework: Framework, workers: int, scratch: Path, attempt: int
) -> ThroughputRun:
    group = names.run("tp", framework.name, workers, attempt)
    asyncio.run(create_topics(config.bootstrap, [f"{group}-in"], config.partitions))
    asyncio.run(
        create_topics(config.bootstrap, [f"{group}-out"], config.partitions, append_time=True)
    )
    target = WatchTarget(
        group,
        workers,
        f"{group}-out",
        config.partitions,
        clicks_below(config.records),
        config.timeout,
    )
    started: list[Launched] = []

    def start() -> Launched:
        started.append(launch(framework, app_args(config, group), workers, scratch, group))
        return started[0]

    try:
        watch = asyncio.run(gated_run(config, target, start))
    finally:
        for launched in started:
            launched.stop()
        if not config.keep_topics:
            asyncio.run(delete_topics(config.bootstrap, [f"{group}-", f"{group}."]))
    result = ThroughputRun(framework.name, workers, config.records, watch)
    report_throughput(result, started)
    return result


async def gated_run(config: Config, target: WatchTarget, start: Callable[[], Launched]) -> Watch:
    """Fill the run's input behind the gate, start the workers, open the gate, watch."""
    gate = Gate(config.bootstrap, f"{target.group}-in", config.partitions)
    try:
        await gate.fill(config.records)
        return await watch_throughput(config.bootstrap, target, gate, start)
    finally:
        await gate.close()


def report_throughput(result: ThroughputRun, started: list[Launched]) -> None:
    watch = result.watch
    print(
        f"  {result.framework:<9} {result.workers} worker(s): {result.rate:>10,.0f} rec/s "
        f"over {result.window:.2f} s, group stable after {result.startup:.2f} s, "
        f"{result.early:.0%} of the output written before the gate opened, "
        f"{watch.output:,} output records",
        flush=True,
    )
    if watch.error:
        print(f"    FAILED: {watch.error}")
        for launched in started:
            print(launched.tail())
    elif watch.output != result.expected:
        print(f"    WARNING: {watch.output:,} output records, expected {result.expected:,}")
    if watch.cpu is not None:
        print(
            f"    CPU from the gate opening to the output complete: {result.framework} "
            f"{result.cpu_per_record:.2f} µs/record ({result.framework_cores:.2f} cores), broker "
            f"{result.broker_cores:.2f} cores, "
            f"others {result.other_cores:.2f} cores (the rest of the machine)"
        )


def throughput_phase(
    config: Config, names: Names, frameworks: list[Framework], scratch: Path
) -> list[ThroughputRun]:
    print("throughput:", flush=True)
    return [
        throughput_run(config, names, framework, workers, scratch, attempt)
        for workers in config.workers
        for attempt in range(config.repeat)
        for framework in frameworks
    ]


# -- latency --------------------------------------------------------------------------------


async def drive_latency(
    config: Config, source: str, sink: str, group: str, workers: int
) -> tuple[int, int, list[float], float]:
    """Produce at the steady rate and read the output: sent, received, latencies, seconds."""
    clock = Clock(config.warmup, config.seconds, startup_timeout=config.timeout)
    producing = asyncio.create_task(
        steady_producer(
            config.bootstrap,
            source,
            config.partitions,
            config.rate,
            config.tick_ms / 1000,
            clock,
        )
    )
    grouping = asyncio.create_task(watch_group(config.bootstrap, group, workers, clock))
    received, latencies = await latency_reader(
        config.bootstrap, sink, config.partitions, clock, producing
    )
    await grouping
    return producing.result(), received, latencies, time.time() - clock.started


def latency_run(
    config: Config, names: Names, framework: Framework, workers: int, scratch: Path, attempt: int
) -> LatencyRun:
    group = names.run("lat", framework.name, workers, attempt)
    source, sink = f"{group}-in", f"{group}-out"
    asyncio.run(create_topics(config.bootstrap, [source, sink], config.partitions))
    launched = launch(framework, app_args(config, group), workers, scratch, group)
    try:
        sent, received, latencies, seconds = asyncio.run(
            drive_latency(config, source, sink, group, workers)
        )
    finally:
        launched.stop()
        if not config.keep_topics:
            asyncio.run(delete_topics(config.bootstrap, [f"{group}-", f"{group}."]))
    latencies.sort()
    result = LatencyRun(framework.name, workers, sent, received, sent / seconds, latencies)
    print(
        f"  {framework.name:<9} {workers} worker(s): {len(latencies):,} measured at "
        f"{config.rate:,} rec/s: p50 {result.percentile(0.5):.1f} ms, "
        f"p99 {result.percentile(0.99):.1f} ms, max {result.percentile(1.0):.1f} ms",
        flush=True,
    )
    if received != clicks_below(sent):
        print(f"    WARNING: read {received:,} output records, expected {clicks_below(sent):,}")
        if not latencies:
            print(launched.tail())
    return result


def latency_phase(
    config: Config, names: Names, frameworks: list[Framework], scratch: Path
) -> list[LatencyRun]:
    print("latency:", flush=True)
    return [
        latency_run(config, names, framework, workers, scratch, attempt)
        for workers in config.workers
        for attempt in range(config.latency_repeat)
        for framework in frameworks
    ]


# -- report ---------------------------------------------------------------------------------


def best(runs: list[ThroughputRun], framework: str, workers: int) -> ThroughputRun | None:
    mine = [r for r in runs if r.framework == framework and r.workers == workers]
    rated = [r for r in mine if not math.isnan(r.rate)]  # NaN marks a failed run
    return max(rated, key=lambda r: r.rate) if rated else (mine[0] if mine else None)


def median_rate(runs: list[ThroughputRun], framework: str, workers: int) -> float | None:
    rates = [r.rate for r in runs if r.framework == framework and r.workers == workers]
    return statistics.median(rates) if rates else None


def latency_of(runs: list[LatencyRun], framework: str, workers: int) -> LatencyRun | None:
    """The latency runs of ``framework`` with ``workers`` as one: every measured record."""
    mine = [r for r in runs if r.framework == framework and r.workers == workers]
    if not mine:
        return None
    return LatencyRun(
        framework,
        workers,
        sum(r.sent for r in mine),
        sum(r.received for r in mine),
        statistics.mean(r.rate for r in mine),
        sorted(latency for r in mine for latency in r.latencies_ms),
    )


def median_of(runs: list[ThroughputRun], framework: str, workers: int, what: str) -> float:
    """The median of a :class:`ThroughputRun` property over the attempts (NaN if none)."""
    values = [getattr(r, what) for r in runs if r.framework == framework and r.workers == workers]
    return statistics.median(values) if values else float("nan")


def cells(run: ThroughputRun | None, median: float | None, lat: LatencyRun | None) -> str:
    def num(value: float | None, width: int, spec: str) -> str:
        if value is None or math.isnan(value):
            return f"{'-':>{width}}"
        return f"{value:>{width}{spec}}"

    return "  ".join(
        [
            num(run.rate if run else None, 10, ",.0f"),
            num(median, 12, ",.0f"),
            num(run.window if run else None, 8, ".2f"),
            num(run.early * 100 if run else None, 7, ".0f"),
            num(run.startup if run else None, 9, ".2f"),
            num(lat.percentile(0.5) if lat else None, 7, ".1f"),
            num(lat.percentile(0.99) if lat else None, 7, ".1f"),
        ]
    )


def print_table(
    config: Config,
    frameworks: list[Framework],
    throughput: list[ThroughputRun],
    latency: list[LatencyRun],
) -> None:
    print()
    print(
        f"{'framework':<10} {'workers':>7}  {'rec/s best':>10}  {'rec/s median':>12}  "
        f"{'window s':>8}  {'early %':>7}  "
        f"{'stable s':>9}  {'p50 ms':>7}  {'p99 ms':>7}"
    )
    for workers in config.workers:
        for framework in frameworks:
            run = best(throughput, framework.name, workers)
            lat = latency_of(latency, framework.name, workers)
            median = median_rate(throughput, framework.name, workers)
            print(f"{framework.name:<10} {workers:>7}  {cells(run, median, lat)}")
    print()
    if throughput:
        print_cpu(config, frameworks, throughput)
    for workers in config.workers:
        print_ratios(workers, frameworks, throughput, latency)


def print_cpu(config: Config, frameworks: list[Framework], throughput: list[ThroughputRun]) -> None:
    """Who used the CPU while the throughput attempts ran (medians over the attempts)."""
    print(
        f"{'framework':<10} {'workers':>7}  {'µs CPU/record':>13}  {'broker cores':>12}  "
        f"{'others cores':>12}"
    )
    for workers in config.workers:
        for framework in frameworks:
            row = [
                median_of(throughput, framework.name, workers, what)
                for what in ("cpu_per_record", "broker_cores", "other_cores")
            ]
            print(
                f"{framework.name:<10} {workers:>7}  {row[0]:>13.2f}  {row[1]:>12.2f}  "
                f"{row[2]:>12.2f}"
            )
    print()


def print_ratios(
    workers: int,
    frameworks: list[Framework],
    throughput: list[ThroughputRun],
    latency: list[LatencyRun],
) -> None:
    ours = best(throughput, "headwater", workers)
    our_latency = latency_of(latency, "headwater", workers)
    print(f"{workers} worker(s):")
    if ours is not None:
        verdict = "met" if ours.rate / workers >= TARGET_PER_WORKER else "MISSED"
        print(
            f"  Headwater {ours.rate / workers:,.0f} rec/s per worker "
            f"(target {TARGET_PER_WORKER:,}: {verdict})"
        )
    for framework in frameworks:
        if framework.name == "headwater":
            continue
        parts = []
        theirs = best(throughput, framework.name, workers)
        if ours is not None and theirs is not None:
            ratio = ours.rate / theirs.rate
            target = TARGET_VS[framework.name]
            verdict = "n/a" if math.isnan(ratio) else "met" if ratio >= target else "MISSED"
            parts.append(f"throughput {ratio:.1f}x (target {target:g}x: {verdict})")
        their_latency = latency_of(latency, framework.name, workers)
        if our_latency is not None and their_latency is not None:
            parts += [
                f"p{label} {our_latency.percentile(q) / their_latency.percentile(q):.2f}x"
                for label, q in (("50", 0.5), ("99", 0.99))
            ]
        if parts:
            print(f"  Headwater/{framework.name}: " + ", ".join(parts))


def main(argv: Sequence[str]) -> None:
    config = parse_args(argv)
    # aiokafka logs an ERROR while a new topic's metadata reaches the producer; it retries
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    frameworks = available(config)
    names = Names(f"kafka-bench-{uuid.uuid4().hex[:8]}")
    print(
        f"stateless filter+map, Kafka -> Kafka at {config.bootstrap}: {config.records:,} "
        f"records, {config.partitions} partitions, workers {config.workers}, "
        f"{', '.join(f.name for f in frameworks)}; latency at {config.rate:,} rec/s for "
        f"{config.seconds:g} s (+{config.warmup:g} s warm-up); topics {names.prefix}-*",
        flush=True,
    )
    asyncio.run(wait_for_broker(config.bootstrap, BROKER_WAIT))
    throughput: list[ThroughputRun] = []
    latency: list[LatencyRun] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # clean up first
    with tempfile.TemporaryDirectory(prefix="headwater-kafka-bench-") as tmp:
        if config.phase != "latency":
            throughput = throughput_phase(config, names, frameworks, Path(tmp))
        if config.phase != "throughput":
            latency = latency_phase(config, names, frameworks, Path(tmp))
    print_table(config, frameworks, throughput, latency)
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
