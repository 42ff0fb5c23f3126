"""The bare CPython floor of the stateless benchmark's work, without any framework around it.

    python bench/micro_floor.py [--records N] [--repeat R]

The same events and the same two functions as ``bench/stateless.py`` (``bench/workload.py``):
``orjson.loads`` -> filter -> build the small dict -> ``orjson.dumps``, in one process, over
bytes already in memory (a pool of 20,000 distinct events, cycled, so the input is in the CPU
cache as a just-read log frame is). It prints CPU µs per *input* record (half of them are
dropped by the filter), which compares directly with the pipeline's worker CPU per record; CPU
time, not wall time, so other load on the machine does not count:

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
POOL = 20_000
"""Distinct events the input cycles through."""


def input_values(records: int) -> list[bytes]:
    pool = encoded_events(0, POOL, 1_700_000_000_000)
    return [pool[n % POOL] for n in range(records)]


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
    """The fastest of ``repeat`` runs: CPU seconds, minor page faults."""
    runs = []
    for _ in range(repeat):
        faults_before = faults()
        started = time.process_time()
        fn(values)
        runs.append((time.process_time() - started, faults() - faults_before))
    return min(runs)


Round = tuple[float, float]
"""One process's round: wall seconds, CPU seconds."""


def parallel_worker(
    records: int, repeat: int, barrier: Barrier, results: Queue[list[Round]]
) -> None:
    """One of ``--parallel`` processes: ``loop`` over the records, each round started together."""
    values = input_values(records)
    rounds = []
    for _ in range(repeat):
        barrier.wait()
        started, cpu = time.perf_counter(), time.process_time()
        loop(values)
        rounds.append((time.perf_counter() - started, time.process_time() - cpu))
    results.put(rounds)


def parallel_run(processes: int, records: int, repeat: int) -> tuple[float, float]:
    """``processes`` processes running ``loop`` at once: records/s of the best round, and the
    CPU µs per record of that round."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results: Queue[list[Round]] = context.Queue()
    children = [
        context.Process(target=parallel_worker, args=(records, repeat, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    per_child = [results.get() for _ in children]
    for child in children:
        child.join()
    rounds = list(zip(*per_child, strict=True))
    fastest = min(rounds, key=lambda round_: max(wall for wall, _ in round_))
    wall = max(wall for wall, _ in fastest)
    cpu = sum(cpu for _, cpu in fastest)
    return processes * records / wall, cpu / (processes * records) * 1e6


def print_scaling(records: int, repeat: int) -> None:
    """How the machine itself scales: the bare loop in 1 process, then in 2 at once."""
    one, one_cpu = parallel_run(1, records, repeat)
    two, two_cpu = parallel_run(2, records, repeat)
    print(f"bare loop, 1 process:  {one:>12,.0f} records/s, {one_cpu:.3f} CPU µs/record")
    print(
        f"bare loop, 2 at once:  {two:>12,.0f} records/s, {two_cpu:.3f} CPU µs/record "
        f"({two / one:.2f}x the records/s)"
    )


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="The bare CPython floor of the stateless work.")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant; best is shown")
    parser.add_argument(
        "--parallel", action="store_true", help="also run the loop in 1 and 2 processes at once"
    )
    args = parser.parse_args(argv)
    values = input_values(args.records)
    variants: list[tuple[str, Callable[[list[bytes]], Any]]] = [
        ("loop", loop),
        ("loop, inlined", loop_inlined),
        ("columns", columns),
        ("loads only", loads_only),
        ("dumps only (the kept half)", make_dumps_only(args.records)),
    ]
    print(f"{args.records:,} records, best of {args.repeat}")
    print(f"{'variant':<28} {'CPU µs/record':>13} {'records/s':>12} {'faults/record':>14}")
    for name, fn in variants:
        seconds, faulted = best_run(fn, values, args.repeat)
        per_record = seconds / args.records
        print(
            f"{name:<28} {per_record * 1e6:>13.3f} {1 / per_record:>12,.0f} "
            f"{faulted / args.records:>14.3f}"
        )
    if args.parallel:
        print_scaling(args.records, args.repeat)
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
