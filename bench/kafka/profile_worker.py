"""Where a Headwater worker's time goes on Kafka: cProfile of one in-process run on KafkaLog.

    python bench/kafka/profile_worker.py [--records N] [--top K] [--no-profile]

Fills a fresh 4-partition input topic as ``compare.py`` does, then runs the same pipeline with
``pipelines.runtime.inprocess.run_in_process`` (one worker, ``pipelines.log.kafka.KafkaLog``,
this process) until the group has committed the whole input, and prints records/s and the
functions with the most own time (``tottime``) and the most cumulative time. The broker runs in
its own process, so this is the worker's side only. cProfile slows Python-level calls, so read
the shares, not the absolute times; ``--no-profile`` gives the unprofiled rate of the same run.
The CPU time this process took over the run is printed too: on a machine shared with other
work, it moves less than the wall-clock rate does.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from broker import create_topics, delete_topics, kafka_log, output_count, prefill
from clicks import clicks_below
from run_headwater import write_pipeline

from pipelines.loader import load_pipeline
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import Topology, compile_pipeline


async def run_once(bootstrap: str, topology: Topology) -> None:
    log = kafka_log(bootstrap)
    try:
        await run_in_process(topology, log, workers=1)
    finally:
        await log.close()


def timed(
    bootstrap: str, topology: Topology, profiler: cProfile.Profile | None
) -> tuple[float, float]:
    """Seconds of the in-process run (profiled if ``profiler`` is given), and CPU seconds of
    this process meanwhile."""
    started, cpu = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    asyncio.run(run_once(bootstrap, topology))
    if profiler is not None:
        profiler.disable()
    return time.perf_counter() - started, time.process_time() - cpu


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="cProfile one in-process worker on Kafka.")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    prefix = f"kafka-profile-{uuid.uuid4().hex[:8]}"
    source, sink = f"{prefix}-in", f"{prefix}-out"
    profiler = None if args.no_profile else cProfile.Profile()
    try:
        asyncio.run(create_topics(args.bootstrap, [source], args.partitions))
        asyncio.run(prefill(args.bootstrap, source, args.partitions, args.records))
        with tempfile.TemporaryDirectory(prefix="headwater-kafka-profile-") as tmp:
            module = write_pipeline(Path(tmp), prefix, source, sink, args.partitions)
            topology = compile_pipeline(load_pipeline(str(module)))
            seconds, cpu = timed(args.bootstrap, topology, profiler)
        output = asyncio.run(_count(args.bootstrap, sink, args.partitions))
    finally:
        asyncio.run(delete_topics(args.bootstrap, [prefix]))
    print(
        f"{args.records:,} records in {seconds:.2f} s: {args.records / seconds:,.0f} rec/s "
        f"({seconds / args.records * 1e6:.2f} µs/record), CPU {cpu:.2f} s "
        f"({cpu / args.records * 1e6:.2f} µs/record){' under cProfile' if profiler else ''}"
        f"; output {output:,} (expected {clicks_below(args.records):,})"
    )
    if profiler is not None:
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    print(f"command: python {' '.join(sys.argv)}")


async def _count(bootstrap: str, topic: str, partitions: int) -> int:
    log = kafka_log(bootstrap)
    try:
        return await output_count(log, topic, partitions)
    finally:
        await log.close()


if __name__ == "__main__":
    main(sys.argv[1:])
