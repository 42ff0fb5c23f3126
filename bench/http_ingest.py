"""What HttpSource takes in: records/s posted as NDJSON (or JSON arrays) by concurrent clients.

    python bench/http_ingest.py [--records N] [--per-post P] [--clients C] [--batch-size B]
                                [--formats ndjson json] [--repeat R] [--smoke]

One process, one event loop: an :class:`~connectors.http.HttpSource` on a free port of
127.0.0.1, its batches taken by a trivial loop (no log: asking for the next batch at once
tells the source the last one is durable, so every request is answered as soon as its batch
is taken), and ``--clients`` aiohttp clients posting ``--per-post`` records a request
(bodies encoded before the clock starts) until ``--records`` records are acknowledged. The
records are small click events (``{"user", "url", "at", "n"}``, about 70 bytes of JSON).

Both sides share the one core the loop runs on, so the rate is what a runner's HttpSource
takes with the clients' cost on top: an upper bound of the endpoint alone it is not. For
scale it also prints the floor: ``orjson.loads`` of the same lines, per record, in a plain loop.

Each format runs ``--repeat`` times; the script prints each run (records/s, requests/s,
batches and their mean size, POST latency p50 / p99 / max) and the median records/s.
``--smoke`` is a seconds-long run for the test suite (20,000 records, 2 clients, 1 repeat).

This is a benchmark, not a test: it checks only that every record came through once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from connectors.http import JSON, NDJSON, HttpSource


@dataclass(frozen=True, slots=True)
class Run:
    """One measured run."""

    format: str
    records: int
    requests: int
    seconds: float
    batches: int
    latencies: list[float]
    """Seconds from each POST to its answer."""

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def make_bodies(records: int, per_post: int, kind: str) -> list[tuple[bytes, int]]:
    """The request bodies, and the records in each."""
    values = [
        {"user": f"u{n % 1000}", "url": f"/p/{n % 97}", "at": 1_767_225_600_000 + n, "n": n}
        for n in range(records)
    ]
    bodies = []
    for start in range(0, records, per_post):
        chunk = values[start : start + per_post]
        if kind == "ndjson":
            body = b"".join(orjson.dumps(v) + b"\n" for v in chunk)
        else:
            body = orjson.dumps(chunk)
        bodies.append((body, len(chunk)))
    return bodies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def measure(kind: str, bodies: list[tuple[bytes, int]], clients: int, batch: int) -> Run:
    """Post every body through ``clients`` clients to a fresh HttpSource; time it."""
    source = HttpSource(port=0, batch_size=batch, max_body=64 << 20, max_pending=10_000_000)
    taken = 0
    batches = 0
    total = sum(count for _, count in bodies)
    done = asyncio.Event()

    async def consume() -> None:
        nonlocal taken, batches
        async for got in source.read(None):
            taken += len(got.values)
            batches += 1
            if taken >= total:
                done.set()

    consumer = asyncio.create_task(consume())
    while source.address is None:
        await asyncio.sleep(0.001)
    url = f"http://127.0.0.1:{source.address[1]}{source.path}"
    content_type = NDJSON if kind == "ndjson" else JSON
    queue = list(reversed(bodies))
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            body, count = queue.pop()
            sent = time.perf_counter()
            async with session.post(
                url, data=body, headers={"Content-Type": content_type}
            ) as response:
                answer = orjson.loads(await response.read())
                if response.status != 200 or answer != {"accepted": count}:
                    raise SystemExit(f"FAILED: {response.status} {answer}")
            latencies.append(time.perf_counter() - sent)

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        await asyncio.wait_for(done.wait(), 60)
        seconds = time.perf_counter() - started
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    if taken != total:
        raise SystemExit(f"FAILED: {taken:,} records taken, {total:,} posted")
    return Run(kind, total, len(bodies), seconds, batches, latencies)


def parse_floor(bodies: list[tuple[bytes, int]]) -> float:
    """Records/s of ``orjson.loads`` over the NDJSON lines alone."""
    lines = [line for body, _ in bodies for line in body.split(b"\n") if line]
    loads = orjson.loads
    started = time.perf_counter()
    for line in lines:
        loads(line)
    return len(lines) / (time.perf_counter() - started)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="Records/s an HttpSource takes in.")
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--per-post", type=int, default=1000, help="records per request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--batch-size", type=int, default=1000, help="HttpSource batch_size")
    parser.add_argument("--formats", nargs="+", choices=["ndjson", "json"], default=["ndjson"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per format; median shown")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.clients, args.repeat = 20_000, 2, 1
    print(
        f"{args.records:,} records, {args.per_post:,} a POST, {args.clients} clients, "
        f"batch_size {args.batch_size:,}, {args.repeat} run(s) per format"
    )
    for kind in args.formats:
        bodies = make_bodies(args.records, args.per_post, kind)
        runs = []
        for _ in range(args.repeat):
            run = asyncio.run(measure(kind, bodies, args.clients, args.batch_size))
            runs.append(run)
            print(
                f"{kind}: {run.rate:,.0f} records/s, {run.requests / run.seconds:,.0f} "
                f"requests/s, {run.batches:,} batches ({run.records / run.batches:,.0f} records "
                f"each), POST latency p50 {percentile(run.latencies, 0.5) * 1000:.1f} ms, "
                f"p99 {percentile(run.latencies, 0.99) * 1000:.1f} ms, "
                f"max {max(run.latencies) * 1000:.1f} ms"
            )
        median = statistics.median(run.rate for run in runs)
        print(f"{kind} median: {median:,.0f} records/s")
    floor = parse_floor(make_bodies(min(args.records, 100_000), args.per_post, "ndjson"))
    print(f"floor, orjson.loads per line: {floor:,.0f} records/s")
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
