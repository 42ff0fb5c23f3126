"""Live progress of a run, for a person: per-step counts, lag per topic, records/s.

On a terminal it is a table redrawn in place (rich, on stderr, so sink output on stdout stays
clean); elsewhere (CI logs, pipes, ``--log-format json``) one progress line every few seconds
and each note as it happens, through the run's log (:mod:`pipelines.runtime.logs`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipelines.log.base import TopicPartition
from pipelines.runtime.hotkeys import PartitionKeys, hot_keys_over
from pipelines.runtime.logs import LOGGER, configure, json_lines, log
from pipelines.runtime.sources import SourceProgress
from pipelines.runtime.topology import Topology
from pipelines.runtime.worker import WorkerReport

__all__ = ["Progress", "RunState"]

_PLAIN_EVERY = 5.0
RATE_WINDOW = 5.0
"""Seconds the shown rate is averaged over."""


@dataclass(slots=True)
class RunState:
    """Everything the progress view shows, gathered by whoever supervises the run."""

    topology: Topology
    backend: str
    workers: int
    sources: list[SourceProgress] = field(default_factory=list)
    reports: dict[int, WorkerReport] = field(default_factory=dict)
    lag: dict[TopicPartition, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stopped_by: int | None = None
    """The signal that stopped the run before its input was processed, if one did."""
    forced: bool = False
    """Stopped a second time: the workers were killed without waiting for their checkpoint."""
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    """Workers started in place of one that was killed or crashed."""
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    rate: float = 0.0
    """Records processed per second over the last :data:`RATE_WINDOW` seconds."""
    hot_warned: set[tuple[str, int, str]] = field(default_factory=set)
    """The (topic, partition, key) already warned about as hot: each is warned about once."""

    @property
    def records(self) -> int:
        """Records the workers have processed so far."""
        return sum(r.records for r in self.reports.values())

    def update_rate(self, now: float | None = None) -> None:
        """Take a sample of the records processed; the rate is over the samples of the last
        :data:`RATE_WINDOW` seconds (one reading every refresh would jump with each report)."""
        now = time.monotonic() if now is None else now
        samples = self._samples
        samples.append((now, self.records))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        then, before = samples[0]
        if now - then >= 1.0:
            self.rate = (self.records - before) / (now - then)

    def first_errors(self) -> dict[str, str]:
        """Per step that rejected records: what went wrong with the first one a worker saw."""
        found: dict[str, str] = {}
        for _, report in sorted(self.reports.items()):
            for step_id, error in report.first_errors.items():
                found.setdefault(step_id, error)
        return found

    def hot_keys(self) -> list[PartitionKeys]:
        """Per input partition, its top keys as the latest report that has it says (a worker
        that died keeps its last report; the partition's new owner sends newer ones)."""
        latest: dict[tuple[str, int], tuple[float, PartitionKeys]] = {}
        for report in list(self.reports.values()):
            for load in report.hot_keys:
                where = (load.topic, load.partition)
                if where not in latest or latest[where][0] < report.at:
                    latest[where] = (report.at, load)
        return [load for _, (_, load) in sorted(latest.items())]

    def step_totals(self) -> dict[str, list[int]]:
        """Per step: records in, out, skipped, dead-lettered, late, summed over workers."""
        totals: dict[str, list[int]] = {}
        for report in self.reports.values():
            for step_id, counts in report.steps.items():
                into = totals.setdefault(step_id, [0, 0, 0, 0, 0])
                for i, count in enumerate(counts):
                    into[i] += count
        return totals


def render(state: RunState) -> Group:
    """The progress view as rich renderables."""
    elapsed = time.monotonic() - state.started
    title = Text.assemble(
        ("headwater ", "bold"),
        (state.topology.pipeline.name, "bold cyan"),
        f" · {state.backend} · {state.workers} worker(s) · {elapsed:,.1f}s · ",
        (f"{state.rate:,.0f} records/s", "bold green"),
    )
    parts: list[Text | Table] = [title, _steps_table(state), _lag_table(state)]
    hot = _hot_keys_table(state)
    if hot.row_count:
        parts.append(hot)
    parts += [Text(note, style="yellow") for note in state.notes[-5:]]
    return Group(*parts)


_STEP_COLUMNS = ("in", "out", "skipped", "dead-lettered", "late")


def _steps_table(state: RunState) -> Table:
    """Records per step; the skipped, dead-lettered and late columns only when not all 0."""
    totals = state.step_totals()
    steps = state.topology.pipeline.steps
    rows = [(s.step_id, totals[s.step_id]) for s in steps if s.step_id in totals]
    shown = [i for i in range(5) if i < 2 or any(counts[i] for _, counts in rows)]
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("step")
    for i in shown:
        table.add_column(_STEP_COLUMNS[i], justify="right")
    for source in state.sources:
        status = "done" if source.done else "reading"
        blank = [""] * (len(shown) - 2)
        table.add_row(f"{source.step_id} (source, {status})", "", f"{source.records:,}", *blank)
    for step_id, counts in rows:
        table.add_row(step_id, *(f"{counts[i]:,}" for i in shown))
    return table


def _lag_table(state: RunState) -> Table:
    """Lag per topic: the total and the partition furthest behind (64 partitions in a line)."""
    by_topic: dict[str, list[tuple[int, int]]] = {}
    for tp, behind in state.lag.items():
        by_topic.setdefault(tp.topic, []).append((behind, tp.partition))
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("topic")
    table.add_column("partitions", justify="right")
    table.add_column("lag", justify="right")
    table.add_column("most behind", justify="right")
    for topic, lags in sorted(by_topic.items()):
        worst, partition = max(lags, key=lambda lag: (lag[0], -lag[1]))
        most = f"{worst:,} (partition {partition})" if worst else ""
        table.add_row(topic, str(len(lags)), f"{sum(b for b, _ in lags):,}", most)
    return table


_HOT_ROWS = 5


def _hot_keys_table(state: RunState) -> Table:
    """The partitions whose top key carries the largest share of their records, with it."""
    tops = [(load.top[0], load) for load in state.hot_keys() if load.top]
    tops.sort(key=lambda item: -item[0][1])
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("hot key")
    table.add_column("partition")
    table.add_column("share", justify="right")
    table.add_column("of records", justify="right")
    for (key, share), load in tops[:_HOT_ROWS]:
        where = f"{load.topic}[{load.partition}]"
        table.add_row(key, where, f"{share:.0%}", f"{load.records:,}")
    return table


def plain_line(state: RunState) -> str:
    """A one-line summary for logs."""
    elapsed = time.monotonic() - state.started
    read = sum(s.records for s in state.sources)
    behind = sum(state.lag.values())
    return (
        f"[{elapsed:7.1f}s] {state.topology.pipeline.name}: read {read:,} · processed "
        f"{state.records:,} · lag {behind:,} · {state.rate:,.0f} records/s"
    )


class Progress:
    """Shows a :class:`RunState` while a run goes on."""

    def __init__(self, state: RunState, *, enabled: bool = True, stream: TextIO | None = None):
        self.state = state
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._live: Live | None = None
        self._last_plain = 0.0
        if not LOGGER.handlers:
            configure()

    def __enter__(self) -> Progress:
        if self._enabled and self._stream.isatty() and not json_lines():
            self._live = Live(
                render(self.state),
                console=Console(file=self._stream),
                refresh_per_second=4,
                transient=False,
            )
            self._live.__enter__()
        return self

    def refresh(self) -> None:
        self.state.update_rate()
        if self._live is not None:
            self._live.update(render(self.state))
        elif self._enabled and time.monotonic() - self._last_plain >= _PLAIN_EVERY:
            self._last_plain = time.monotonic()
            state = self.state
            fields = {
                "event": "progress",
                "pipeline": state.topology.pipeline.name,
                "records": state.records,
                "records_per_s": round(state.rate, 1),
                "lag": sum(state.lag.values()),
            }
            log(logging.INFO, plain_line(state), fields)

    def note(self, message: str, level: int = logging.INFO) -> None:
        """Show ``message`` (a worker died, a partition moved ...): in the live table, or as
        a line of the run's log at ``level``."""
        self.state.notes.append(message)
        if self._live is None:
            log(level, message, {"event": "note", "pipeline": self.state.topology.pipeline.name})

    def warn_hot_keys(self, share: float) -> None:
        """A warning note, once per key and partition, for each key that carries more than
        ``share`` of a partition's records (see :mod:`pipelines.runtime.hotkeys`)."""
        for load, key, part in hot_keys_over(self.state.hot_keys(), share):
            seen = (load.topic, load.partition, key)
            if seen in self.state.hot_warned:
                continue
            self.state.hot_warned.add(seen)
            self.note(
                f"hot key {key!r} carries {part:.0%} of partition {load.topic}[{load.partition}] "
                f"({load.records:,} records so far): one task processes all of it; to spread it "
                "over partitions before an aggregation, key_by(..., salt=N)",
                logging.WARNING,
            )

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(render(self.state))
            self._live.__exit__(None, None, None)
