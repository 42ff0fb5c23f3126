"""Hot keys: a keyed sum over Zipf-distributed keys, unsalted and with ``key_by(..., salt=N)``.

    python bench/hot_keys.py [--records N] [--keys K] [--zipf S] [--salt N] [--workers W]

The input (``--records`` values ``{"k": key, "n": number}``, keys drawn from ``--keys`` keys
with Zipf exponent ``--zipf``, so the first key carries a large share) is pre-filled once into
a 4-partition topic of an embedded log, without record keys and evenly over the partitions;
each run copies it and runs ``bench/hot_keys_pipeline.py`` (``key_by`` then ``sum``) with
``pipelines.runtime.runner.run`` and ``--workers`` spawned worker processes until the input is
drained, ``--repeat`` times per arm, interleaved (unsalted, salted, then salted, unsalted ...).

It prints each run's records/s (start -> drained), the hot key's share of its partition as the
run's sampling saw it, then each arm's best run and the salted/unsalted ratio, and checks that
both arms end with every key's exact total. ``--smoke`` is a seconds-long run for the tests.

This is a benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import orjson

from pipelines.loader import load_pipeline
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.embedded import EmbeddedLog
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.runner import RunOptions, run
from pipelines.runtime.topology import compile_pipeline

PIPELINE = Path(__file__).resolve().parent / "hot_keys_pipeline.py"
PARTITIONS = 4
PREFILL_BATCH = 5000


@dataclass(frozen=True, slots=True)
class Run:
    """One run until drained."""

    salt: int
    records: int
    seconds: float
    hot_share: float
    """The largest share of a partition's records one key had, as the run sampled it."""

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000, help="input records")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys")
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the keys")
    parser.add_argument("--salt", type=int, default=8, help="sub-keys per key, salted arm")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per arm")
    parser.add_argument("--data-root", type=Path, default=None, help="where data dirs go")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.keys, args.repeat = 20_000, 500, 1
    return args


def zipf_values(records: int, keys: int, exponent: float) -> list[dict[str, object]]:
    """``records`` values whose keys follow Zipf's law over ``keys`` keys (seeded)."""
    rng = random.Random(7)
    weights = list(accumulate(1 / rank**exponent for rank in range(1, keys + 1)))
    drawn = rng.choices(range(keys), cum_weights=weights, k=records)
    return [{"k": f"key-{key}", "n": i % 100} for i, key in enumerate(drawn)]


async def prefill(data_dir: Path, values: list[dict[str, object]]) -> None:
    """Create the pipeline's topics and append ``values``, keyless, over the input partitions."""
    log = EmbeddedLog(data_dir)
    try:
        await prepare_topics(log, compile_pipeline(load_pipeline(str(PIPELINE))))
        producer = log.producer()
        stamp = time.time_ns() // 1_000_000
        for index, start in enumerate(range(0, len(values), PREFILL_BATCH)):
            chunk = [orjson.dumps(v) for v in values[start : start + PREFILL_BATCH]]
            batch = RawBatch([None] * len(chunk), chunk, [stamp] * len(chunk))
            await producer.send("hot-in", index % PARTITIONS, batch)
        await producer.close()
    finally:
        await log.close()


async def final_totals(data_dir: Path) -> dict[str, int]:
    """Each key's last total on the output topic."""
    log = EmbeddedLog(data_dir)
    totals: dict[str, int] = {}
    try:
        for partition in range(PARTITIONS):
            tp = TopicPartition("hot-out", partition)
            end = (await log.end_offsets([tp]))[tp]
            offset = 0
            while offset < end:
                fetched = await log.read(tp, offset, 10_000)
                for key, value in zip(fetched.records.keys, fetched.records.values, strict=True):
                    assert key is not None and value is not None
                    totals[key.decode()] = orjson.loads(value)
                offset = fetched.next_offset
    finally:
        await log.close()
    return totals


def one_run(template: Path, scratch: Path, args: argparse.Namespace, salt: int, n: int) -> Run:
    data_dir = scratch / f"run-{salt}-{n}"
    shutil.copytree(template, data_dir)
    os.environ["BENCH_SALT"] = str(salt)  # the spawned workers inherit it
    started = time.perf_counter()
    state = run(
        RunOptions(spec=str(PIPELINE), workers=args.workers, data_dir=data_dir, progress=False)
    )
    seconds = time.perf_counter() - started
    shares = [load.top[0][1] for load in state.hot_keys() if load.top]
    result = Run(salt, args.records, seconds, max(shares, default=0.0))
    totals = asyncio.run(final_totals(data_dir))
    shutil.rmtree(data_dir)
    expected_totals(args, totals)
    return result


def expected_totals(args: argparse.Namespace, totals: dict[str, int]) -> None:
    expected: dict[str, int] = {}
    for value in zipf_values(args.records, args.keys, args.zipf):
        key = str(value["k"])
        expected[key] = expected.get(key, 0) + int(str(value["n"]))
    if totals != expected:
        wrong = sum(totals.get(k) != v for k, v in expected.items())
        print(f"  WARNING: {wrong:,} keys end with a wrong total", flush=True)


def describe(result: Run) -> str:
    arm = f"salt={result.salt}" if result.salt else "unsalted"
    return (
        f"{arm:>9}, {result.records:,} records: {result.rate:,.0f} records/s "
        f"({result.seconds:.2f} s), hottest key {result.hot_share:.0%} of its partition"
    )


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    values = zipf_values(args.records, args.keys, args.zipf)
    top = sum(1 for v in values if v["k"] == "key-0") / len(values)
    print(
        f"hot keys: key_by + sum over {args.records:,} records, {args.keys:,} keys (Zipf "
        f"{args.zipf:g}: the first carries {top:.0%} of the records), {PARTITIONS} partitions, "
        f"{args.workers} workers, embedded log",
        flush=True,
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="headwater-bench-", dir=args.data_root) as tmp:
        scratch = Path(tmp)
        template = scratch / "template"
        asyncio.run(prefill(template, values))
        del values
        for attempt in range(args.repeat):
            arms = (0, args.salt) if attempt % 2 == 0 else (args.salt, 0)
            for salt in arms:
                runs.append(one_run(template, scratch, args, salt, attempt))
                print(f"  {describe(runs[-1])}", flush=True)
    unsalted = max((r for r in runs if not r.salt), key=lambda r: r.rate)
    salted = max((r for r in runs if r.salt), key=lambda r: r.rate)
    print(f"best unsalted: {unsalted.rate:,.0f} records/s")
    print(f"best salt={salted.salt}: {salted.rate:,.0f} records/s")
    print(f"salted / unsalted: {salted.rate / unsalted.rate:.2f}x")
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
