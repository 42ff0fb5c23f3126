"""Every benchmark script in ``bench/`` runs, in a seconds-long smoke mode.

Each test runs one script as a subprocess with arguments small enough for a few seconds, and
checks that it exits 0 and prints the numbers it is meant to print: that the lines are there
and their numbers parse, not what the numbers are. Peers (Quix Streams, faust-streaming) are
left out through the scripts' own options, so the tests need no ``[bench]`` extra. The Kafka
scripts run against ``HEADWATER_TEST_KAFKA`` (default ``127.0.0.1:9092``) and fail when no
broker answers, as the other Kafka tests do; the PostgreSQL one against
``HEADWATER_TEST_POSTGRES``, which it fails without.

Rates a script samples between two commits or two polls of the output (``bench/stateful.py``'s
``rec/s`` and ``output-sampled``) need more than one commit interval of input to be measured;
on these inputs they may print ``nan``, which parses as a number and is accepted.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import clean_env
from support.postgres import postgres_url

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
KAFKA = os.environ.get("HEADWATER_TEST_KAFKA", "127.0.0.1:9092")
TIMEOUT = 180.0

NUM = r"(-?\d[\d,]*(?:\.\d+)?|nan)"
"""A number as the scripts print them: ``1,026,092``, ``0.27``, ``-9.8``, or ``nan``."""

SMOKE_TESTED = {
    "commit_cost.py",
    "micro_floor.py",
    "stateless.py",
    "profile_stateless.py",
    "stateful.py",
    "metrics.py",
    "postgres.py",
    "http_ingest.py",
    "http_run.py",
    "parquet.py",
    "hot_keys.py",
    "disk_soak.py",
    "failover.py",
    "kafka/compare.py",
    "kafka/run_headwater.py",  # the Headwater workers compare.py starts
    "kafka/profile_worker.py",
    "kafka/read_path.py",
}
MODULES = {
    "workload.py",
    "stateless_pipeline.py",
    "stateful_pipeline.py",
    "hot_keys_pipeline.py",
    "kafka/broker.py",
    "kafka/clicks.py",
}
"""Imported by the scripts above, not run on their own."""
PEER_WORKERS = {"kafka/run_quix.py", "kafka/run_faust.py"}
"""compare.py's Quix Streams and faust workers: they import their peer, which the ``[bench]``
extra installs and CI does not; ``compare.py --frameworks quix faust`` runs them."""


def bench(script: str, *args: str, cwd: Path) -> str:
    """``python bench/SCRIPT ARGS`` in ``cwd``; asserts it exits 0; returns its stdout."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=cwd,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    for word in ("WARNING", "FAILED"):
        assert word not in done.stdout, done.stdout
    return done.stdout


def numbers(output: str, pattern: str) -> list[float]:
    """The numbers of the first line matching ``pattern`` (a regex with ``{n}`` for each
    number, matched from the line's first non-blank character; an optional part's numbers are
    left out when it is not there); fails if no line does."""
    regex = re.compile(r"^\s*" + pattern.replace("{n}", NUM), re.MULTILINE)
    found = regex.search(output)
    assert found is not None, f"no line matches {pattern!r} in:\n{output}"
    return [float(group.replace(",", "")) for group in found.groups() if group is not None]


def finite(output: str, pattern: str) -> list[float]:
    """:func:`numbers`, all of them finite."""
    values = numbers(output, pattern)
    assert all(math.isfinite(v) for v in values), (pattern, values)
    return values


def test_every_bench_script_has_a_smoke_test() -> None:
    scripts = {str(path.relative_to(BENCH)) for path in BENCH.rglob("*.py")}
    assert scripts == SMOKE_TESTED | MODULES | PEER_WORKERS


def test_postgres(tmp_path: Path) -> None:
    url = postgres_url()
    out = bench("postgres.py", "--url", url, "--records", "6000", "--keys", "1000", cwd=tmp_path)
    finite(out, r"run 3 plain\s+{n} rows/s  {n} s$")
    for mode in ("upsert", "append", "plain"):
        finite(out, mode + r"\s+{n}\s+{n}ms\s+{n}ms$")


