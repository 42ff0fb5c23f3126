"""Standby replicas under ``kill -9``: a worker of a keyed running count with
``standby_replicas=1`` is killed mid-stream under exactly-once, the survivor takes its tasks
over from its warm standbys, and every key's counts on the output are exactly 1, 2, ..., N.

The pipeline (:data:`JOB`) counts paced, numbered events per key (an async generator in the
runner: a batch of 500 every 0.2 s, ~16 s in all) over 4 partitions, with 2 workers under
``headwater run``. The test waits until each worker says it keeps a warm standby of a task of
the other and a quarter of the events are counted (committed), kills one with SIGKILL, and lets
the run end (the runner starts a worker in its place). The survivor must say it took a task
over from its standby after the kill, with nothing restored from the local copy or the
changelog: without standbys the test fails.
"""

from __future__ import annotations

import os
import re
import signal
import textwrap
from collections import defaultdict
from pathlib import Path

import orjson
from support.cli import Sessions, tail, wait_until
from support.logs import EmbeddedView, read_topic
from support.processes import worker_pids

EVENTS = 40_000
KEYS = 50

JOB = '''
"""Paced, numbered events counted per key, exactly-once, with standby replicas."""

import asyncio

from connectors.memory import Iterable
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic


async def events():
    for n in range({events}):
        yield {{"n": n, "key": f"k{{n * 7919 % {keys}:02d}}"}}
        if n % 500 == 499:
            await asyncio.sleep(0.2)


pipeline = (
    Pipeline("standby", processing_guarantee="exactly_once", standby_replicas=1)
    .source(
        Iterable(events, batch_size=500, key=lambda e: e["key"]),
        into=Topic("events", partitions=4),
    )
    .count("count")
    .sink(LogTopic(Topic("counts", partitions=4)))
)
'''
WARM = re.compile(r"worker (\d+) keeps a warm standby of task \d+\.\d+")
TAKEOVER = re.compile(
    r"worker (\d+) took over task \d+\.\d+ from its standby in [\d,]+ ms: [\d,]+ changelog "
    r"records read at the takeover, ([\d,]+) restored from the local copy and changelog"
)
KILLED = re.compile(r"worker (\d+) was killed by signal 9")


def counts_of_the_input() -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for n in range(EVENTS):
        counts[f"k{n * 7919 % KEYS:02d}"] += 1
    return counts


def test_a_killed_workers_tasks_resume_from_standbys_exactly_once(
    tmp_path: Path, sessions: Sessions
) -> None:
    module = tmp_path / "job.py"
    module.write_text(textwrap.dedent(JOB).format(events=EVENTS, keys=KEYS))
    run = sessions.start(["run", module, "--workers", "2"], cwd=tmp_path, name="run")
    view = EmbeddedView(tmp_path / ".headwater")
    wait_until(
        lambda: (
            {m.group(1) for m in WARM.finditer(run.stderr())} >= {"0", "1"}
            and view.count("counts", 4) >= EVENTS // 4
        ),
        timeout=120,
        what="each worker keeps a warm standby, and a quarter of the events counted",
        watch=[run],
    )
    before_kill = len(run.stderr())
    os.kill(worker_pids(run.pid)[0], signal.SIGKILL)
    assert run.wait() == 0, tail(run.stderr())

    after = run.stderr()[before_kill:]
    killed = KILLED.search(after)
    assert killed is not None, tail(run.stderr())
    takeovers = [m for m in TAKEOVER.finditer(after) if m.group(1) != killed.group(1)]
    assert takeovers, f"no task was taken over from a standby:\n{tail(run.stderr())}"
    assert all(m.group(2) == "0" for m in takeovers), tail(run.stderr())

    counts: dict[str, list[int]] = defaultdict(list)
    for key, value in read_topic(tmp_path / ".headwater", "counts").records:
        assert key is not None and value is not None
        counts[key.decode()].append(orjson.loads(value))
    expected = counts_of_the_input()
    assert sorted(counts) == sorted(expected)
    for key, seen in counts.items():
        assert seen == list(range(1, expected[key] + 1)), f"key {key}: {seen[:20]}..."
