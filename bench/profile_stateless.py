"""Where a single worker's time goes in the stateless benchmark: cProfile of an in-process run.

    python bench/profile_stateless.py [--records N] [--partitions P] [--top K] [--no-profile]

Pre-fills the input topic as ``bench/stateless.py`` does, then runs the same pipeline with
``pipelines.runtime.inprocess.run_in_process`` (one worker, the embedded log, this process) to
the end of its input. Prints records/s and minor page faults per record for the run, then the
functions with the most own time (``tottime``) and the most cumulative time. cProfile slows
Python-level calls down, so read the shares, not the absolute times; ``--no-profile`` gives the
unprofiled rate of the same in-process run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from stateless import load_topology, output_count, prefill
from workload import clicks_below

from pipelines.log import EmbeddedLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import Topology


async def run_once(data_dir: Path, topology: Topology) -> None:
    log = EmbeddedLog(data_dir)
    try:
        await run_in_process(topology, log, workers=1)
    finally:
        await log.close()


def timed(
    data_dir: Path, topology: Topology, profiler: cProfile.Profile | None
) -> tuple[float, int]:
    """Seconds and minor page faults of the in-process run (profiled if ``profiler`` is given)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    asyncio.run(run_once(data_dir, topology))
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="cProfile one in-process worker.")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    topology = load_topology(args.partitions)
    profiler = None if args.no_profile else cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="headwater-profile-") as tmp:
        data_dir = Path(tmp)
        asyncio.run(prefill(data_dir, topology, args.records, args.partitions))
        seconds, faults = timed(data_dir, topology, profiler)
        output = asyncio.run(output_count(data_dir, args.partitions))
    print(
        f"{args.records:,} records in {seconds:.2f} s: {args.records / seconds:,.0f} rec/s "
        f"({seconds / args.records * 1e6:.2f} µs/record, {faults / args.records:.3f} minor "
        f"faults/record){' under cProfile' if profiler else ''}; output {output:,} "
        f"(expected {clicks_below(args.records):,})"
    )
    if profiler is not None:
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