def test_http_ingest(tmp_path: Path) -> None:
    out = bench("http_ingest.py", "--smoke", "--formats", "ndjson", "json", cwd=tmp_path)
    for kind in ("ndjson", "json"):
        finite(
            out,
            kind + r": {n} records/s, {n} requests/s, {n} batches \({n} records each\), "
            r"POST latency p50 {n} ms, p99 {n} ms, max {n} ms$",
        )
        finite(out, kind + r" median: {n} records/s$")
    finite(out, r"floor, orjson.loads per line: {n} records/s$")


def test_http_run(tmp_path: Path) -> None:
    out = bench("http_run.py", "--smoke", cwd=tmp_path)
    finite(
        out,
        r"acknowledged on the log: {n} records/s, POST latency p50 {n} ms, p99 {n} ms, "
        r"max {n} ms$",
    )


def test_parquet(tmp_path: Path) -> None:
    out = bench("parquet.py", "--smoke", "--data-root", str(tmp_path), cwd=tmp_path)
    for part in ("sink", "source"):
        finite(out, rf"run 1 {part}\s+{{n}} records/s  {{n}} s, CPU {{n}} s \(.*\)$")
    finite(out, r"ParquetSink write\+flush: {n} records/s \(median\), CPU {n} µs/record$")
    finite(out, r"ParquetSource read: {n} records/s \(median\), CPU {n} µs/record$")


def test_disk_soak(tmp_path: Path) -> None:
    out = bench("disk_soak.py", "--smoke", cwd=tmp_path)
    at_half, at_end = finite(out, r"disk at half time: {n} MB, at the end: {n} MB$")
    (bound,) = finite(out, r"bound \(.*\): {n} MB$")
    assert max(at_half, at_end) <= bound
    finite(out, r"windows counted as the input says: {n} of {n}$")
    assert "bounded and exact" in out


def test_failover(tmp_path: Path) -> None:
    out = bench("failover.py", "--smoke", cwd=tmp_path)
    failover, hand_back, normal, output, produced = finite(
        out,
        r"run 1: failover gap {n} ms \(partitions \[[\d, ]+\]\), hand-back gap {n} ms, normal "
        r"silence {n} ms; output {n} for {n} input records",
    )
    assert 0 < failover < 30_000 and 0 <= hand_back < 30_000 and normal > 0
    assert output >= produced > 0


def test_failover_with_standbys(tmp_path: Path) -> None:
    out = bench("failover.py", "--smoke", "--standby", cwd=tmp_path)
    failover, _, _, output, produced = finite(
        out,
        r"run 1: failover gap {n} ms \(partitions \[[\d, ]+\]\), hand-back gap {n} ms, normal "
        r"silence {n} ms; output {n} for {n} input records",
    )
    assert 0 < failover < 30_000 and output >= produced > 0
    assert re.search(r"took over task \d+\.\d+ from its standby in [\d,]+ ms: [\d,]+ ", out)


def test_hot_keys(tmp_path: Path) -> None:
    out = bench("hot_keys.py", "--smoke", "--data-root", str(tmp_path), cwd=tmp_path)
    for arm in ("unsalted", "salt=8"):
        finite(
            out, arm + r", {n} records: {n} records/s \({n} s\), hottest key {n}% of its partition$"
        )
    finite(out, r"salted / unsalted: {n}x$")


def test_kafka_read_path(tmp_path: Path) -> None:
    out = bench("kafka/read_path.py", "--records", "2000", "--repeat", "1", cwd=tmp_path)
    for path in ("ConsumerRecords", "record batches"):
        for crc in ("on", "off"):
            finite(out, rf"{path}\s+CRC {crc}\s*:\s+{{n}} ns/record, {{n}} collections$")


def test_commit_cost(tmp_path: Path) -> None:
    out = bench("commit_cost.py", "--commits", "50", "--data-root", str(tmp_path), cwd=tmp_path)
    finite(out, r"^commit of 4 partitions \(50 commits\): median {n} µs, p99 {n} µs, max {n} µs")


def test_micro_floor(tmp_path: Path) -> None:
    out = bench("micro_floor.py", "--records", "20000", "--repeat", "1", "--parallel", cwd=tmp_path)
    for variant in (
        "loop",
        "loop, inlined",
        "columns",
        "loads only",
        r"dumps only \(the kept half\)",
    ):
        finite(out, variant + r"\s+{n}\s+{n}\s+{n}$")
    finite(out, r"bare loop, 1 process:\s+{n} records/s, {n} CPU µs/record$")
    finite(out, r"bare loop, 2 at once:\s+{n} records/s, {n} CPU µs/record \({n}x the records/s\)")


