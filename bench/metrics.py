"""What ``headwater run --metrics-port`` costs: the stateless benchmark with and without metrics.

    python bench/metrics.py [--records N] [--workers W] [--repeat R] [--scrape-interval S]

The run is ``bench/stateless.py``'s throughput run (``bench/stateless_pipeline.py`` over a
pre-filled 4-partition input on the embedded log, ``pipelines.runtime.runner.run`` with real
spawned worker processes, until the input is drained), ``--repeat`` times without metrics and
``--repeat`` times with ``metrics_port`` set (what ``--metrics-port`` sets), interleaved (off,
on, then on, off, ...) so that a slow spell of the machine hits both alike. While a run with
metrics goes on, a thread scrapes ``http://127.0.0.1:PORT/metrics`` every ``--scrape-interval``
seconds (0.5 by default; until the first scrape answers it retries every 10 ms, so short runs
are scraped too), as Prometheus would, and times each scrape (request to the last byte read).

It prints every run, then the median records/s of each arm (start -> drained and processing,
as ``bench/stateless.py`` defines them) with its slowest and fastest run, the overhead of
metrics in percent of the median rate without them, and the scrape latency p50 / p99 / max over
every scrape. The server and the scraping thread both live in this process, the runner's (the
workers are other processes).

This is a benchmark, not a test: it prints numbers, and checks only that every record came out
and that every scrape returned the run's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import stateless
from stateless import ThroughputRun, check_output, load_topology, prefill, throughput_run
from workload import clicks_below

FIRST_SCRAPE_RETRY = 0.01
"""Seconds between scrapes until the server first answers."""
SCRAPE_TIMEOUT = 5.0
EXPECTED_METRIC = b"headwater_records_read_total"


@dataclass(frozen=True, slots=True)
class Arm:
    """One run and whether it served metrics."""

    metrics: bool
    run: ThroughputRun
    scrapes: list[float]
    """Seconds each answered scrape took."""


class Scraper(threading.Thread):
    """Scrapes ``/metrics`` every ``interval`` seconds until stopped."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(name="metrics-scraper", daemon=True)
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._interval = interval
        self._halt = threading.Event()
        self.latencies: list[float] = []
        self.bad: list[str] = []
        """Answers that were not the run's metrics."""

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self._url, timeout=SCRAPE_TIMEOUT) as response:
                    body = response.read()
            except (OSError, http.client.HTTPException):
                # not serving yet (or any more): try again soon until the first answer
                self._halt.wait(self._interval if self.latencies else FIRST_SCRAPE_RETRY)
                continue
            self.latencies.append(time.perf_counter() - started)
            if EXPECTED_METRIC not in body:
                self.bad.append(body[:200].decode(errors="replace"))
            self._halt.wait(max(0.0, self._interval - (time.perf_counter() - started)))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000, help="input records")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument("--repeat", type=int, default=5, help="runs with and runs without")
    parser.add_argument(
        "--scrape-interval", type=float, default=0.5, help="seconds between scrapes"
    )
    parser.add_argument("--data-root", type=Path, default=None, help="where data dirs go")
    return parser.parse_args(argv)


def one_run(
    config: stateless.Config,
    template: Path,
    scratch: Path,
    args: argparse.Namespace,
    metrics: bool,
    attempt: int,
) -> Arm:
    if not metrics:
        run = throughput_run(config, template, scratch, args.workers, attempt)
        return Arm(False, run, [])
    port = free_port()
    scraper = Scraper(port, args.scrape_interval)
    scraper.start()
    try:
        run = throughput_run(config, template, scratch, args.workers, attempt, metrics_port=port)
    finally:
        scraper.stop()
    for body in scraper.bad:
        print(f"  WARNING: a scrape did not return the run's metrics: {body!r}")
    return Arm(True, run, scraper.latencies)


def report_run(arm: Arm) -> None:
    run = arm.run
    scrapes = f", {len(arm.scrapes)} scrapes" if arm.metrics else ""
    print(
        f"  metrics {'on ' if arm.metrics else 'off'}: {run.rate:,.0f} rec/s start->drained "
        f"({run.total:.2f} s), {run.processing_rate:,.0f} rec/s processing, "
        f"other processes {run.other_cores:.2f} cores{scrapes}",
        flush=True,
    )
    check_output("throughput", run.output, clicks_below(run.records))


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(arms: list[Arm]) -> None:
    off = [a.run for a in arms if not a.metrics]
    on = [a.run for a in arms if a.metrics]
    print()
    for name, rate in (("start->drained", "rate"), ("processing", "processing_rate")):
        without = [getattr(r, rate) for r in off]
        with_ = [getattr(r, rate) for r in on]
        base, cost = statistics.median(without), statistics.median(with_)
        print(
            f"{name}: median {base:,.0f} rec/s without metrics "
            f"({min(without):,.0f}-{max(without):,.0f}), {cost:,.0f} rec/s with metrics "
            f"({min(with_):,.0f}-{max(with_):,.0f}): overhead {(base - cost) / base * 100:.1f}%"
        )
    scrapes = sorted(s * 1000 for a in arms for s in a.scrapes)
    print(
        f"scrape latency over {len(scrapes)} scrapes: p50 {percentile(scrapes, 0.5):.2f} ms, "
        f"p99 {percentile(scrapes, 0.99):.2f} ms, max {percentile(scrapes, 1.0):.2f} ms"
    )


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    config = replace(
        stateless.parse_args([]),
        records=args.records,
        workers=[args.workers],
        partitions=args.partitions,
        repeat=args.repeat,
        phase="throughput",
        data_root=args.data_root,
    )
    topology = load_topology(args.partitions)
    print(
        f"--metrics-port cost, stateless filter+map on the embedded log: {args.records:,} "
        f"records, {args.partitions} partitions, {args.workers} worker(s), {args.repeat} runs "
        f"without and {args.repeat} with metrics (scraped every {args.scrape_interval:g} s)",
        flush=True,
    )
    arms: list[Arm] = []
    with tempfile.TemporaryDirectory(prefix="headwater-bench-", dir=args.data_root) as tmp:
        scratch = Path(tmp)
        template = scratch / "template"
        print(f"pre-filling {args.records:,} records ...", flush=True)
        asyncio.run(prefill(template, topology, args.records, args.partitions))
        for attempt in range(args.repeat):
            order = (False, True) if attempt % 2 == 0 else (True, False)
            for metrics in order:
                arm = one_run(config, template, scratch, args, metrics, attempt)
                report_run(arm)
                arms.append(arm)
    summarize(arms)
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
