"""``headwater status MODULE``: the state of a pipeline's run, from another shell.

The runner writes what it knows (its workers and their partitions, each step's counts and
first rejected record, the rate, its recent notes: a worker killed, a step stalled) to
``<data-dir>/runs/<pipeline>.status.json`` about once a second, replacing the file atomically,
and once more when the run ends. ``headwater status`` reads that file, asks the run lock
whether the runner is alive (a file left by a runner killed with ``kill -9`` says "running"
but the lock says otherwise), and asks the log itself for the lag, so the lag is right even
when no runner is there. Works on the embedded log and on Kafka (the file is in the runner's
data directory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from pipelines.errors import PipelineError
from pipelines.log._locks import held
from pipelines.log.base import LogBackend
from pipelines.runtime.engine import lag
from pipelines.runtime.progress import RunState
from pipelines.runtime.topology import Topology

__all__ = ["StatusFile", "describe", "read_status"]

_EVERY = 1.0
_TOP_KEYS = 3
"""Top keys per partition in the status file."""
_HOT_PARTITIONS = 5
"""Partitions ``headwater status`` lists, those whose top key has the largest share first."""


def status_path(data_dir: Path, pipeline: str) -> Path:
    return data_dir / "runs" / f"{pipeline}.status.json"


class StatusFile:
    """Writes a run's status for ``headwater status`` (at most once per second)."""

    def __init__(self, data_dir: Path, state: RunState) -> None:
        self.path = status_path(data_dir, state.topology.pipeline.name)
        self.state = state
        self._written = 0.0
        self._wall_started = time.time()

    def update(self, outcome: str = "running", *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < _EVERY:
            return
        self._written = now
        state = self.state
        names = ("in", "out", "skipped", "dead_lettered", "late")
        document = {
            "pipeline": state.topology.pipeline.name,
            "outcome": outcome,
            "runner_pid": os.getpid(),
            "backend": state.backend,
            "started": self._wall_started,
            "updated": time.time(),
            "records_per_s": round(state.rate, 1),
            "records": state.records,
            "restarts": state.restarts,
            "workers": {
                str(index): {"partitions": report.partitions, "done": report.done}
                for index, report in sorted(state.reports.items())
            },
            "steps": {
                step: dict(zip(names, counts, strict=True))
                for step, counts in state.step_totals().items()
            },
            "first_rejected": state.first_errors(),
            "sources": {s.step_id: s.records for s in state.sources},
            "hot_keys": {
                f"{load.topic}[{load.partition}]": {
                    "records": load.records,
                    "top": [[key, round(share, 4)] for key, share in load.top[:_TOP_KEYS]],
                }
                for load in state.hot_keys()
                if load.top
            },
            "notes": state.notes[-10:],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        partial.replace(self.path)


async def read_status(data_dir: Path, topology: Topology, log: LogBackend) -> dict[str, Any]:
    """What the runner last wrote, whether it is alive, and the lag the log shows now."""
    name = topology.pipeline.name
    path = status_path(data_dir, name)
    try:
        document: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        document = {"pipeline": name, "outcome": "never run here"}
    except (OSError, orjson.JSONDecodeError) as error:
        raise PipelineError(f"cannot read the status in {path}: {error}") from error
    alive = held(data_dir / "runs" / f"{name}.lock")
    if document.get("outcome") == "running" and not alive:
        document["outcome"] = "not running (its runner died without a word: killed?)"
    document["runner_alive"] = alive
    existing = await log.describe_topics()
    ran = all(topic.name in existing for topic in topology.input_topics)
    behind = await lag(log, topology) if ran else {}  # no topics: it never ran on this log
    document["lag"] = {str(tp): n for tp, n in sorted(behind.items())}
    return document


def describe(document: dict[str, Any]) -> str:
    """The status as lines for a person."""
    lines = [f"{document['pipeline']}: {document['outcome']}"]
    if "updated" in document:
        age = time.time() - document["updated"]
        lines[0] += f" (runner pid {document['runner_pid']}, status {age:,.0f} s old)"
        lines.append(
            f"  {document['records']:,} records read, {document['records_per_s']:,.0f} "
            f"records/s, {document['restarts']} restarts"
        )
    for index, worker in document.get("workers", {}).items():
        if not worker["done"]:
            lines.append(f"  worker {index}: {', '.join(worker['partitions']) or 'no partitions'}")
    for step, counts in document.get("steps", {}).items():
        extra = "".join(
            f", {counts[k]:,} {label}"
            for k, label in (("dead_lettered", "dead-lettered"), ("skipped", "skipped"))
            if counts[k]
        )
        lines.append(f"  {step}: {counts['in']:,} in, {counts['out']:,} out{extra}")
        first = document.get("first_rejected", {}).get(step)
        if first:
            lines.append(f"    first rejected: {first}")
    behind = document["lag"]
    worst = max(behind.items(), key=lambda item: item[1], default=("", 0))
    most = f" (most behind: {worst[0]}, {worst[1]:,})" if worst[1] else ""
    lines.append(f"  lag: {sum(behind.values()):,} records{most}")
    lines += _hot_key_lines(document.get("hot_keys", {}))
    lines += [f"  note: {note}" for note in document.get("notes", [])[-5:]]
    return "\n".join(lines)


def _hot_key_lines(hot: dict[str, Any]) -> list[str]:
    """The partitions whose top key carries the largest share, with their top keys."""
    ranked = sorted(hot.items(), key=lambda item: -item[1]["top"][0][1])[:_HOT_PARTITIONS]
    lines = ["  hot keys (share of the partition's records):"] if ranked else []
    for where, load in ranked:
        keys = ", ".join(f"{key!r} {share:.0%}" for key, share in load["top"])
        lines.append(f"    {where}: {keys} ({load['records']:,} records)")
    return lines
