"""What committing offsets costs on the embedded log: the part of a checkpoint that grows with
the partitions a worker owns.

    python bench/commit_cost.py [--partitions 4] [--commits 2000] [--data-root DIR]

One group commits ``--commits`` times on ``--partitions`` partitions of one topic
(``EmbeddedLog.store_offsets``, as an at-least-once checkpoint does after the producer flushed),
each commit a new offset on every partition, in a fresh data directory under ``--data-root``
(the system's temporary directory by default: put it on the disk the log lives on). It prints
the wall time of one commit, median, p99 and max, and per partition; a worker makes one at every
checkpoint (every 0.5 s, and whenever it goes idle with progress), inside its loop, so records
that arrive meanwhile wait that long.

This is a benchmark, not a test: it prints numbers and checks only that the last offsets read
back.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition, TopicSpec


async def measure(data_dir: Path, partitions: int, commits: int) -> list[float]:
    """The wall time of each commit, in µs."""
    log = EmbeddedLog(data_dir)
    try:
        await log.create_topics([TopicSpec("commits", partitions)])
        tps = [TopicPartition("commits", p) for p in range(partitions)]
        times = []
        for offset in range(1, commits + 1):
            started = time.perf_counter()
            log.store_offsets("bench", dict.fromkeys(tps, offset))
            times.append((time.perf_counter() - started) * 1e6)
        read = await log.committed_offsets("bench", tps)
        assert read == dict.fromkeys(tps, commits), read
        return times
    finally:
        await log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=4, help="partitions per commit")
    parser.add_argument("--commits", type=int, default=2000, help="commits measured")
    parser.add_argument("--data-root", type=Path, default=None, help="where the log goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="headwater-commits-", dir=args.data_root) as scratch:
        times = sorted(asyncio.run(measure(Path(scratch), args.partitions, args.commits)))
    median = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(
        f"commit of {args.partitions} partitions ({args.commits:,} commits): median "
        f"{median:,.0f} µs, p99 {p99:,.0f} µs, max {times[-1]:,.0f} µs; "
        f"per partition, median {median / args.partitions:,.1f} µs"
    )
    print(f"command: python bench/commit_cost.py --partitions {args.partitions}")


if __name__ == "__main__":
    main()
