"""How long a killed worker's partitions stand still: the failover gap on the embedded log.

    python bench/failover.py [--keys 500000] [--rate 20000] [--workers 2] [--repeat 3] [--standby]

A keyed count (``bench/stateful_pipeline.py``, ``BENCH_KIND=count``) runs under
``pipelines.runtime.runner.run`` with ``--workers`` worker processes, as ``headwater worker``
runs it (``sources=False``: it never stops on drain). First the input gets one record for each of
``--keys`` users, so every task holds a large state, and the benchmark waits until all of it is
committed and every worker owns partitions. Then a producer in this process appends ``--rate``
records/s over the same users (every 5 ms, each record stamped with the time it is appended), a
sampler in this process looks at the end offsets of the output partitions every ms, and after
``--warmup`` seconds (and once output has grown twice on every partition) the benchmark kills
the owner of partition 0 with SIGKILL; the producer goes on for ``--after`` seconds from the
kill, however late it came. The runner starts a new worker after its back-off; the group moves
partitions twice: to the survivors when the dead worker's claims go, and back when the new
worker joins.

Reported, per run: the **failover gap**, the longest time an output partition of the killed
worker (the partitions it held; a key's output partition is its input partition) got nothing
from the kill on, counted from the kill (detecting the death, claiming the partitions,
restoring their state from the local copies and the changelog, then processing what piled up);
the **hand-back gap**, the longest silence of any output partition afterwards (the new worker
taking its share back: the survivor's checkpoint on revocation, the new worker's restore); and
the normal silence, the longest before the kill. A silence is measured between two samples that
saw an output partition grow, so it is exact to the sampling period (1 ms) plus the producer's
tick (5 ms). ``--smoke`` runs one short round in seconds (as the test suite does).

``--standby`` declares the pipeline with ``standby_replicas=1``: each worker keeps a warm copy of
the other's tasks (:mod:`pipelines.runtime.standby`), and the survivor takes the killed
worker's tasks over from it; the runner's line for each task taken over so is printed.

This is a benchmark, not a test: it prints numbers, and checks only that the output has at
least one record per input record (at-least-once: the records processed again after the kill
are counted twice).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import math
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import orjson
from stateful import PIPELINE, Workload, load_topology, prefill, wait_for_quiet
from stateless import now_ms, partitions_of
from workload import event

from pipelines.log import EmbeddedLog
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.partitioner import partition_for
from pipelines.runtime.logs import LOGGER
from pipelines.runtime.runner import RunOptions, run

INPUT_TOPIC = "failover-in"
OUTPUT_TOPIC = "failover-out"
PIPELINE_NAME = "failover"
TICK_SECONDS = 0.005
SAMPLE_SECONDS = 0.001
KILL_SETTLE = 0.01
"""Seconds after the kill in which an output partition of the killed worker may still be seen
to grow from its own appends: the sampler looks every ms, and a write in flight lands after the
signal. Before, such a growth ended the silence across the kill within a ms, and the real gap,
after it, was counted as the hand-back ('failover gap 0 ms (partitions [])')."""
SETTLE_TIMEOUT = 300.0
"""Seconds to wait for the prefilled state to be committed, and for the output to catch up."""
STOP_GRACE = 30.0
QUIET_WAIT = 30.0
"""Seconds to wait, before each measured run, for the machine to be nearly idle."""


@dataclass(frozen=True, slots=True)
class Config:
    keys: int
    rate: int
    workers: int
    partitions: int
    warmup: float
    after: float
    repeat: int
    guarantee: str
    standby: bool


@dataclass(frozen=True, slots=True)
class Gaps:
    """One run's silences of the output partitions, in seconds."""

    normal: float
    failover: float
    hand_back: float
    killed_partitions: list[int]
    output: int
    produced: int


