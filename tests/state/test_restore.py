"""Keyed state survives a restart: a second run continues from the committed counts."""

from __future__ import annotations

import subprocess
import sys
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
    local_copies = list((tmp_path / ".headwater" / "state").rglob("*.sqlite"))
    assert local_copies, "no local state copy was written"
