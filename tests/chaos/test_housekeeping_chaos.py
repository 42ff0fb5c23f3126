"""Kill -9 of a whole run (runner and workers) while its housekeeping rolls, purges and compacts
the embedded log: nothing lost, nothing counted twice.

An exactly-once keyed count over 30,000 events runs with 4 KiB segments and a housekeeping
round every 20 ms, so segments of the repartition topic are being dropped and the count's
changelog compacted most of the time. Each kill comes the moment a compaction is seen in
flight (its temporary file exists); the test proves it caught some. After the kills a last run
finishes the input. Every user's counts on the output topic must then be exactly 1, 2, ..., N
(N from the input file alone): a record lost by a purge, or a restore from a changelog a
compaction broke, shows as a gap or a repeat.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from support.cli import Sessions, tail
from support.logs import EmbeddedView

from pipelines.log._partition_file import segment_paths

PIPELINE = """
import os

from connectors import JsonLines, LogTopic
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("kept", processing_guarantee="exactly_once")
    .source(
        JsonLines("events.jsonl", follow=os.environ["FOLLOW"] == "1", poll_interval=0.05),
        into=Topic("events", partitions=2),
    )
    .key_by("by-user", lambda e: e["user"])
    .count("count")
    .sink(LogTopic(Topic("counts", partitions=2)))
)
"""
EVENTS = 30_000
USERS = 300
KILLS = 5


def users() -> list[str]:
    return [f"u{(i * 7919) % USERS}" for i in range(EVENTS)]


def write_events(path: Path, given: list[str], seconds: float) -> None:
    """Append the events to ``path`` over about ``seconds``, in 100 batches."""
    step = len(given) // 100
    with path.open("ab") as file:
        for start in range(0, len(given), step):
            lines = given[start : start + step]
            file.write(
                b"".join(
                    orjson.dumps({"user": u, "i": start + i}) + b"\n" for i, u in enumerate(lines)
                )
            )
            file.flush()
            time.sleep(seconds / 100)


def compaction_in_flight(data_dir: Path) -> bool:
    """Whether a compaction's temporary file exists (it is renamed into place at the end)."""
    return any((data_dir / "topics").glob("*/*.compacting"))


def kill_during_a_compaction(sessions: Sessions, tmp_path: Path, name: str) -> bool:
    """Start a run; kill -9 its whole session the moment a compaction is in flight (or after
    5 s); whether one was."""
    run = sessions.start(["run", "kept.py", "--no-progress"], cwd=tmp_path, name=name)
    time.sleep(0.5)  # a moment to process something first
    deadline = time.monotonic() + 5
    caught = False
    while time.monotonic() < deadline and run.running():
        if compaction_in_flight(tmp_path / ".headwater"):
            caught = True
            break
        time.sleep(0.001)
    assert run.running(), f"the run ended before it was killed:\n{tail(run.stderr())}"
    os.killpg(run.pid, signal.SIGKILL)
    run.process.wait(timeout=10)
    return caught


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_while_housekeeping_purges_and_compacts(tmp_path: Path, sessions: Sessions) -> None:
    (tmp_path / "kept.py").write_text(PIPELINE)
    (tmp_path / "events.jsonl").touch()
    given = users()
    writer = threading.Thread(target=write_events, args=(tmp_path / "events.jsonl", given, 15))
    writer.start()
    sessions.env.update(
        {
            "HEADWATER_SEGMENT_BYTES": "4096",
            "HEADWATER_HOUSEKEEPING_SECONDS": "0.02",
            "FOLLOW": "1",
        }
    )
    try:
        caught = sum(kill_during_a_compaction(sessions, tmp_path, f"run-{k}") for k in range(KILLS))
    finally:
        writer.join()
    sessions.env["FOLLOW"] = "0"  # the last run ends once it has read the whole file
    last = sessions.start(["run", "kept.py", "--no-progress"], cwd=tmp_path, name="last")
    assert last.wait(180) == 0, tail(last.stderr())
    assert caught, "no kill came during a compaction"
    print(f"{caught} of {KILLS} kills came during a compaction")

    data_dir = tmp_path / ".headwater"
    for partition in range(2):
        first = data_dir / "topics" / "kept.by-user" / f"{partition}.log"
        assert segment_paths(first)[0][0] > 0, "the repartition topic was never purged"
    counts: dict[str, list[int]] = defaultdict(list)
    for entries in EmbeddedView(data_dir).records("counts", 2):
        for _, key, value in entries:
            assert key is not None and value is not None
            counts[key.decode()].append(orjson.loads(value))
    expected = Counter(given)
    wrong = {
        user: found[:10]
        for user in expected
        if (found := counts.get(user, [])) != list(range(1, expected[user] + 1))
    }
    assert not wrong, f"{len(wrong)} users' counts are not 1..N, e.g. {list(wrong.items())[:3]}"
    assert counts.keys() == expected.keys()
