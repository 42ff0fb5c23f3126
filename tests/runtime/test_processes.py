"""``headwater run`` with real worker processes on the embedded log: ``kill -9`` of a worker,
SIGTERM / Ctrl-C of the runner, resuming a stopped run, and running a finished one again.

Each test writes a pipeline module into its temporary directory, starts the runner as a
subprocess (``python -m pipelines.cli run``) in a new session, and checks what ends up on the
log record by record against a reference computed here in plain Python.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import textwrap
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.cli import Cli, background, wait_until
from support.logs import read_topic
from support.processes import alive, worker_pids

from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition
from pipelines.runtime.watermarks import END_OF_TIME

N = 100_000
"""Input records."""

INPUT_TOPIC = "numbers"
OUTPUT_TOPIC = "out"

FAST_UNTIL = 80_000
"""The source emits this many records at full speed; after them it may trickle (see below)."""

# The pipeline under test. The map sleeps WORK_PAUSE seconds on every 25th record it maps, to
# keep the workers busy long enough to be killed or stopped mid-stream. When the runner's
# environment sets NUMBERS_TRICKLE, the source sleeps that long every 1,000 records after the
# first FAST_UNTIL: the input is then still being read when the test stops the run.
PIPELINE_MODULE = """
import asyncio
import os
import time

from connectors.memory import Iterable
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

N = {n}
FAST_UNTIL = {fast_until}
TRICKLE = float(os.environ.get("NUMBERS_TRICKLE", "0"))
WORK_PAUSE = {work_pause}


async def numbers():
    for n in range(N):
        if n >= FAST_UNTIL and n % 1000 == 0 and TRICKLE:
            await asyncio.sleep(TRICKLE)
        yield {{"n": n, "tag": "abcdefg"[: n % 8]}}


def keep(value):
    return value["n"] % 3 != 0


def square(value):
    if value["n"] % 25 == 1:
        time.sleep(WORK_PAUSE)
    return {{"n": value["n"], "square": value["n"] * value["n"], "tag": value["tag"]}}


pipeline = (
    Pipeline("numbers")
    .source(
        Iterable(numbers, batch_size=1000, key=lambda value: str(value["n"])),
        into=Topic("{input_topic}", partitions=6),
    )
    .filter("keep", keep)
    .map("square", square)
    .sink(LogTopic(Topic("{output_topic}", partitions=3)))
)
"""


@functools.cache
def expected_input() -> Counter[bytes]:
    """The input topic's values: each input record once."""
    return Counter(orjson.dumps({"n": n, "tag": "abcdefg"[: n % 8]}) for n in range(N))


@functools.cache
def expected_output() -> Counter[bytes]:
    """Every output value the pipeline must produce (each exactly once on a clean run)."""
    return Counter(
        orjson.dumps({"n": n, "square": n * n, "tag": "abcdefg"[: n % 8]})
        for n in range(N)
        if n % 3 != 0
    )


def write_numbers_module(directory: Path, *, work_pause: float) -> Path:
    path = directory / "numbers_pipeline.py"
    path.write_text(
        textwrap.dedent(
            PIPELINE_MODULE.format(
                n=N,
                fast_until=FAST_UNTIL,
                work_pause=work_pause,
                input_topic=INPUT_TOPIC,
                output_topic=OUTPUT_TOPIC,
            )
        )
    )
    return path


# -- reading the log -------------------------------------------------------------------------


async def _count(data_dir: Path, name: str) -> int:
    log = EmbeddedLog(data_dir)
    try:
        specs = await log.describe_topics()
        if name not in specs:
            return 0
        tps = [TopicPartition(name, p) for p in range(specs[name].partitions)]
        return sum((await log.end_offsets(tps)).values())
    finally:
        await log.close()


def count_records(data_dir: Path, name: str) -> int:
    """Records on topic ``name`` now (0 while it does not exist yet)."""
    return asyncio.run(_count(data_dir, name))


async def _lag(data_dir: Path, name: str, group: str) -> int:
    log = EmbeddedLog(data_dir)
    try:
        spec = (await log.describe_topics())[name]
        tps = [TopicPartition(name, p) for p in range(spec.partitions)]
        ends = await log.end_offsets(tps)
        committed = await log.committed_offsets(group, tps)
        return sum(ends[tp] - committed.get(tp, 0) for tp in tps)
    finally:
        await log.close()


