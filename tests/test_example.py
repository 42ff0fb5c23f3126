"""The clickstream example end to end: generate, ``headwater run`` with 2 worker processes,
report; and the same pipeline in memory through :mod:`pipelines.testing`.

Every result is compared with a reference computed here in plain Python from the same input.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition
from pipelines.partitioner import partition_for
from pipelines.record import Record, from_millis
from pipelines.runtime.watermarks import END_OF_TIME, split_markers
from pipelines.testing import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "clickstream"
EVENTS = 100_000
TIMEOUT = 60.0

View = tuple[str, str, str]
"""(user, page, ts) of one product view."""


# -- the reference ---------------------------------------------------------------------------


@dataclass
class Reference:
    """What the pipeline must produce from ``lines``, computed without Headwater."""

    lines: list[bytes]
    views: Counter[View]
    bad: Counter[bytes]
    """The lines that are not JSON, or not a click (a field missing or of the wrong type)."""


def _click(line: bytes) -> dict[str, str] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    fields = ("user", "url", "ts", "session")
    if not isinstance(value, dict) or not all(isinstance(value.get(f), str) for f in fields):
        return None
    try:
        datetime.fromisoformat(value["ts"])
    except ValueError:
        return None
    return value


def reference(path: Path) -> Reference:
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    views: Counter[View] = Counter()
    bad: Counter[bytes] = Counter()
    for line in lines:
        click = _click(line)
        if click is None:
            bad[line] += 1
        elif click["url"].startswith("/p/"):
            ts = datetime.fromisoformat(click["ts"]).isoformat()
            views[(click["user"], click["url"], ts)] += 1
    return Reference(lines, views, bad)


def as_view(value: dict[str, str]) -> View:
    assert set(value) == {"user", "page", "ts"}, value
    return (value["user"], value["page"], value["ts"])


# -- one clean run, shared -------------------------------------------------------------------


@dataclass
class ExampleRun:
    directory: Path
    clicks: Path
    output: Path
    data_dir: Path
    result: subprocess.CompletedProcess[str]
    ref: Reference


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    directory = tmp_path_factory.mktemp("clickstream")
    clicks = directory / "tmp" / "clicks.jsonl"
    generated = _run(
        [str(EXAMPLE / "generate.py"), "--events", str(EVENTS), "--out", str(clicks)], directory
    )
    assert generated.returncode == 0, generated.stderr
    assert f"wrote {EVENTS:,} clicks" in generated.stdout
    output = directory / "tmp" / "out" / "product-views.jsonl"
    data_dir = directory / "tmp" / ".hw"
    result = _run(
        [
            "-m",
            "pipelines.cli",
            "run",
            str(EXAMPLE / "pipeline.py"),
            "--workers",
            "2",
            "--data-dir",
            str(data_dir),
        ],
        directory,
        env={"CLICKS_INPUT": str(clicks), "CLICKS_OUTPUT": str(output)},
    )
    return ExampleRun(directory, clicks, output, data_dir, result, reference(clicks))


@dataclass
class Contents:
    """What a topic holds: its data records, and apart from them its watermark markers."""

    records: list[Record]
    markers: list[tuple[int, str, int]]
    """The (partition, writer, mark) of each marker, partition by partition."""


def _read_topic(data_dir: Path, name: str) -> Contents:
    async def read() -> Contents:
        log = EmbeddedLog(data_dir)
        try:
            spec = (await log.describe_topics())[name]
            found = Contents([], [])
            for partition in range(spec.partitions):
                fetched = await log.read(TopicPartition(name, partition), 0, 1 << 30)
                data, markers = split_markers(fetched)
                found.markers += [(partition, writer, mark) for writer, mark in markers]
                raw = data.records
                found.records += [
                    Record(
                        key=raw.keys[i],
                        value=raw.values[i],
                        timestamp=from_millis(raw.timestamps[i]),
                        headers=raw.header_at(i),
                        topic=name,
                        partition=partition,
                        offset=data.offsets[i],
                    )
                    for i in range(len(raw))
                ]
            return found
        finally:
            await log.close()

    return asyncio.run(read())


# -- tests -----------------------------------------------------------------------------------


def test_the_generator_is_deterministic_and_has_both_kinds_of_bad_line(
    example_run: ExampleRun,
) -> None:
    ref = example_run.ref
    assert len(ref.lines) == EVENTS
    malformed = [line for line in ref.bad if not _is_json(line)]
    without_user = [line for line in ref.bad if _is_json(line)]
    assert malformed and without_user
    assert all("user" not in orjson.loads(line) for line in without_user)
    again = _run(
        [str(EXAMPLE / "generate.py"), "--events", str(EVENTS), "--out", "again.jsonl"],
        example_run.directory,
    )
    assert again.returncode == 0, again.stderr
    assert (example_run.directory / "again.jsonl").read_bytes() == example_run.clicks.read_bytes()


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


@pytest.mark.slow
def test_headwater_run_writes_exactly_the_reference(example_run: ExampleRun) -> None:
    result, ref = example_run.result, example_run.ref
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    views = Counter(
        as_view(orjson.loads(line)) for line in example_run.output.read_bytes().splitlines()
    )
    assert views == ref.views
    # the summary adds up
    valid = EVENTS - sum(ref.bad.values())
    product = sum(ref.views.values())
    assert f"source clicks: {EVENTS:,} records written" in result.stderr
    assert f"clicks: {EVENTS:,} in, {valid:,} out, {sum(ref.bad.values()):,} to dead letters" in (
        result.stderr
    )
    assert f"product-pages: {valid:,} in, {product:,} out" in result.stderr
    assert "lag: 0 records" in result.stderr


@pytest.mark.slow
def test_every_view_of_a_user_went_through_one_partition(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    # the repartition topic holds the views, and between them the markers of the tasks that
    # write it (not views: no step or sink sees them)
    records = _read_topic(example_run.data_dir, "clickstream.by-user").records
    assert len(records) == sum(example_run.ref.views.values())
    for record in records:
        value = orjson.loads(record.value)
        assert record.key == value["user"].encode()
        assert record.partition == partition_for(record.key, 6)
    clicks = _read_topic(example_run.data_dir, "clicks")
    assert Counter(r.value for r in clicks.records) == Counter(example_run.ref.lines)
    # ... and the source, at the end of its input, marked each partition of its topic once
    assert clicks.markers == [(p, "clicks", END_OF_TIME) for p in range(6)]


@pytest.mark.slow
def test_dead_letters_hold_exactly_the_bad_lines(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    dead_letters = _read_topic(example_run.data_dir, "clickstream.dead-letters")
    assert not dead_letters.markers
    dead = dead_letters.records
    assert Counter(r.value for r in dead) == example_run.ref.bad
    clicks = {
        (r.partition, r.offset): r.value
        for r in _read_topic(example_run.data_dir, "clicks").records
    }
    for record in dead:
        headers = {name: value.decode() for name, value in record.headers}
        assert headers["headwater.step"] == "clicks"
        assert headers["headwater.error.type"] == "ValidationError"
        if _is_json(record.value):
            assert "user" in headers["headwater.error"]
            assert "Field required" in headers["headwater.error"]
        else:
            assert "Invalid JSON" in headers["headwater.error"]
        assert "Click" in headers["headwater.error"]
        # the headers point at the original record on the input topic
        assert headers["headwater.source.topic"] == "clicks"
        where = (
            int(headers["headwater.source.partition"]),
            int(headers["headwater.source.offset"]),
        )
        assert clicks[where] == record.value


@pytest.mark.slow
def test_report_prints_the_top_pairs(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    report = _run([str(EXAMPLE / "report.py"), str(example_run.output)], example_run.directory)
    assert report.returncode == 0, report.stderr
    pairs = Counter((user, page) for user, page, _ in example_run.ref.views.elements())
    users = {user for user, _ in pairs}
    lines = report.stdout.splitlines()
    assert lines[0] == f"{sum(pairs.values()):,} product views by {len(users):,} users"
    assert lines[1].split() == ["user", "page", "views"]
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    printed = [tuple(line.split()) for line in lines[2:]]
    assert printed == [(user, page, str(count)) for (user, page), count in top]


def test_report_without_output_says_what_to_do(tmp_path: Path) -> None:
    report = _run([str(EXAMPLE / "report.py"), str(tmp_path / "nothing.jsonl")], tmp_path)
    assert report.returncode == 1
    assert "run `headwater run examples/clickstream/pipeline.py` first" in report.stderr
    assert "Traceback" not in report.stderr


# -- in memory -------------------------------------------------------------------------------


def _import_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    # the module's default paths must not matter: every source and sink is replaced
    monkeypatch.setenv("CLICKS_INPUT", str(tmp_path / "never-read.jsonl"))
    monkeypatch.setenv("CLICKS_OUTPUT", str(tmp_path / "never-written.jsonl"))
    spec = importlib.util.spec_from_file_location("clickstream_example", EXAMPLE / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # pydantic resolves annotations there
    spec.loader.exec_module(module)
    return module


def test_in_memory_run_gives_the_same_result(
    example_run: ExampleRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    example = _import_example(monkeypatch, tmp_path)
    ref = example_run.ref
    result = run_pipeline(example.pipeline, inputs={"clicks": ref.lines})
    sinks = [s.step_id for s in example.pipeline.steps if s.kind == "sink"]
    assert len(sinks) == 1
    views = Counter(as_view(value) for value in result.values(sinks[0]))
    assert views == ref.views
    assert Counter(r.value for r in result.dead_letters) == ref.bad
    for record in result.dead_letters:
        assert dict(record.headers)["headwater.step"] == b"clicks"
    assert not (tmp_path / "never-written.jsonl").exists()


def test_in_memory_run_with_two_workers_and_a_few_clicks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    example = _import_example(monkeypatch, tmp_path)
    lines = [
        b'{"user": "ann", "url": "/p/1", "ts": "2026-01-01T00:00:00+00:00", "session": "s-1"}',
        b'{"user": "bob", "url": "/cart", "ts": "2026-01-01T00:00:01+00:00", "session": "s-2"}',
        b'{"user": "ann", "url": "/p/2", "ts": "2026-01-01T00:00:02.500000+00:00", "session": "s"}',
        b'{"url": "/p/3", "ts": "2026-01-01T00:00:03+00:00", "session": "s-3"}',
        b'{"user": "cy", "url": "/p/4", "ts": "2026-01-01T00:00:04Z", "sess',
    ]
    result = run_pipeline(example.pipeline, inputs={"clicks": lines}, workers=2)
    sink = next(s.step_id for s in example.pipeline.steps if s.kind == "sink")
    assert sorted(as_view(v) for v in result.values(sink)) == [
        ("ann", "/p/1", "2026-01-01T00:00:00+00:00"),
        ("ann", "/p/2", "2026-01-01T00:00:02.500000+00:00"),
    ]
    assert sorted(r.value for r in result.dead_letters) == sorted([lines[3], lines[4]])
    # the views were re-keyed by user
    assert {r.key for r in result.records(sink)} == {"ann"}
