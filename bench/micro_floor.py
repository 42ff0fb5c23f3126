"""The bare CPython floor of the stateless benchmark's work, without any framework around it.

    python bench/micro_floor.py [--records N] [--repeat R]

The same events and the same two functions as ``bench/stateless.py`` (``bench/workload.py``):
``orjson.loads`` -> filter -> build the small dict -> ``orjson.dumps``, in one process, over
bytes already in memory. It prints µs per *input* record (half of them are dropped by the
filter), so it compares directly with the pipeline's records/s:

* ``loop``: one tight per-record loop calling the workload functions;
* ``loop, inlined``: the same with the filter and map written inline (no Python calls);
* ``columns``: column-at-a-time, the way the runtime shapes the work (decode the batch, then
  filter it, then map it, then encode it);
* ``loads only`` / ``dumps only``: the two orjson calls alone, the part no framework can avoid.

Every variant works through the records in batches of 2000 (the worker's ``MAX_BATCH``) and
joins each batch's output into one ``bytes``, as the log does when it writes a frame. It also
prints minor page faults per record: on glibc, keeping a batch of ``orjson.dumps`` results alive
and then freeing all of it lets ``malloc`` give the heap top back to the kernel, and the next
batch faults every page in again (about one fault per ``dumps``), which can cost more than the
JSON work itself. How a program holds its output decides whether it pays that.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import orjson
from workload import encoded_events, event, is_click, summarize

BATCH = 2000
"""Records per batch (the worker's ``MAX_BATCH``)."""


def batches(values: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(values), BATCH):
        yield values[start : start + BATCH]


def loop(values: list[bytes]) -> int:
    loads, dumps = orjson.loads, orjson.dumps
    written = 0
    for batch in batches(values):
        out = []
        append = out.append
        for raw in batch:
            value = loads(raw)
            if is_click(value):
                append(dumps(summarize(value)))
        written += len(b"".join(out))
    return written


def loop_inlined(values: list[bytes]) -> int:
    loads, dumps = orjson.loads, orjson.dumps
    written = 0
    for batch in batches(values):
        out = []
        append = out.append
        for raw in batch:
            v = loads(raw)
            if v["kind"] == "click":
                append(dumps({"user": v["user"], "page": v["url"], "n": v["n"], "ts": v["ts"]}))
        written += len(b"".join(out))
    return written


def columns(values: list[bytes]) -> int:
    loads, dumps = orjson.loads, orjson.dumps
    written = 0
    for batch in batches(values):
        decoded = [loads(raw) for raw in batch]
        kept = [v for v, keep in zip(decoded, map(is_click, decoded), strict=True) if keep]
        written += len(b"".join([dumps(v) for v in map(summarize, kept)]))
    return written


def loads_only(values: list[bytes]) -> int:
    loads = orjson.loads
    return sum(len([loads(raw) for raw in batch]) for batch in batches(values))


def make_dumps_only(records: int) -> Callable[[list[bytes]], int]:
    summaries = [summarize(event(n, 0)) for n in range(0, records, 2)]

    def dumps_only(values: list[bytes]) -> int:
        dumps = orjson.dumps
        written = 0
        for start in range(0, len(summaries), BATCH // 2):
            written += len(b"".join([dumps(v) for v in summaries[start : start + BATCH // 2]]))
        return written

    return dumps_only


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def best_run(
    fn: Callable[[list[bytes]], Any], values: list[bytes], repeat: int
) -> tuple[float, int]:
    """The fastest of ``repeat`` runs: seconds, minor page faults."""
    runs = []
    for _ in range(repeat):
        faults_before = faults()
        started = time.perf_counter()
        fn(values)
        runs.append((time.perf_counter() - started, faults() - faults_before))
    return min(runs)


def parallel_worker(
    records: int, repeat: int, barrier: Barrier, results: Queue[list[float]]
) -> None:
    """One of ``--parallel`` processes: ``loop`` over the records, each round started together."""
    values = encoded_events(0, records, 1_700_000_000_000)
    times = []
    for _ in range(repeat):
        barrier.wait()
        started = time.perf_counter()
        loop(values)
        times.append(time.perf_counter() - started)
    results.put(times)


def parallel_rate(processes: int, records: int, repeat: int) -> float:
    """Records/s of ``processes`` processes running ``loop`` at once (best round)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results: Queue[list[float]] = context.Queue()
    children = [
        context.Process(target=parallel_worker, args=(records, repeat, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    times = [results.get() for _ in children]
    for child in children:
        child.join()
    slowest_per_round = [max(round_) for round_ in zip(*times, strict=True)]
    return processes * records / min(slowest_per_round)


def print_scaling(records: int, repeat: int) -> None:
    """How the machine itself scales: the bare loop in 1 process, then in 2 at once."""
    one = parallel_rate(1, records, repeat)
    two = parallel_rate(2, records, repeat)
    print(f"bare loop, 1 process:  {one:>12,.0f} records/s")
    print(f"bare loop, 2 at once:  {two:>12,.0f} records/s ({two / one:.2f}x)")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="The bare CPython floor of the stateless work.")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant; best is shown")
    parser.add_argument(
        "--parallel", action="store_true", help="also run the loop in 1 and 2 processes at once"
    )
    args = parser.parse_args(argv)
    values = encoded_events(0, args.records, 1_700_000_000_000)
    variants: list[tuple[str, Callable[[list[bytes]], Any]]] = [
        ("loop", loop),
        ("loop, inlined", loop_inlined),
        ("columns", columns),
        ("loads only", loads_only),
        ("dumps only (the kept half)", make_dumps_only(args.records)),
    ]
    print(f"{args.records:,} records, best of {args.repeat}")
    print(f"{'variant':<28} {'µs/record':>10} {'records/s':>12} {'faults/record':>14}")
    for name, fn in variants:
        seconds, faulted = best_run(fn, values, args.repeat)
        per_record = seconds / args.records
        print(
            f"{name:<28} {per_record * 1e6:>10.3f} {1 / per_record:>12,.0f} "
            f"{faulted / args.records:>14.3f}"
        )
    if args.parallel:
        print_scaling(args.records, args.repeat)
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