def input_lag(data_dir: Path) -> int:
    """Records of the input topic the pipeline's group has not committed."""
    return asyncio.run(_lag(data_dir, INPUT_TOPIC, "numbers"))


def check_output(data_dir: Path, *, exactly_once: bool) -> Counter[bytes]:
    """Every expected output is on the output topic, and nothing else; returns what is."""
    expected = expected_output()
    output = read_topic(data_dir, OUTPUT_TOPIC)
    # only the tasks that write a key_by topic write markers, and only there
    assert not any(output.markers.values()), f"markers on the sink's topic: {output.markers}"
    found = Counter(value for _, value in output.records)
    unexpected = found.keys() - expected.keys()
    missing = expected.keys() - found.keys()
    assert not unexpected, f"{len(unexpected)} unexpected outputs, e.g. {sorted(unexpected)[:3]}"
    assert not missing, f"{len(missing)} outputs lost, e.g. {sorted(missing)[:3]}"
    if exactly_once:
        duplicated = {v: c for v, c in found.items() if c > 1}
        assert not duplicated, (
            f"{len(duplicated)} outputs written more than once after a clean stop and restart, "
            f"e.g. {sorted(duplicated)[:3]}"
        )
    return found


def check_input(data_dir: Path) -> None:
    """The input topic holds each input record exactly once, and after them, in each partition,
    the one end-of-time marker of the source that wrote them and reached the end of its input."""
    contents = read_topic(data_dir, INPUT_TOPIC)
    last = {p: [(end - 1, INPUT_TOPIC, END_OF_TIME)] for p, end in contents.ends.items()}
    assert contents.markers == last
    records = contents.records
    assert len(records) == N
    assert Counter(value for _, value in records) == expected_input()
    keys = {key for key, _ in records}
    assert keys == {str(n).encode() for n in range(N)}


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_of_a_worker_loses_nothing(tmp_path: Path) -> None:
    """At-least-once: a worker killed mid-stream costs duplicates at most, never a record."""
    module = write_numbers_module(tmp_path, work_pause=0.003)
    data_dir = tmp_path / "log"
    total = sum(expected_output().values())
    with background(
        ["run", module, "--workers", "3", "--data-dir", data_dir], cwd=module.parent, name="run"
    ) as runner:
        wait_until(
            lambda: len(worker_pids(runner.pid)) == 3, timeout=20, what="3 workers", watch=[runner]
        )
        wait_until(
            lambda: count_records(data_dir, OUTPUT_TOPIC) >= total // 10,
            timeout=30,
            what="some output",
            watch=[runner],
        )
        victims = worker_pids(runner.pid)
        os.kill(victims[0], signal.SIGKILL)
        written_at_kill = count_records(data_dir, OUTPUT_TOPIC)
        assert written_at_kill < total * 0.7, "the run was almost over: make the workers slower"
        wait_until(
            lambda: victims[0] not in worker_pids(runner.pid),
            timeout=10,
            what="the killed worker to go",
            watch=[runner],
        )
        assert worker_pids(runner.pid) == victims[1:]
        code = runner.wait()
    stderr = runner.stderr()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "killed by signal 9" in stderr
    assert "its partitions move to the other workers" in stderr
    assert "lag: 0 records" in stderr
    assert input_lag(data_dir) == 0
    check_input(data_dir)
    found = check_output(data_dir, exactly_once=False)
    assert sum(found.values()) >= total