def parse_args(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=500_000, help="users, so keys of the state")
    parser.add_argument("--rate", type=int, default=20_000, help="records/s appended")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before the kill")
    parser.add_argument("--after", type=float, default=8.0, help="seconds after the kill")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--guarantee", choices=["at_least_once", "exactly_once"], default="at_least_once"
    )
    parser.add_argument("--standby", action="store_true", help="standby_replicas=1")
    parser.add_argument("--smoke", action="store_true", help="one short round (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.keys, args.rate, args.warmup, args.after, args.repeat = 2000, 2000, 1.5, 4.0, 1
    if args.workers < 2:
        parser.error("--workers must be at least 2: a survivor takes the partitions over")
    return Config(
        args.keys,
        args.rate,
        args.workers,
        args.partitions,
        args.warmup,
        args.after,
        args.repeat,
        args.guarantee,
        args.standby,
    )


def pipeline_env(config: Config) -> dict[str, str]:
    """What ``bench/stateful_pipeline.py`` reads, here and in the processes the runner spawns."""
    return {
        "BENCH_KIND": "count",
        "BENCH_PIPELINE": PIPELINE_NAME,
        "BENCH_GUARANTEE": config.guarantee,
        "BENCH_INPUT_TOPIC": INPUT_TOPIC,
        "BENCH_OUTPUT_TOPIC": OUTPUT_TOPIC,
        "BENCH_PARTITIONS": str(config.partitions),
        "BENCH_STANDBY_REPLICAS": "1" if config.standby else "0",
    }


class Takeovers(logging.Filter):
    """The runner's lines about tasks taken over from a standby (not those of standbys warm)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from its standby" in record.getMessage()


def runner_main(data_dir: str, workers: int) -> None:
    """The runner process: SIGTERM stops it, and it stops its workers cleanly. It prints its
    lines about tasks taken over from a standby."""
    shown = logging.StreamHandler(sys.stdout)
    shown.setFormatter(logging.Formatter("  %(message)s"))
    shown.addFilter(Takeovers())
    LOGGER.addHandler(shown)
    LOGGER.setLevel(logging.INFO)
    run(
        RunOptions(
            spec=str(PIPELINE),
            workers=workers,
            data_dir=Path(data_dir),
            progress=False,
            sources=False,
        )
    )


def start_runner(data_dir: Path, workers: int) -> BaseProcess:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=runner_main, args=(str(data_dir), workers))
    process.start()
    return process


def stop_runner(process: BaseProcess) -> None:
    process.terminate()
    process.join(STOP_GRACE)
    if process.is_alive():
        process.kill()
        process.join()


def worker_pids(runner: int) -> list[int]:
    """The runner's live worker processes (the children ``spawn`` started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == runner and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


async def committed(data_dir: Path, group: str, partitions: list[TopicPartition]) -> int:
    log = EmbeddedLog(data_dir)
    try:
        return sum((await log.committed_offsets(group, partitions)).values())
    finally:
        await log.close()


def claim_holders(data_dir: Path, group: str) -> dict[int, int]:
    """The process holding each input partition's claim on the embedded log (a claim is an
    ``flock`` of ``groups/<group>/claims/<topic>.<partition>``, which /proc/locks lists with
    its holder): partition -> pid."""
    claims = data_dir / "groups" / group / "claims"
    if not claims.is_dir():
        return {}
    inodes = {
        path.stat().st_ino: int(path.name.rsplit(".", 1)[1])
        for path in claims.iterdir()
        if path.name.startswith(f"{INPUT_TOPIC}.")
    }
    holders = {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> ..."
        if fields[1] == "FLOCK" and (inode := int(fields[5].rsplit(":", 1)[1])) in inodes:
            holders[inodes[inode]] = int(fields[4])
    return holders


def every_worker_owns(data_dir: Path, group: str, runner: int, config: Config) -> bool:
    """Whether every worker of ``runner`` holds partitions, and every partition is held."""
    holders = claim_holders(data_dir, group)
    pids = worker_pids(runner)
    return len(holders) == config.partitions and set(holders.values()) == set(pids)


def wait_until(what: str, done: Callable[[], bool]) -> None:
    """Look every 50 ms until ``done()``; give up after ``SETTLE_TIMEOUT``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting for {what}")
        time.sleep(0.05)


class Sampler(threading.Thread):
    """Looks at the output partitions' end offsets every ms: (time, ends) when one grew."""

    def __init__(self, data_dir: Path, partitions: list[TopicPartition]) -> None:
        super().__init__(name="sampler", daemon=True)
        self._data_dir = data_dir
        self._partitions = partitions
        self._halt = threading.Event()
        self.grew: list[tuple[float, list[int]]] = []

    def run(self) -> None:
        asyncio.run(self._loop())

    def stop(self) -> None:
        self._halt.set()
        self.join()

    async def _loop(self) -> None:
        log = EmbeddedLog(self._data_dir)
        last: list[int] = []
        try:
            while not self._halt.is_set():
                ends = await log.end_offsets(self._partitions)
                now = time.monotonic()
                current = [ends[tp] for tp in self._partitions]
                if current != last:
                    self.grew.append((now, current))
                    last = current
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await log.close()


def user_partitions(config: Config) -> list[int]:
    """The input partition of each user (pure-Python murmur2: ~3 s for 2M users, so computed
    before the clock of a run starts)."""
    return [partition_for(b"u%d" % n, config.partitions) for n in range(config.keys)]


def produce(data_dir: Path, config: Config, places: list[int], stop_at: Callable[[], float]) -> int:
    """Append ``config.rate`` records/s over the users (``places``: the partition of each) until
    the monotonic time ``stop_at()``; the records sent."""

    async def main() -> int:
        log = EmbeddedLog(data_dir)
        producer = log.producer()
        start = time.monotonic()
        sent = 0
        try:
            while (now := time.monotonic()) < stop_at():
                due = int((now - start) * config.rate) - sent
                stamp = now_ms()
                batches: dict[int, RawBatch] = {}
                for n in range(sent, sent + max(due, 0)):
                    user = n % config.keys
                    batch = batches.setdefault(places[user], RawBatch([], [], []))
                    batch.keys.append(b"u%d" % user)
                    batch.values.append(orjson.dumps({**event(n, stamp), "user": f"u{user}"}))
                    batch.timestamps.append(stamp)
                for partition, batch in batches.items():
                    await producer.send(INPUT_TOPIC, partition, batch)
                sent += max(due, 0)
                await asyncio.sleep(TICK_SECONDS)
        finally:
            await producer.close()
            await log.close()
        return sent

    return asyncio.run(main())


def silences(grew: list[tuple[float, list[int]]], partition: int) -> list[tuple[float, float]]:
    """(start, end) of each interval between two samples in which ``partition`` grew."""
    times = [
        t for i, (t, ends) in enumerate(grew) if i and ends[partition] != grew[i - 1][1][partition]
    ]
    return list(itertools.pairwise(times))


def gaps(
    grew: list[tuple[float, list[int]]],
    killed_at: float,
    killed: list[int],
    partitions: int,
    output: int,
    total: int,
) -> Gaps:
    """The silences before the kill; across it on the ``killed`` worker's partitions (counted
    from the kill, and from the last growth its own appends made, which the sampler may see up
    to ``KILL_SETTLE`` after it); and after those."""
    normal = failover = hand_back = 0.0
    for partition in range(partitions):
        for start, end in silences(grew, partition):
            if end <= killed_at:
                normal = max(normal, end - start)
            elif partition in killed and start <= killed_at + KILL_SETTLE:
                failover = max(failover, end - killed_at)
            elif start > killed_at:
                hand_back = max(hand_back, end - start)
    return Gaps(normal, failover, hand_back, killed, output, total)


def one_run(config: Config, scratch: Path, attempt: int) -> Gaps:
    data_dir = scratch / f"run-{attempt}"
    os.environ.update(pipeline_env(config))
    topology = load_topology(pipeline_env(config))
    inputs = partitions_of(INPUT_TOPIC, config.partitions)
    outputs = partitions_of(OUTPUT_TOPIC, config.partitions)
    workload = Workload("failover", "count", config.keys, config.keys)
    places = user_partitions(config)
    log = EmbeddedLog(data_dir)
    asyncio.run(prefill(log, INPUT_TOPIC, workload, config.partitions))
    asyncio.run(log.close())
    runner = start_runner(data_dir, config.workers)
    try:
        wait_until(
            "the prefilled state",
            lambda: asyncio.run(committed(data_dir, topology.group, inputs)) >= config.keys,
        )
        # every worker owns partitions before the kill (on a busy machine one may join late)
        wait_until(
            "every worker to own partitions",
            lambda: every_worker_owns(data_dir, topology.group, runner.pid or 0, config),
        )
        sampler = Sampler(data_dir, outputs)
        sampler.start()
        victims: list[float] = []
        killed: list[int] = []  # its partitions (output partition = input partition: same keys)

        def kill() -> None:
            # a silence is measured between two growths: output must flow everywhere first
            wait_until(
                "output on every partition",
                lambda: all(silences(sampler.grew, p) for p in range(config.partitions)),
            )
            holders = claim_holders(data_dir, topology.group)
            pid = holders[0]  # the owner of partition 0
            killed.extend(sorted(p for p, holder in holders.items() if holder == pid))
            victims.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)

        def stop_at() -> float:
            # input for `after` seconds from the kill: a kill that came after a fixed span of
            # input left no backlog to fail over, and no silence across it ('failover gap 0 ms')
            if victims:
                return victims[0] + config.after
            return math.inf if killer.is_alive() else 0.0  # (a killer that gave up: stop)

        killer = threading.Timer(config.warmup, kill)
        killer.start()
        produced = produce(data_dir, config, places, stop_at)
        killer.join()
        if not victims:
            sys.exit("the worker was never killed")
        total = config.keys + produced
        wait_until("the output", lambda: sum(asyncio.run(ends(data_dir, outputs))) >= total)
        sampler.stop()
    finally:
        stop_runner(runner)
    output = sum(asyncio.run(ends(data_dir, outputs)))
    return gaps(sampler.grew, victims[0], killed, config.partitions, output, total)


async def ends(data_dir: Path, partitions: list[TopicPartition]) -> list[int]:
    log = EmbeddedLog(data_dir)
    try:
        found = await log.end_offsets(partitions)
        return [found[tp] for tp in partitions]
    finally:
        await log.close()


def main(argv: Sequence[str]) -> None:
    config = parse_args(argv)
    results: list[Gaps] = []
    with tempfile.TemporaryDirectory(prefix="headwater-failover-") as scratch:
        for attempt in range(config.repeat):
            busy = wait_for_quiet(0 if config.repeat == 1 else QUIET_WAIT)
            result = one_run(config, Path(scratch), attempt)
            results.append(result)
            print(
                f"run {attempt + 1}: failover gap {result.failover * 1000:,.0f} ms "
                f"(partitions {result.killed_partitions}), hand-back gap "
                f"{result.hand_back * 1000:,.0f} ms, normal silence "
                f"{result.normal * 1000:,.0f} ms; "
                f"output {result.output:,} for {result.produced:,} input records; "
                f"the machine {busy:.2f} cores busy before",
                flush=True,
            )
            if result.output < result.produced:
                print(f"WARNING: output {result.output:,} < input {result.produced:,}")
    print(
        f"\nfailover gap over {len(results)} runs: median "
        f"{statistics.median(r.failover for r in results) * 1000:,.0f} ms, worst "
        f"{max(r.failover for r in results) * 1000:,.0f} ms ({config.keys:,} keys, "
        f"{config.rate:,} records/s, {config.workers} workers, {config.guarantee}"
        f"{', standby_replicas=1' if config.standby else ''})"
    )
    print("command: python bench/failover.py " + " ".join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
