"""Where a single worker's time goes in the stateless benchmark.

    python bench/profile_stateless.py [--records N] [--partitions P] [--mode MODE] [--top K]
    python bench/profile_stateless.py --processes 2 [--records N]

Pre-fills the input topic as ``bench/stateless.py`` does, then runs the same pipeline with
``pipelines.runtime.inprocess.run_in_process`` (one worker, the embedded log, this process) to
the end of its input, and prints records/s, CPU µs per record (user and system) and minor page
faults per record. Then, by ``--mode``:

``timers`` (default)
    wraps the runtime's per-batch functions (fetch, decode, operators, serialise, append, ...)
    in CPU-time timers (``time.process_time``, so other load on the machine does not inflate
    them) and prints each one's inclusive CPU time per input record, as a tree, with its share
    of the run's CPU time. The functions run once per batch (2000 records), so the timers cost
    about nothing, unlike a profiler's per-call hooks.
``cprofile``
    the functions with the most own time and the most cumulative time. cProfile makes every
    Python-level call (the user functions, ``Json.serialize``: one per record) several times
    dearer, so read it for what is called, not for the shares.
``none``
    just the run.

``--processes N`` puts the timers inside N worker processes instead (``Worker`` on the
embedded log, as the runner's processes run it, started together and stopped with SIGTERM once
this process sees the input drained), and prints their CPU after start-up, summed: how the
per-record cost of each stage changes when several workers share the machine and the output
partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import importlib
import inspect
import multiprocessing
import pstats
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from stateless import PIPELINE, load_topology, output_count, prefill
from workload import clicks_below

from pipelines.loader import load_pipeline
from pipelines.log import EmbeddedLog
from pipelines.runtime.engine import is_drained
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.runtime.worker import Worker

Probe = tuple[int, str, str, str]
"""(depth in the printed tree, module, attribute path in the module, label)."""

PROBES: list[Probe] = [
    (0, "pipelines.log._local", "GroupConsumer._fetch", "consumer fetch"),
    (1, "pipelines.log._partition_file", "_Segment._index_new_frames", "index new frames"),
    (1, "pipelines.log._partition_file", "_Segment._frame_containing", "read frame"),
    (2, "pipelines.log._partition_file", "_decode", "decode a frame"),
    (0, "pipelines.runtime.task", "Task.process", "Task.process"),
    (1, "pipelines.runtime.task", "Task._decode", "Task._decode"),
    (2, "pipelines.serde", "Json.deserialize_many", "Json.deserialize_many (orjson.loads)"),
    (1, "operators.stateless", "Filter.process", "Filter.process"),
    (2, "pipelines.batch", "Batch.compress", "Batch.compress"),
    (1, "operators.stateless", "Map.process", "Map.process"),
    (1, "pipelines.runtime.task", "Task._write_topic", "Task._write_topic"),
    (2, "pipelines.runtime.task", "call_each", "call_each(Json.serialize)"),
    (2, "pipelines.runtime.outbox", "Outbox.add", "Outbox.add"),
    (0, "pipelines.runtime.outbox", "Outbox.send", "Outbox.send"),
    (1, "pipelines.log._partition_file", "PartitionFile.append", "PartitionFile.append"),
    (2, "pipelines.log._partition_file", "_Segment._recover_tail", "recover tail (index)"),
    (2, "pipelines.log._partition_file", "encode_frame", "encode_frame"),
    (0, "pipelines.runtime.worker", "Worker._checkpoint", "Worker._checkpoint"),
]


async def run_once(data_dir: Path, topology: Topology) -> None:
    log = EmbeddedLog(data_dir)
    try:
        await run_in_process(topology, log, workers=1)
    finally:
        await log.close()


def _timed(original: Callable[..., Any], totals: dict[str, float], label: str) -> Any:
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return await original(*args, **kwargs)
            finally:
                totals[label] += time.process_time() - started

        return timed_async

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.process_time() - started

    return timed


@contextmanager
def timers(totals: dict[str, float]) -> Iterator[None]:
    """Wrap every probe in a timer adding to ``totals``; unwrap on exit."""
    undo = []
    for _, module_name, path, label in PROBES:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        totals[label] = 0.0
        setattr(owner, name, _timed(original, totals, label))
        undo.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def print_timers(totals: dict[str, float], records: int, cpu: float) -> None:
    print(f"\n{'inclusive CPU time per input record':<52} {'ns':>7} {'share':>6}")
    for depth, _, _, label in PROBES:
        spent = totals[label]
        name = "  " * depth + label
        print(f"{name:<52} {spent / records * 1e9:>7.0f} {spent / cpu:>6.1%}")
    print(f"{'the whole run (CPU)':<52} {cpu / records * 1e9:>7.0f} {1:>6.1%}")


def measured_run(data_dir: Path, topology: Topology, records: int) -> float:
    """Run once; print rate, CPU and page faults per record; return the CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    asyncio.run(run_once(data_dir, topology))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) / records * 1e6
    system = (after.ru_stime - before.ru_stime) / records * 1e6
    faults = (after.ru_minflt - before.ru_minflt) / records
    print(
        f"{records:,} records in {seconds:.2f} s: {records / seconds:,.0f} rec/s, "
        f"{seconds / records * 1e6:.2f} µs/record wall, CPU {user:.2f} µs user + "
        f"{system:.2f} µs system per record, {faults:.3f} minor faults/record"
    )
    return (user + system) * records / 1e6


