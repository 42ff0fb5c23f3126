"""What ParquetSink costs a worker, and how fast ParquetSource reads the files back.

    python bench/parquet.py [--records N] [--checkpoint ROWS] [--roll-rows R] [--repeat R]
                            [--compression CODEC] [--data-root DIR] [--smoke]

One writer, as one worker holds it, gets batches of 2,000 records (``{"user", "n", "amount",
"kind"}`` dicts, as read from partition 0 of a topic) and is flushed every ``--checkpoint``
rows, as the worker's checkpoint does (50,000 rows: about one commit interval of a worker
running at 100k records/s), into a fresh local directory, its staging file rolled into a
Parquet file every ``--roll-rows`` rows; then closed. Its rate counts from the first write to
the end of ``close`` (converting and checking values in ``write``, the staging appends and
fsyncs, the rolls). A ``ParquetSource`` then reads the directory back in batches of 10,000
(``to_pylist`` of each record batch), and its rate counts until the last batch.

Each part runs ``--repeat`` times; the script prints each run (wall and process CPU, which
includes pyarrow's threads), then the median records/s of each part. ``--smoke`` is a
seconds-long run for the test suite (20,000 records, 1 repeat).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from connectors.base import SinkContext
from connectors.parquet import ParquetSink, ParquetSource
from pipelines.batch import Batch
from pipelines.log.base import FetchedBatch, RawBatch

BATCH = 2000
"""Records per batch (the worker's ``MAX_BATCH``)."""
STAMP = 1_767_225_600_000
READ_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Run:
    part: str
    records: int
    seconds: float
    cpu: float
    detail: str

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def batches(records: int) -> list[Batch]:
    """The input, made before the clock starts."""
    made = []
    for first in range(0, records, BATCH):
        count = min(BATCH, records - first)
        values = [
            {
                "user": f"u{(first + i) % 10_000}",
                "n": first + i,
                "amount": (first + i) * 0.5,
                "kind": "click" if (first + i) % 3 else "view",
            }
            for i in range(count)
        ]
        raw = RawBatch([None] * count, [None] * count, [STAMP] * count)
        offsets = list(range(first, first + count))
        fetched = FetchedBatch("clicks", 0, raw, offsets, first + count)
        made.append(Batch([None] * count, values, [STAMP] * count, list(range(count)), fetched))
    return made


async def write_run(work: list[Batch], directory: Path, args: argparse.Namespace) -> Run:
    sink = ParquetSink(directory, roll_rows=args.roll_rows, compression=args.compression)
    writer = sink.open(SinkContext("bench", "sink.parquet", 0))
    await writer.start()
    rows = since_flush = 0
    flushing = 0.0
    cpu = time.process_time()
    start = time.perf_counter()
    for batch in work:
        writer.write(batch)
        rows += len(batch)
        since_flush += len(batch)
        if since_flush >= args.checkpoint:
            began = time.perf_counter()
            await writer.flush()
            flushing += time.perf_counter() - began
            since_flush = 0
    began = time.perf_counter()
    await writer.close()
    flushing += time.perf_counter() - began
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    files = sorted(directory.glob("*.parquet"))
    size = sum(path.stat().st_size for path in files)
    detail = (
        f"{len(files)} files, {size / 1e6:.1f} MB; flush, roll and close {flushing:.2f} s, "
        f"write {seconds - flushing:.2f} s"
    )
    return Run("sink", rows, seconds, cpu, detail)


async def read_run(directory: Path, expected: int) -> Run:
    source = ParquetSource(directory, batch_size=READ_BATCH)
    rows = count = 0
    cpu = time.process_time()
    start = time.perf_counter()
    async for batch in source.read(None):
        rows += len(batch.values)
        count += 1
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if rows != expected:
        sys.exit(f"the source read {rows:,} records, not {expected:,}")
    return Run("source", rows, seconds, cpu, f"{count:,} batches")


async def main(args: argparse.Namespace) -> None:
    work = batches(args.records)
    print(
        f"ParquetSink, one writer: {args.records:,} records in batches of {BATCH:,}, a flush "
        f"every {args.checkpoint:,} rows, files of {args.roll_rows:,} rows, "
        f"compression {args.compression}; ParquetSource in batches of {READ_BATCH:,}"
    )
    runs: dict[str, list[Run]] = {"sink": [], "source": []}
    root = Path(tempfile.mkdtemp(prefix="parquet-", dir=args.data_root))
    try:
        for round_ in range(args.repeat):
            directory = root / f"run{round_}"
            for run in (
                await write_run(work, directory, args),
                await read_run(directory, args.records),
            ):
                runs[run.part].append(run)
                print(
                    f"  run {round_ + 1} {run.part:6} {run.rate:>12,.0f} records/s  "
                    f"{run.seconds:.2f} s, CPU {run.cpu:.2f} s ({run.detail})"
                )
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for part, done in runs.items():
        rate = statistics.median(run.rate for run in done)
        cpu = statistics.median(run.cpu / run.records * 1e6 for run in done)
        name = "ParquetSink write+flush" if part == "sink" else "ParquetSource read"
        print(f"{name}: {rate:,.0f} records/s (median), CPU {cpu:.2f} µs/record")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--checkpoint", type=int, default=50_000, help="rows between flushes")
    parser.add_argument("--roll-rows", type=int, default=250_000, help="rows per Parquet file")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each part; median shown")
    parser.add_argument("--compression", default="zstd", help="Parquet codec")
    parser.add_argument("--data-root", type=Path, default=None, help="where the files go")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.repeat = 20_000, 1
    return args


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
