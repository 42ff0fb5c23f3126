"""What PostgresSink costs a worker: rows/s of its writer, upserting and appending.

    python bench/postgres.py [--url URL] [--records N] [--keys K] [--checkpoint ROWS]
                             [--repeat R] [--modes upsert append plain]

One writer, as one worker holds it, gets batches of 2,000 records (``{"user", "n",
"amount"}`` dicts, as read from partition 0 of a topic, offsets counting up) and is flushed
every ``--checkpoint`` rows, as the worker's checkpoint does (50,000 rows: about one commit
interval of a worker running at 100k records/s). Modes:

- ``upsert``: ``key=["user"]`` over ``--keys`` distinct users (``ON CONFLICT DO UPDATE``),
  exactly-once (the offsets are read and stored in each flush's transaction);
- ``append``: no key, exactly-once;
- ``plain``: no key, ``exactly_once=False``: what the offsets cost.

Each mode runs ``--repeat`` times on a fresh table; the script prints each run and the median
rows/s of each mode (from the first write to the last flush: converting and checking values in
``write``, and the transactions), and the flush latency p50 / p99 over every run. The server is
``--url`` or ``HEADWATER_TEST_POSTGRES`` (``bash scripts/postgres.sh start`` prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from connectors.base import SinkContext
from connectors.postgres import OFFSETS_TABLE, PostgresSink
from pipelines.batch import Batch
from pipelines.log.base import FetchedBatch, RawBatch

BATCH = 2000
STAMP = 1_767_225_600_000


@dataclass(frozen=True, slots=True)
class Run:
    mode: str
    rows: int
    seconds: float
    flushes: list[float]

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def batches(records: int, keys: int) -> list[Batch]:
    """The input, made before the clock starts."""
    made = []
    for first in range(0, records, BATCH):
        count = min(BATCH, records - first)
        values = [
            {"user": f"u{(first + i) % keys}", "n": first + i, "amount": (first + i) * 0.5}
            for i in range(count)
        ]
        raw = RawBatch([None] * count, [None] * count, [STAMP] * count)
        offsets = list(range(first, first + count))
        fetched = FetchedBatch("clicks", 0, raw, offsets, first + count)
        made.append(Batch([None] * count, values, [STAMP] * count, list(range(count)), fetched))
    return made


async def one_run(url: str, mode: str, work: list[Batch], checkpoint: int) -> Run:
    table = f"bench_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(url)
    key = "PRIMARY KEY" if mode == "upsert" else ""
    await connection.execute(
        f'CREATE TABLE {table} ("user" text {key}, n bigint NOT NULL, amount float8)'
    )
    sink = PostgresSink(
        table,
        url=url,
        key=["user"] if mode == "upsert" else (),
        exactly_once=mode != "plain",
    )
    writer = sink.open(SinkContext("bench", table, 0))
    await writer.start()
    flushes: list[float] = []
    rows = since_flush = 0
    try:
        start = time.perf_counter()
        for batch in work:
            writer.write(batch)
            rows += len(batch)
            since_flush += len(batch)
            if since_flush >= checkpoint:
                began = time.perf_counter()
                await writer.flush()
                flushes.append(time.perf_counter() - began)
                since_flush = 0
        began = time.perf_counter()
        await writer.flush()
        flushes.append(time.perf_counter() - began)
        seconds = time.perf_counter() - start
        await writer.close()
        written = await connection.fetchval(f"SELECT count(*) FROM {table}")
        expected = min(rows, len({v["user"] for b in work for v in b.values})) if key else rows
        if written != expected:
            sys.exit(f"{mode}: {written:,} rows in the table, not {expected:,}")
    finally:
        await connection.execute(f"DROP TABLE {table}")
        await connection.execute(f"DELETE FROM {OFFSETS_TABLE} WHERE step = $1", table)
        await connection.close()
    return Run(mode, rows, seconds, flushes)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    url: Any = args.url or os.environ.get("HEADWATER_TEST_POSTGRES")
    if not url:
        sys.exit("no server: pass --url or set HEADWATER_TEST_POSTGRES")
    work = batches(args.records, args.keys)
    print(
        f"PostgresSink, one writer: {args.records:,} records in batches of {BATCH:,}, a flush "
        f"every {args.checkpoint:,} rows, {args.keys:,} keys for upserts"
    )
    runs: dict[str, list[Run]] = {mode: [] for mode in args.modes}
    for round_ in range(args.repeat):
        for mode in args.modes:
            run = await one_run(url, mode, work, args.checkpoint)
            runs[mode].append(run)
            print(f"  run {round_ + 1} {mode:7} {run.rate:>12,.0f} rows/s  {run.seconds:.2f} s")
    print(f"{'mode':8} {'rows/s':>12} {'flush p50':>10} {'flush p99':>10}")
    for mode, done in runs.items():
        rate = statistics.median(r.rate for r in done)
        flushes = [f for r in done for f in r.flushes]
        p50, p99 = percentile(flushes, 0.5) * 1000, percentile(flushes, 0.99) * 1000
        print(f"{mode:8} {rate:>12,.0f} {p50:>8.1f}ms {p99:>8.1f}ms")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="postgresql://... (default: $HEADWATER_TEST_POSTGRES)")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--checkpoint", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["upsert", "append", "plain"],
        default=["upsert", "append", "plain"],
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