def _interrupt(runner: Cli, signum: int) -> None:
    if signum == signal.SIGINT:
        os.killpg(runner.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    else:
        os.kill(runner.pid, signum)  # e.g. a service manager stopping the runner


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_mid_stream_then_resume(tmp_path: Path, signum: int) -> None:
    """A stopped run stops cleanly and soon; the same command then resumes where it stopped,
    without re-emitting input."""
    module = write_numbers_module(tmp_path, work_pause=0.003)
    data_dir = tmp_path / "log"

    # First run: the input trickles after FAST_UNTIL records, and the workers are far behind.
    trickle = {"NUMBERS_TRICKLE": "0.25"}
    with background(
        ["run", module, "--workers", "3", "--data-dir", data_dir],
        cwd=module.parent,
        name="first",
        env=trickle,
    ) as runner:
        wait_until(
            lambda: len(worker_pids(runner.pid)) == 3, timeout=20, what="3 workers", watch=[runner]
        )
        wait_until(
            lambda: (
                count_records(data_dir, INPUT_TOPIC) > FAST_UNTIL
                and count_records(data_dir, OUTPUT_TOPIC) > 0
            ),
            timeout=30,
            what="the run to get going",
            watch=[runner],
        )
        backlog = input_lag(data_dir)
        assert backlog > N // 4, "the workers are not behind: make them slower"
        workers = worker_pids(runner.pid)
        _interrupt(runner, signum)
        stopped_at = time.monotonic()
        code = runner.wait(timeout=40)
        stop_seconds = time.monotonic() - stopped_at
        assert not [pid for pid in workers if alive(pid)], "workers outlived the runner"
    stderr = runner.stderr()
    # Documented (runner module): on Ctrl-C/SIGTERM the runner stops the workers cleanly, each
    # finishes its batch, commits and leaves; the runner then exits normally after its summary.
    assert code in (0, 130, 143), stderr
    assert "Traceback" not in stderr, stderr
    assert "stopping: the workers finish their batch, commit and leave" in stderr
    assert "did not stop in time" not in stderr
    first = read_topic(data_dir, INPUT_TOPIC)
    # stopped, the source had not reached the end of its input: no end-of-time marker yet
    assert not any(first.markers.values()), first.markers
    first_input = len(first.records)
    assert FAST_UNTIL < first_input < N, "the source was not stopped mid-stream"
    # Each worker finishes the batch in hand (at most MAX_BATCH records), not its whole backlog.
    left = input_lag(data_dir)
    assert left > 0, (
        f"the workers processed their whole backlog of {backlog:,} records before stopping "
        f"({stop_seconds:.1f}s) instead of stopping after the batch in hand"
    )
    assert stop_seconds < 5.0

    with background(
        ["run", module, "--workers", "3", "--data-dir", data_dir], cwd=module.parent, name="second"
    ) as runner:
        code = runner.wait()
    stderr = runner.stderr()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    # The source resumes from its stored position: it writes only what it had not written.
    assert f"source {INPUT_TOPIC}: {N - first_input:,} records written" in stderr
    assert "lag: 0 records" in stderr
    assert input_lag(data_dir) == 0
    check_input(data_dir)
    # Nothing crashed: every stop checkpointed, so each record was processed exactly once.
    check_output(data_dir, exactly_once=True)


WINDOWED_MODULE = """
import connectors
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

EVENTS = [{"user": f"u{i % 3}", "ts": 1_700_000_000_000 + i * 7_000} for i in range(60)]

pipeline = (
    Pipeline("counts")
    .source(connectors.Iterable(EVENTS), into=Topic("events", partitions=2))
    .key_by("by-user", lambda e: e["user"])
    .window("minute", Tumbling(minutes=1), time=lambda e: e["ts"])
    .count("count")
    .sink(connectors.LogTopic(Topic("counts", partitions=1)))
)
"""


def test_a_finished_run_run_again_writes_no_markers_again(tmp_path: Path) -> None:
    """The tasks of a second run restore the mark of the markers the first run wrote with its
    marks: with nothing new to read they write no markers on the key_by topic (downstream tasks
    already have that mark; markers written again would be read by nobody once the run ends)."""
    module = tmp_path / "counts.py"
    module.write_text(textwrap.dedent(WINDOWED_MODULE))
    data_dir = tmp_path / "log"
    with background(
        ["run", module, "--workers", "2", "--data-dir", data_dir], cwd=module.parent, name="first"
    ) as runner:
        assert runner.wait() == 0, runner.stderr()
    first = read_topic(data_dir, "counts.by-user")
    # each of the 2 tasks that write the topic ended with an end-of-time marker on every
    # partition of it: the windows downstream closed on them
    assert len(first.markers) == 2
    assert all(
        len({w for _, w, m in found if m == END_OF_TIME}) == 2 for found in first.markers.values()
    ), first.markers
    assert len(first.records) == 60

    with background(
        ["run", module, "--workers", "2", "--data-dir", data_dir], cwd=module.parent, name="second"
    ) as runner:
        assert runner.wait() == 0, runner.stderr()
    stderr = runner.stderr()
    assert "source events: nothing new since the last run" in stderr, stderr
    assert "lag: 0 records" in stderr, stderr
    again = read_topic(data_dir, "counts.by-user")
    assert again.markers == first.markers, (
        "the second run wrote markers again for a mark the first run's markers carried: "
        f"{again.markers} after it, {first.markers} before"
    )
    assert again.ends == first.ends


KEYED_WINDOWED_MODULE = """
from pathlib import Path

import orjson

import connectors
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

EVENTS = orjson.loads((Path(__file__).parent / "events.json").read_bytes())

pipeline = (
    Pipeline("minutes")
    .source(
        connectors.Iterable(EVENTS, key=lambda e: e["user"]), into=Topic("events", partitions=2)
    )
    .window("minute", Tumbling(minutes=1), time=lambda e: e["ts"])
    .count("count")
    .sink(connectors.JsonLinesSink(Path(__file__).parent / "counts.jsonl"), step_id="out")
)
"""


REKEYED_WINDOWED_MODULE = KEYED_WINDOWED_MODULE.replace(
    """connectors.Iterable(EVENTS, key=lambda e: e["user"]), into=Topic("events", partitions=2)
    )""",
    """connectors.Iterable(EVENTS), into=Topic("events", partitions=2)
    )
    .key_by("by-user", lambda e: e["user"])""",
)
"""The same, keyed by a ``key_by``: the window reads the repartition topic, whose markers the
upstream tasks write."""


def minute_counts(events: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    """(user, window start) -> events in that minute: the reference, from the input alone."""
    return Counter((e["user"], e["ts"] // 60_000 * 60_000) for e in events)


@pytest.mark.parametrize("keyed_by", ["source", "key_by"])
def test_a_finished_run_given_newer_input_carries_on(tmp_path: Path, keyed_by: str) -> None:
    """The end of the input closes every window without becoming the window step's
    watermark: a later run whose source goes on with newer input counts it, none late. Behind
    a ``key_by`` the upstream tasks tell the window's that their end is undone (a marker of
    their mark going back), and the end comes again after the new records."""
    base = 1_700_000_040_000  # a minute boundary
    first = [{"user": f"u{i % 3}", "ts": base + i * 7_000} for i in range(30)]
    later = [{"user": f"u{i % 3}", "ts": base + 600_000 + i * 7_000} for i in range(30)]
    (tmp_path / "events.json").write_bytes(orjson.dumps(first))
    module = tmp_path / "minutes.py"
    module.write_text(
        textwrap.dedent(KEYED_WINDOWED_MODULE if keyed_by == "source" else REKEYED_WINDOWED_MODULE)
    )
    data_dir = tmp_path / "log"

    def counted() -> Counter[tuple[str, int]]:
        found: Counter[tuple[str, int]] = Counter()
        for line in (tmp_path / "counts.jsonl").read_bytes().splitlines():
            result = orjson.loads(line)
            start = datetime.fromisoformat(result["start"]).timestamp()
            found[(result["key"], round(start * 1000))] += result["value"]
        return found

    with background(
        ["run", module, "--workers", "2", "--data-dir", data_dir], cwd=module.parent, name="first"
    ) as runner:
        assert runner.wait() == 0, runner.stderr()
    assert counted() == minute_counts(first)

    (tmp_path / "events.json").write_bytes(orjson.dumps(first + later))
    with background(
        ["run", module, "--workers", "2", "--data-dir", data_dir], cwd=module.parent, name="second"
    ) as runner:
        assert runner.wait() == 0, runner.stderr()
    stderr = runner.stderr()
    assert f"source events: {len(later)} records written" in stderr, stderr
    late = read_topic(data_dir, "minutes.count.late")
    assert late.records == [], f"{len(late.records)} records of the later run went late"
    assert counted() == minute_counts(first + later), stderr
