"""Keyed state survives a restart: a second run continues from the committed counts, also when
the state is larger than the stores' cache and the first run was killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipelines.log import EmbeddedLog, TopicPartition

MODULE = """
import connectors
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("counts")
    .source(connectors.JsonLines("input.jsonl"), into=Topic("events", partitions=4))
    .key_by("by-user", lambda event: event["user"])
    .count("per-user")
    .sink(connectors.LogTopic(Topic("totals", partitions=2)), step_id="totals")
)
"""


def _append_users(path: Path, start: int, stop: int) -> None:
    with path.open("ab") as lines:
        for n in range(start, stop):
            lines.write(orjson.dumps({"user": f"u{n % 13}", "n": n}) + b"\n")


def _run_cli(cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "job.py", "--workers", "2", "--no-progress"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def _latest_totals(data_dir: Path) -> dict[str, int]:
    log = EmbeddedLog(data_dir)
    latest: dict[str, int] = {}
    for partition in range(2):
        fetched = await log.read(TopicPartition("totals", partition), 0, 10_000_000)
        for key, value in zip(fetched.records.keys, fetched.records.values, strict=True):
            assert key is not None and value is not None
            latest[key.decode()] = orjson.loads(value)
    await log.close()
    return latest


@pytest.mark.slow
async def test_a_restart_continues_from_the_committed_state(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(MODULE)
    _append_users(tmp_path / "input.jsonl", 0, 20_000)
    _run_cli(tmp_path)
    first = await _latest_totals(tmp_path / ".headwater")
    assert first == Counter(f"u{n % 13}" for n in range(20_000))

    _append_users(tmp_path / "input.jsonl", 20_000, 50_000)
    _run_cli(tmp_path)
    assert await _latest_totals(tmp_path / ".headwater") == Counter(
        f"u{n % 13}" for n in range(50_000)
    )
    local_copies = list((tmp_path / ".headwater" / "state").rglob("*.lmdb"))
    assert local_copies, "no local state copy was written"


LARGE = """
import os
import connectors
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("counts", processing_guarantee="exactly_once")
    .source(
        connectors.JsonLines("input.jsonl", follow=os.environ.get("FOLLOW") == "1"),
        into=Topic("events", partitions=4),
    )
    .key_by("by-user", lambda event: event["user"])
    .count("per-user")
    .sink(connectors.LogTopic(Topic("totals", partitions=2)), step_id="totals")
)
"""
USERS = 997
"""Keys: ~250 per store, five times the cache of 50."""


async def _totals_written(data_dir: Path) -> int:
    log = EmbeddedLog(data_dir)
    try:
        ends = await log.end_offsets([TopicPartition("totals", p) for p in range(2)])
        return sum(ends.values())
    finally:
        await log.close()


@pytest.mark.slow
async def test_a_state_larger_than_its_cache_survives_a_kill(tmp_path: Path) -> None:
    """Stores that hold 50 of their ~250 keys in memory (the rest evicted to the local copy,
    written at every checkpoint): a run killed with SIGKILL mid-stream, then a run to the end,
    give every key its count over the whole input (plain counting of the input). Exactly-once,
    so that the ``key_by`` stage's replay after the kill writes nothing twice."""
    (tmp_path / "job.py").write_text(LARGE)
    lines = tmp_path / "input.jsonl"
    with lines.open("wb") as out:
        for n in range(60_000):
            out.write(orjson.dumps({"user": f"u{n * 7919 % USERS}", "n": n}) + b"\n")
    env = {**os.environ, "HEADWATER_STATE_CACHE_KEYS": "50", "HEADWATER_STATE_COPY_INTERVAL": "0"}
    command = [sys.executable, "-m", "pipelines.cli", "run", "job.py", "--workers", "2"]
    first = subprocess.Popen(
        [*command, "--no-progress"],
        cwd=tmp_path,
        env={**env, "FOLLOW": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        data_dir = tmp_path / ".headwater"
        while time.monotonic() < deadline:
            if data_dir.exists() and await _totals_written(data_dir) >= 20_000:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the first run wrote no totals")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert await _totals_written(data_dir) < 60_000 * 2, "the first run was not killed mid-way"
    evicted = list((data_dir / "state").rglob("*.lmdb"))
    assert evicted, "no local state copy was written"

    second = subprocess.run(
        [*command, "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    expected = Counter(f"u{n * 7919 % USERS}" for n in range(60_000))
    assert await _latest_totals(data_dir) == expected
