"""The clickstream example end to end: generate, ``headwater run`` with 2 worker processes,
report; README's first command in a fresh virtualenv; a second run; and the same pipeline in
memory through :mod:`pipelines.testing`.

Every expected value is computed here, in plain Python, from the generated input alone: the
views of each product page in each minute (valid clicks, floor of ``ts`` to the minute). A
click more than the window's lateness behind a click before it in the input *may* be late: the
pipeline finds it late only if the watermark had passed its window when it arrived, which
depends on how far the workers had got. So every page-minute count must lie between the
reference without those clicks and the reference with them, and every valid product view is
either counted or on the late-data topic.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition
from pipelines.partitioner import partition_for
from pipelines.record import Record, from_millis
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watermarks import END_OF_TIME, split_markers
from pipelines.testing import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "clickstream"
MODULE = str(EXAMPLE / "pipeline.py")
README = ROOT / "README.md"
EVENTS = 100_000
LATENESS = timedelta(seconds=10)
"""The ``lateness`` of the example's window."""
DISORDER = timedelta(seconds=8)
"""How far out of order the generator puts the clicks that are not very late."""
VERY_LATE = 10
TOP = 5
"""Rows of each table of the report."""
TIMEOUT = 120.0

PageMinute = tuple[str, str]
"""A product page and the ISO-8601 start of a minute, as the example writes them."""


# -- the reference ---------------------------------------------------------------------------


def _click(line: bytes) -> dict[str, Any] | None:
    """The click a line holds (``ts`` parsed), or None if it is not JSON or not a click."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    fields = ("user", "url", "ts", "session")
    if not isinstance(value, dict) or not all(isinstance(value.get(f), str) for f in fields):
        return None
    try:
        value["ts"] = datetime.fromisoformat(value["ts"])
    except ValueError:
        return None
    return value


def _minute(ts: datetime) -> str:
    return ts.replace(second=0, microsecond=0).isoformat()


@dataclass
class ClickstreamReference:
    """What the pipeline must produce from ``lines``, computed without Headwater."""

    lines: list[bytes]
    bad: Counter[bytes]
    """The lines that are not JSON, or not a click (a field missing or of the wrong type)."""
    views: Counter[PageMinute]
    """Every valid product-page view, per page and minute."""
    beyond: Counter[PageMinute]
    """The views more than the lateness behind a product view before them in the input."""
    beyond_lines: Counter[bytes]

    @property
    def certain(self) -> Counter[PageMinute]:
        """The views the pipeline must count whatever its timing."""
        return self.views - self.beyond

    def check_counts(self, counted: Counter[PageMinute], late: int) -> None:
        """Each page-minute's count within its bounds, and every view counted or late."""
        for key in self.views.keys() | counted.keys():
            assert self.certain[key] <= counted[key] <= self.views[key], key
        assert counted.total() + late == self.views.total()


def clickstream_reference(path: Path) -> ClickstreamReference:
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    ref = ClickstreamReference(lines, Counter(), Counter(), Counter(), Counter())
    newest: datetime | None = None
    for line in lines:
        click = _click(line)
        if click is None:
            ref.bad[line] += 1
            continue
        if not click["url"].startswith("/p/"):
            continue
        ts = click["ts"]
        key = (click["url"], _minute(ts))
        ref.views[key] += 1
        if newest is not None and ts < newest - LATENESS:
            ref.beyond[key] += 1
            ref.beyond_lines[line] += 1
        newest = ts if newest is None else max(newest, ts)
    return ref


def busiest_minutes(views: Counter[PageMinute]) -> list[tuple[str, str, int]]:
    """(minute, page, views): each page's busiest minute (its earliest on a tie), the busiest
    first, ties by page."""
    best: dict[str, tuple[str, str, int]] = {}
    for (page, minute), count in sorted(views.items(), key=lambda kv: (-kv[1], kv[0][1])):
        best.setdefault(page, (minute, page, count))
    return sorted(best.values(), key=lambda row: (-row[2], row[1]))[:TOP]


def top_totals(views: Counter[PageMinute]) -> list[tuple[str, int, str]]:
    """(page, views, last minute): the pages with the most views."""
    totals: Counter[str] = Counter()
    last: dict[str, str] = {}
    for (page, minute), count in views.items():
        totals[page] += count
        last[page] = max(last.get(page, minute), minute)
    return [
        (page, count, last[page])
        for page, count in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    ]


# -- what the example wrote ------------------------------------------------------------------