def test_stateless(tmp_path: Path) -> None:
    out = bench(
        "stateless.py",
        *("--records", "100000", "--workers", "1", "2", "--timeline"),
        *("--rate", "5000", "--seconds", "1", "--warmup", "0.5", "--data-root", str(tmp_path)),
        cwd=tmp_path,
    )
    for workers in (1, 2):
        finite(
            out,
            rf"throughput {workers} worker\(s\): {{n}} rec/s start->drained \({{n}} s\), "
            r"{n} rec/s processing \({n} s\), {n} rec/s steady, start-up {n} s, "
            r"commit-sampled {n} rec/s, worker CPU {n} s \({n} µs/record, {n} faults/record\), "
            r"runner CPU {n} s, other processes {n} cores$",
        )
        finite(
            out,
            rf"latency {workers} worker\(s\): sent {{n}} at {{n}} rec/s, {{n}} measured: "
            r"p50 {n} ms, p99 {n} ms, max {n} ms, other processes {n} cores$",
        )
        finite(out, rf"{workers}" + r"\s+{n}" * 9 + "$")  # the table's row
    finite(out, r"records/s per 100 ms: {n}s {n}k")
    finite(out, r"2 workers / 1 worker: {n}x steady, {n}x processing, {n}x start->drained$")


@pytest.mark.parametrize(
    "mode",
    [["--mode", "timers"], ["--mode", "cprofile", "--top", "5"], ["--processes", "2"]],
    ids=["timers", "cprofile", "processes"],
)
def test_profile_stateless(tmp_path: Path, mode: list[str]) -> None:
    out = bench("profile_stateless.py", "--records", "20000", *mode, cwd=tmp_path)
    if "--processes" in mode:
        finite(out, r"2 worker process\(es\), {n} records: CPU after start-up {n} µs/record")
    else:
        finite(
            out,
            r"{n} records in {n} s: {n} rec/s, {n} µs/record wall, CPU {n} µs user \+ "
            r"{n} µs system per record, {n} minor faults/record$",
        )
        produced, expected = finite(out, r"output {n} records \(expected {n}\)$")
        assert produced == expected == 10_000
    if "cprofile" in mode:
        finite(out, r"{n} function calls \({n} primitive calls\) in {n} seconds$")
        assert "Ordered by: cumulative time" in out
    else:
        finite(out, r"Task\.process\s+{n}\s+{n}%$")
        finite(out, r"the whole run \(CPU\)\s+{n}\s+{n}%$")


STATEFUL_SMALL = (
    *("--records", "20000", "--keys", "1000", "--window-keys", "100", "--restore-keys", "5000"),
    *("--idle-ms", "200", "--quiet-wait", "0", "--timeout", "60"),
)


def stateful_run(out: str, test: str, keys: int, backend: str, guarantee: str) -> None:
    """The line of one stateful run: the commit- and output-sampled rates may be nan (see the
    module docstring), start->done and the CPU are measured."""
    numbers(
        out,
        rf"headwater {test} \({keys:,} keys\), {backend}, {guarantee}: {{n}} rec/s, "
        r"start->done {n} rec/s, first commit after {n} s, (?:output-sampled {n} rec/s, )?"
        r"worker CPU {n} s \({n} µs/record\), others {n} cores \(before: {n}\), "
        r"peak worker RSS {n} MiB \(anonymous {n}\)$",
    )
    (rss,) = numbers(
        out, rf"headwater {test} \({keys:,} keys\), {backend}, .* peak worker RSS {{n}} MiB"
    )
    assert rss > 10, f"the workers' memory was not sampled: {rss} MiB"
    finite(
        out,
        rf"headwater {test} \({keys:,} keys\), {backend}, {guarantee}: .*"
        r"start->done {n} rec/s, first commit after {n} s, .*worker CPU {n} s \({n} µs/record\)",
    )