WorkerTimes = tuple[float, dict[str, float]]
"""What a timed worker process reports: its CPU seconds after start-up, and its timers."""


def timed_worker(data_dir: str, index: int, barrier: Barrier, results: Queue[WorkerTimes]) -> None:
    """One of ``--processes`` worker processes: a :class:`Worker` with timers, until SIGTERM."""
    topology = compile_pipeline(load_pipeline(str(PIPELINE)))
    asyncio.run(serve_timed(topology, Path(data_dir), index, barrier, results))


async def serve_timed(
    topology: Topology, data_dir: Path, index: int, barrier: Barrier, results: Queue[WorkerTimes]
) -> None:
    log = EmbeddedLog(data_dir)
    worker = Worker(topology, log, index=index)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop.set)
    totals: dict[str, float] = {}
    barrier.wait()  # every worker has started and imported everything: go together
    started = time.process_time()
    try:
        with timers(totals):
            await worker.run()
    finally:
        await log.close()
    results.put((time.process_time() - started, totals))


async def wait_drained(data_dir: Path, topology: Topology) -> None:
    log = EmbeddedLog(data_dir)
    try:
        while not await is_drained(log, topology):
            await asyncio.sleep(0.02)
    finally:
        await log.close()


def process_run(data_dir: Path, topology: Topology, processes: int) -> list[WorkerTimes]:
    """Run ``processes`` timed worker processes until the input is drained."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    results: Queue[WorkerTimes] = context.Queue()
    children = [
        context.Process(target=timed_worker, args=(str(data_dir), i, barrier, results))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    barrier.wait()
    asyncio.run(wait_drained(data_dir, topology))
    for child in children:
        child.terminate()  # SIGTERM: the worker checkpoints, leaves and reports
    reports = [results.get() for _ in children]
    for child in children:
        child.join()
    return reports


def print_process_timers(reports: list[WorkerTimes], records: int) -> None:
    cpu = sum(seconds for seconds, _ in reports)
    print(
        f"{len(reports)} worker process(es), {records:,} records: CPU after start-up "
        f"{cpu / records * 1e6:.3f} µs/record (all workers together)"
    )
    totals = {label: sum(t[label] for _, t in reports) for _, _, _, label in PROBES}
    print_timers(totals, records, cpu)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="Where one in-process worker's time goes.")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--mode", choices=["timers", "cprofile", "none"], default="timers")
    parser.add_argument("--top", type=int, default=25, help="cprofile: functions to list")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="timers inside this many worker processes instead of one in-process worker",
    )
    args = parser.parse_args(argv)
    topology = load_topology(args.partitions)
    totals: dict[str, float] = {}
    profiler = cProfile.Profile() if args.mode == "cprofile" else None
    with tempfile.TemporaryDirectory(prefix="headwater-profile-") as tmp:
        data_dir = Path(tmp)
        asyncio.run(prefill(data_dir, topology, args.records, args.partitions))
        if args.processes:
            print_process_timers(process_run(data_dir, topology, args.processes), args.records)
            print(f"command: python {' '.join(sys.argv)}")
            return
        if args.mode == "timers":
            with timers(totals):
                cpu = measured_run(data_dir, topology, args.records)
        elif profiler is not None:
            with profiler:
                cpu = measured_run(data_dir, topology, args.records)
        else:
            cpu = measured_run(data_dir, topology, args.records)
        output = asyncio.run(output_count(data_dir, args.partitions))
    print(f"output {output:,} records (expected {clicks_below(args.records):,})")
    if totals:
        print_timers(totals, args.records, cpu)
    if profiler is not None:
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