def sink_rows(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def page_minute_counts(rows: list[dict[str, Any]]) -> Counter[PageMinute]:
    """The page-minute counts of the minutes file (each page-minute once: checked)."""
    found = Counter({(r["page"], r["minute"]): r["views"] for r in rows})
    assert len(found) == len(rows), "a window was emitted more than once"
    return found


@dataclass
class PrintedReport:
    """What ``report.py`` printed, parsed."""

    lines: list[str]
    views: int
    page_minutes: int
    busiest: list[tuple[str, str, int]]
    totals: list[tuple[str, int, str]]
    dead_letters: int
    late: int


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _iso(printed: str) -> str:
    """A minute as the report prints it (``2026-01-01 00:07``) in ISO-8601, as in the files."""
    return datetime.fromisoformat(printed + "+00:00").isoformat()


def _rows_after(lines: list[str], title: str) -> list[list[str]]:
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    return [line.split() for line in lines[start + 2 : start + 2 + TOP]]


def parse_report(stdout: str) -> PrintedReport:
    lines = stdout.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if "page-minutes" in line) :]
    head = re.fullmatch(r"(\S+) product-page views counted in (\S+) page-minutes", lines[0])
    assert head, lines[0]
    busiest = [(_iso(f"{d} {t}"), p, _number(v)) for d, t, p, v in _rows_after(lines, "Each")]
    totals = [(p, _number(v), _iso(f"{d} {t}")) for p, v, d, t in _rows_after(lines, "Top")]
    dead = re.search(r"^(\S+) bad lines are on the dead-letter topic", stdout, re.MULTILINE)
    late = re.search(r"^(\S+) clicks came after their minute had closed", stdout, re.MULTILINE)
    assert dead and late, stdout
    return PrintedReport(
        lines,
        _number(head[1]),
        _number(head[2]),
        busiest,
        totals,
        _number(dead[1]),
        _number(late[1]),
    )


def check_report(printed: PrintedReport, ref: ClickstreamReference) -> None:
    """The report's tables are the reference's (its rows are ones no late click can change:
    checked), and its counts within the reference's bounds."""
    assert busiest_minutes(ref.views) == busiest_minutes(ref.certain)
    assert top_totals(ref.views) == top_totals(ref.certain)
    assert printed.busiest == busiest_minutes(ref.views)
    assert printed.totals == top_totals(ref.views)
    assert printed.dead_letters == ref.bad.total()
    assert 0 <= printed.late <= ref.beyond.total()
    assert printed.views + printed.late == ref.views.total()
    assert len(+ref.certain) <= printed.page_minutes <= len(ref.views)


# -- running it ------------------------------------------------------------------------------