def test_stateful_embedded(tmp_path: Path) -> None:
    out = bench(
        "stateful.py",
        *("--backends", "embedded", *STATEFUL_SMALL, "--data-root", str(tmp_path)),
        cwd=tmp_path,
    )
    stateful_run(out, "keyed count", 1000, "embedded", "at_least_once")
    stateful_run(out, "keyed count", 1000, "embedded", "exactly_once")
    stateful_run(out, "window count", 100, "embedded", "at_least_once")
    stateful_run(out, "keyed count, restore", 5000, "embedded", "at_least_once")
    finite(
        out,
        r"restore: {n} changelog records \({n} applied, {n} keys\): into memory in "
        r"{n}, {n}, {n} s \({n}/s\); as a fresh worker in {n}, {n}, {n} s \({n}/s\); "
        r"from the local copies: {n} keys in {n} s$",
    )
    finite(out, r"restore, changelog records/s: {n} as a fresh worker, {n} into memory only")
    assert "framework                   test     keys   backend" in out


def test_stateful_kafka(tmp_path: Path) -> None:
    out = bench(
        "stateful.py",
        *("--backends", "kafka", "--tests", "count", "eos", "window", *STATEFUL_SMALL),
        *("--bootstrap", KAFKA, "--data-root", str(tmp_path)),
        cwd=tmp_path,
    )
    for guarantee in ("at_least_once", "exactly_once"):
        stateful_run(out, "keyed count", 1000, "kafka", guarantee)
        numbers(out, rf"headwater keyed count .*, kafka, {guarantee}: .*output-sampled {{n}} rec/s")
    stateful_run(out, "window count", 100, "kafka", "at_least_once")


def test_stateful_profile(tmp_path: Path) -> None:
    out = bench(
        "stateful.py",
        *("--profile", "restore", "--records", "20000", "--restore-keys", "5000"),
        *("--data-root", str(tmp_path)),
        cwd=tmp_path,
    )
    each = r": {n} in {n} s = {n}/s wall \(windows: idle wait included\), CPU {n} s = {n} µs each$"
    for run in ("building the state", "restore, plain", "restore, timers", "restore, cprofile"):
        finite(out, run + each)
    finite(out, r"TaskState\.restore\s+{n}\s+{n}%$")
    finite(out, r"the whole run \(CPU\)\s+{n}\s+{n}%$")
    assert "--- by cumulative" in out


def test_metrics(tmp_path: Path) -> None:
    out = bench(
        "metrics.py",
        *("--records", "50000", "--repeat", "1", "--scrape-interval", "0.1"),
        *("--data-root", str(tmp_path)),
        cwd=tmp_path,
    )
    run = r"{n} rec/s start->drained \({n} s\), {n} rec/s processing, other processes {n} cores"
    finite(out, r"metrics off: " + run + "$")
    (*_, scrapes) = finite(out, r"metrics on : " + run + r", {n} scrapes$")
    assert scrapes >= 1
    for rate in ("start->drained", "processing"):
        finite(
            out,
            rate + r": median {n} rec/s without metrics \({n}-{n}\), "
            r"{n} rec/s with metrics \({n}-{n}\): overhead {n}%$",
        )
    finite(out, r"scrape latency over {n} scrapes: p50 {n} ms, p99 {n} ms, max {n} ms$")


def test_kafka_compare(tmp_path: Path) -> None:
    out = bench(
        "kafka/compare.py",
        *("--bootstrap", KAFKA, "--frameworks", "headwater", "--records", "20000"),
        *("--workers", "2", "--rate", "1000", "--seconds", "1", "--warmup", "0.5"),
        *("--timeout", "30"),
        cwd=tmp_path,
    )
    *_, output = finite(
        out,
        r"headwater +2 worker\(s\): +{n} rec/s over {n} s, group stable after {n} s, "
        r"{n}% of the output written before the gate opened, {n} output records$",
    )
    assert output == 10_000
    finite(
        out,
        r"headwater +2 worker\(s\): {n} measured at {n} rec/s: p50 {n} ms, p99 {n} ms, max {n} ms$",
    )
    finite(out, r"headwater +2" + r"\s+{n}" * 7 + "$")  # the table's row
    finite(out, r"Headwater {n} rec/s per worker \(target {n}: (?:met|MISSED)\)$")


def test_kafka_profile_worker(tmp_path: Path) -> None:
    out = bench(
        "kafka/profile_worker.py",
        *("--bootstrap", KAFKA, "--records", "20000", "--top", "5"),
        cwd=tmp_path,
    )
    *_, produced, expected = finite(
        out,
        r"{n} records in {n} s: {n} rec/s \({n} µs/record\), CPU {n} s \({n} µs/record\) "
        r"under cProfile; "
        r"output {n} \(expected {n}\)$",
    )
    assert produced == expected == 10_000
    assert "Ordered by: internal time" in out