def _python(
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


@dataclass(frozen=True)
class Workspace:
    """A directory for the example: its input ``data/clicks.jsonl``, output ``out`` and log
    ``.hw`` (given to each command, relative to the directory)."""

    directory: Path

    @property
    def clicks(self) -> Path:
        return self.directory / "data" / "clicks.jsonl"

    @property
    def out(self) -> Path:
        return self.directory / "out"

    @property
    def data_dir(self) -> Path:
        return self.directory / ".hw"

    def generate(self) -> None:
        generated = _python(
            [str(EXAMPLE / "generate.py"), "--events", str(EVENTS), "--out", str(self.clicks)],
            self.directory,
        )
        assert generated.returncode == 0, generated.stderr
        assert f"wrote {EVENTS:,} clicks" in generated.stdout

    def headwater_run(self) -> subprocess.CompletedProcess[str]:
        """``headwater run`` of the example module with 2 workers, on this directory."""
        return _python(
            ["-m", "pipelines.cli", "run", MODULE, "--workers", "2", "--data-dir", ".hw"],
            self.directory,
            env={"CLICKS_INPUT": str(self.clicks), "CLICKS_OUTPUT": str(self.out)},
        )

    def report(self) -> subprocess.CompletedProcess[str]:
        return _python([str(EXAMPLE / "report.py"), "out", "--data-dir", ".hw"], self.directory)


@dataclass(frozen=True)
class ExampleRun(Workspace):
    """A workspace after one ``headwater run``: what it printed, and the reference."""

    result: subprocess.CompletedProcess[str]
    ref: ClickstreamReference


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    workspace = Workspace(tmp_path_factory.mktemp("clickstream"))
    workspace.generate()
    return ExampleRun(
        workspace.directory, workspace.headwater_run(), clickstream_reference(workspace.clicks)
    )


@dataclass
class TopicRecords:
    """What a topic holds: its data records, and apart from them its watermark markers."""

    records: list[Record]
    markers: list[tuple[int, str, int]]
    """The (partition, writer, mark) of each marker, partition by partition."""


def _read_records(data_dir: Path, name: str) -> TopicRecords:
    async def read() -> TopicRecords:
        log = EmbeddedLog(data_dir)
        try:
            spec = (await log.describe_topics())[name]
            found = TopicRecords([], [])
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


def _step_counts(stderr: str, step: str) -> tuple[int, int, int]:
    """(in, out, late) of ``step`` in the run's summary."""
    found = re.search(rf"^  {step}: (\S+) in, (\S+) out(?:, (\S+) late)?$", stderr, re.MULTILINE)
    assert found, stderr
    return _number(found[1]), _number(found[2]), _number(found[3] or "0")


def _load(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # pydantic resolves annotations there
    spec.loader.exec_module(module)
    return module


# -- the generator and the module's consistency ----------------------------------------------


def test_the_generator_is_deterministic_and_shaped_as_documented(tmp_path: Path) -> None:
    one, two = Workspace(tmp_path / "one"), Workspace(tmp_path / "two")
    for workspace in (one, two):
        workspace.directory.mkdir()
        workspace.generate()
    assert one.clicks.read_bytes() == two.clicks.read_bytes()
    ref = clickstream_reference(one.clicks)
    assert len(ref.lines) == EVENTS
    # both kinds of bad line
    malformed = [line for line in ref.bad if not _is_json(line)]
    without_user = [line for line in ref.bad if _is_json(line)]
    assert malformed and without_user
    assert all("user" not in orjson.loads(line) for line in without_user)
    # the very late clicks are an hour behind; every other click is within the disorder
    clicks = [c for c in map(_click, ref.lines) if c is not None]
    newest, behind = clicks[0]["ts"], []
    for click in clicks:
        behind.append(newest - click["ts"])
        newest = max(newest, click["ts"])
    far = [b for b in behind if b > LATENESS]
    assert len(far) == VERY_LATE and all(b >= timedelta(minutes=50) for b in far)
    assert max(b for b in behind if b <= LATENESS) <= DISORDER + timedelta(milliseconds=1)
    assert ref.beyond.total() == VERY_LATE
    # about 20 minutes of event time, and a few hot pages
    minutes = {minute for _, minute in ref.certain}
    assert 20 <= len(minutes) <= 22
    pages: Counter[str] = Counter()
    for (page, _), count in ref.views.items():
        pages[page] += count
    assert pages.most_common(1)[0][0] == "/p/1"
    assert pages["/p/1"] > 10 * pages["/p/50"]


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def test_the_readme_shows_the_example_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """README's pipeline block is the module's code, its environment overrides aside; and the
    report reads the topics the pipeline has."""
    block = re.search(r"## A pipeline\n.*?```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block
    module = (EXAMPLE / "pipeline.py").read_text()
    code = module[module.index("class Click") :]
    code = code.replace("JsonLines(CLICKS, ", 'JsonLines("data/clicks.jsonl", ')
    code = re.sub(r'OUT / "([a-z-]+\.jsonl)"', r'"out/\1"', code)
    shown = block[1]
    assert shown[shown.index("class Click") :] == code
    example = _load("clickstream_example", EXAMPLE / "pipeline.py", monkeypatch)
    report = _load("clickstream_report", EXAMPLE / "report.py", monkeypatch)
    topology = compile_pipeline(example.pipeline)
    assert [t.name for t in topology.late_topics.values()] == [report.LATE]
    assert example.pipeline.dead_letter_topic.name == report.DEAD_LETTERS


# -- headwater run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_headwater_run_counts_each_page_minute_once_within_the_bounds(
    example_run: ExampleRun,
) -> None:
    result, ref = example_run.result, example_run.ref
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    minutes = page_minute_counts(sink_rows(example_run.out / "page-minutes.jsonl"))
    _, windows, late = _step_counts(result.stderr, "views-per-minute")
    ref.check_counts(minutes, late)
    assert windows == len(minutes)
    assert late == len(
        _read_records(example_run.data_dir, "clickstream.views-per-minute.late").records
    )
    # the summary adds up
    valid = EVENTS - ref.bad.total()
    assert f"source clicks: {EVENTS:,} records written" in result.stderr
    assert f"clicks: {EVENTS:,} in, {valid:,} out, {ref.bad.total():,} to dead letters" in (
        result.stderr
    )
    assert f"product-pages: {valid:,} in, {ref.views.total():,} out" in result.stderr
    assert "lag: 0 records" in result.stderr


@pytest.mark.slow
def test_running_totals_add_up_each_pages_minutes(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    minutes = page_minute_counts(sink_rows(example_run.out / "page-minutes.jsonl"))
    totals = sink_rows(example_run.out / "page-totals.jsonl")
    assert page_minute_counts(totals).keys() == minutes.keys()
    so_far: Counter[str] = Counter()
    for page, minute in sorted(minutes):
        so_far[page] += minutes[(page, minute)]
    # ... and each page's totals come in the order of its minutes, each adding one
    seen: dict[str, tuple[str, int]] = {}
    for row in totals:
        before_minute, before = seen.get(row["page"], ("", 0))
        assert row["minute"] > before_minute
        assert row["views"] == before + minutes[(row["page"], row["minute"])]
        seen[row["page"]] = (row["minute"], row["views"])
    assert {page: views for page, (_, views) in seen.items()} == dict(so_far)


@pytest.mark.slow
def test_each_page_is_read_from_one_partition(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    clicks = _read_records(example_run.data_dir, "clicks")
    assert Counter(r.value for r in clicks.records) == Counter(example_run.ref.lines)
    for record in clicks.records:
        click = _click(record.value)
        if click is not None:
            assert record.key == click["url"].encode()
            assert record.partition == partition_for(record.key, 6)
    # ... and the source, at the end of its input, marked each partition of its topic once
    assert clicks.markers == [(p, "clicks", END_OF_TIME) for p in range(6)]


@pytest.mark.slow
def test_dead_letters_hold_exactly_the_bad_lines(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    dead_letters = _read_records(example_run.data_dir, "clickstream.dead-letters")
    assert not dead_letters.markers
    dead = dead_letters.records
    assert Counter(r.value for r in dead) == example_run.ref.bad
    clicks = {
        (r.partition, r.offset): r.value
        for r in _read_records(example_run.data_dir, "clicks").records
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
def test_the_late_topic_holds_only_clicks_beyond_the_bound(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    late = _read_records(example_run.data_dir, "clickstream.views-per-minute.late").records
    assert not Counter(r.value for r in late) - example_run.ref.beyond_lines
    for record in late:
        assert dict(record.headers)["headwater.late"] == b"views-per-minute"


@pytest.mark.slow
def test_report_prints_the_reference_tables(example_run: ExampleRun) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    report = example_run.report()
    assert report.returncode == 0, report.stderr
    printed = parse_report(report.stdout)
    check_report(printed, example_run.ref)
    _, _, late = _step_counts(example_run.result.stderr, "views-per-minute")
    assert printed.late == late
    assert "  headwater topics --data-dir .hw tail clickstream.dead-letters -n 5" in printed.lines
    assert (
        "  headwater topics --data-dir .hw tail clickstream.views-per-minute.late -n 5"
        in printed.lines
    )


def test_report_without_output_says_what_to_do(tmp_path: Path) -> None:
    report = _python([str(EXAMPLE / "report.py"), str(tmp_path / "nothing")], tmp_path)
    assert report.returncode == 1
    assert "run `python3 examples/clickstream/generate.py && headwater run " in report.stderr
    assert "Traceback" not in report.stderr


@pytest.mark.slow
def test_a_second_run_reads_nothing_new_and_says_so(
    example_run: ExampleRun, tmp_path: Path
) -> None:
    assert example_run.result.returncode == 0, example_run.result.stderr
    # in a copy of the first run's directory, so the other tests see the first run alone
    again = Workspace(tmp_path / "again")
    shutil.copytree(example_run.directory, again.directory)
    files = {name: (again.out / name).read_bytes() for name in os.listdir(again.out)}
    first_report = again.report()
    second = again.headwater_run()
    assert second.returncode == 0, second.stderr
    size = again.clicks.stat().st_size
    assert (
        f"source clicks: nothing new since the last run (resumed at byte {size:,}); "
        f"`headwater reset {MODULE} --data-dir .hw` starts afresh"
    ) in second.stderr
    assert "  clicks: 0 in, 0 out" in second.stderr
    assert {name: (again.out / name).read_bytes() for name in os.listdir(again.out)} == files
    second_report = again.report()
    assert second_report.returncode == 0, second_report.stderr
    assert second_report.stdout == first_report.stdout


# -- README's first command, as a newcomer runs it -------------------------------------------


def first_command() -> str:
    """The command of README's "Two commands" that installs, generates, runs and reports."""
    section = README.read_text().split("## Two commands\n", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL)
    assert command and "\n" not in command[1], "the first command is one line"
    return command[1]


def readme_sample() -> list[str]:
    """The report output README shows after the first command."""
    section = README.read_text().split("## Two commands\n", 1)[1]
    sample = re.search(r"```text\n(.*?)\n```", section, re.DOTALL)
    assert sample
    return sample[1].splitlines()


def _repo_copy(destination: Path) -> Path:
    ignored = shutil.ignore_patterns(
        ".git", ".headwater", "data", "out", "*.egg-info", "__pycache__", ".*_cache", ".venv"
    )
    shutil.copytree(ROOT, destination, ignore=ignored)
    return destination


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_first_command_works_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    command = first_command()
    assert command.startswith("python3 -m pip install -e . && ")
    repo = _repo_copy(tmp_path / "headwater")
    venv = tmp_path / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADWATER_", "PYTHON"))}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv)}
    ran = subprocess.run(
        ["bash", "-c", command],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "Traceback" not in ran.stderr
    assert "clickstream finished" in ran.stderr
    printed = parse_report(ran.stdout)
    check_report(printed, clickstream_reference(repo / "data" / "clicks.jsonl"))
    # ... as README shows it, but for the two lines the late clicks' timing could change
    timed = (0, next(i for i, line in enumerate(printed.lines) if "clicks came after" in line))
    sample = readme_sample()
    assert len(printed.lines) == len(sample)
    for index, (line, shown) in enumerate(zip(printed.lines, sample, strict=True)):
        if index not in timed:
            assert line == shown


# -- in memory -------------------------------------------------------------------------------


def _import_example(monkeypatch: pytest.MonkeyPatch, clicks: Path, out: Path) -> ModuleType:
    monkeypatch.setenv("CLICKS_INPUT", str(clicks))
    monkeypatch.setenv("CLICKS_OUTPUT", str(out))  # never written: every sink is replaced
    return _load("clickstream_example", EXAMPLE / "pipeline.py", monkeypatch)


def test_in_memory_run_gives_the_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    workspace.generate()
    ref = clickstream_reference(workspace.clicks)
    example = _import_example(monkeypatch, workspace.clicks, workspace.out)
    result = run_pipeline(example.pipeline, workers=2)
    minutes = page_minute_counts(result.values("page-minutes-file"))
    late = result.topic("clickstream.views-per-minute.late")
    ref.check_counts(minutes, len(late))
    assert not Counter(r.value for r in late) - ref.beyond_lines
    assert Counter(r.value for r in result.dead_letters) == ref.bad
    for record in result.dead_letters:
        assert dict(record.headers)["headwater.step"] == b"clicks"
    # every window result was keyed by its page
    assert all(r.key == r.value["page"] for r in result.records("page-minutes-file"))
    assert not (tmp_path / "out").exists()


def test_in_memory_run_of_a_few_clicks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lines = [
        b'{"user": "ann", "url": "/p/1", "ts": "2026-01-01T00:00:10+00:00", "session": "s-1"}',
        b'{"user": "bob", "url": "/cart", "ts": "2026-01-01T00:00:20+00:00", "session": "s-2"}',
        b'{"user": "ann", "url": "/p/2", "ts": "2026-01-01T00:00:30.500+00:00", "session": "s"}',
        b'{"user": "cy", "url": "/p/1", "ts": "2026-01-01T00:01:05Z", "session": "s-3"}',
        b'{"url": "/p/3", "ts": "2026-01-01T00:01:06+00:00", "session": "s-4"}',
        b'{"user": "dan", "url": "/p/1", "ts": "2026-01-01T00:00:58+00:00", "session": "s-5"}',
        b'{"user": "cy", "url": "/p/4", "ts": "2026-01-01T00:00:04Z", "sess',
    ]
    clicks = tmp_path / "clicks.jsonl"
    clicks.write_bytes(b"\n".join(lines) + b"\n")
    example = _import_example(monkeypatch, clicks, tmp_path / "out")
    result = run_pipeline(example.pipeline, workers=2)
    minute = "2026-01-01T00:0{}:00+00:00".format
    assert sorted(result.values("page-minutes-file"), key=lambda r: (r["page"], r["minute"])) == [
        {"page": "/p/1", "minute": minute(0), "views": 2},  # dan's, 7 s out of order, counts
        {"page": "/p/1", "minute": minute(1), "views": 1},
        {"page": "/p/2", "minute": minute(0), "views": 1},
    ]
    assert sorted(result.values("page-totals-file"), key=lambda r: (r["page"], r["minute"])) == [
        {"page": "/p/1", "minute": minute(0), "views": 2},
        {"page": "/p/1", "minute": minute(1), "views": 3},
        {"page": "/p/2", "minute": minute(0), "views": 1},
    ]
    assert sorted(r.value for r in result.dead_letters) == sorted([lines[4], lines[6]])
    assert not result.topic("clickstream.views-per-minute.late")
