"""Print what the clickstream pipeline wrote: each page's busiest minute, the top pages so far,
and how many records are on its dead-letter and late-data topics.

    python3 examples/clickstream/report.py [OUT_DIR] [--data-dir DIR] [--backend embedded|kafka]

Everything comes from the pipeline's own output: the two files its sinks wrote (in ``out``, or
``CLICKS_OUTPUT``, or ``OUT_DIR``) and the record counts of two topics on its log (the embedded
log in ``.headwater`` by default; ``--backend kafka`` reads the ``HEADWATER_*`` settings).
Nothing is computed again here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson

from pipelines.log import LogBackend, TopicPartition, open_log
from pipelines.settings import KafkaSettings

RUN = "headwater run examples/clickstream/pipeline.py --workers 2"
DEAD_LETTERS = "clickstream.dead-letters"
LATE = "clickstream.views-per-minute.late"
"""The late-data topic of the pipeline's windowed step, ``views-per-minute``."""
TOP = 5


@dataclass(frozen=True)
class Row:
    """One line of a sink file: a page, a minute, and views (in that minute, or up to it)."""

    page: str
    minute: datetime
    views: int


def read_rows(path: Path) -> list[Row]:
    """The rows of a sink file, one per (page, minute): a line written twice (at-least-once
    delivery replays a crashed worker's last batch) counts once."""
    rows: dict[tuple[str, str], Row] = {}
    with path.open("rb") as lines:
        for value in map(orjson.loads, lines):
            minute = datetime.fromisoformat(value["minute"])
            rows[(value["page"], value["minute"])] = Row(value["page"], minute, value["views"])
    return list(rows.values())


def busiest(minutes: list[Row]) -> list[Row]:
    """Each page's busiest minute (its earliest, on a tie), the busiest first."""
    best: dict[str, Row] = {}
    for row in sorted(minutes, key=lambda r: (-r.views, r.minute)):
        best.setdefault(row.page, row)
    return sorted(best.values(), key=lambda r: (-r.views, r.page))[:TOP]


def latest(totals: list[Row]) -> list[Row]:
    """Each page's last running total, the pages with the most views first."""
    last: dict[str, Row] = {}
    for row in totals:
        if row.page not in last or row.minute > last[row.page].minute:
            last[row.page] = row
    return sorted(last.values(), key=lambda r: (-r.views, r.page))[:TOP]


def table(title: str, header: str, rows: list[str]) -> str:
    """A titled, indented table."""
    return "\n".join([title, f"  {header}", *(f"  {row}" for row in rows)])


def _minute(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class PipelineLog:
    """Where the pipeline's topics are: the embedded log in ``data_dir``, or Kafka."""

    backend: str
    data_dir: Path

    @property
    def flags(self) -> str:
        """What ``headwater topics`` needs to read this log."""
        if self.backend == "kafka":
            return " --backend kafka"
        return "" if self.data_dir == Path(".headwater") else f" --data-dir {self.data_dir}"

    def counts(self, names: list[str]) -> dict[str, int] | None:
        """How many records each topic holds (0 for one not created yet), or None when there
        is no embedded log in ``data_dir``."""
        if self.backend == "kafka":
            return asyncio.run(_counts(open_log("kafka", kafka=KafkaSettings()), names))
        if not (self.data_dir / "topics").is_dir():
            return None
        return asyncio.run(_counts(open_log("embedded", data_dir=self.data_dir), names))


async def _counts(log: LogBackend, names: list[str]) -> dict[str, int]:
    """The records on each of the topics ``names`` of ``log``, which it then closes."""
    try:
        specs = await log.describe_topics()
        counts = {}
        for name in names:
            spec = specs.get(name)
            tps = [TopicPartition(name, p) for p in range(spec.partitions)] if spec else []
            counts[name] = sum((await log.end_offsets(tps)).values())
        return counts
    finally:
        await log.close()


def side_topics(log: PipelineLog) -> list[str]:
    """What is on the dead-letter and late-data topics, and how to see it."""
    counts = log.counts([DEAD_LETTERS, LATE])
    if counts is None:
        return [f"(no log in {log.data_dir}: pass --data-dir DIR, or --backend kafka)"]
    return [
        f"{counts[DEAD_LETTERS]:,} bad lines are on the dead-letter topic; to see them:",
        f"  headwater topics{log.flags} tail {DEAD_LETTERS} -n 5",
        f"{counts[LATE]:,} clicks came after their minute had closed; they are on the "
        "late-data topic:",
        f"  headwater topics{log.flags} tail {LATE} -n 5",
    ]


def report(out: Path, log: PipelineLog) -> str:
    """The whole report, from the sink files in ``out`` and the topics on ``log``."""
    minutes = read_rows(out / "page-minutes.jsonl")
    totals = read_rows(out / "page-totals.jsonl")
    views = sum(r.views for r in minutes)
    return "\n".join(
        [
            f"{views:,} product-page views counted in {len(minutes):,} page-minutes",
            "",
            table(
                f"Each page's busiest minute ({out / 'page-minutes.jsonl'}):",
                f"{'minute':<16}  {'page':<6}  {'views':>6}",
                [f"{_minute(r.minute):<16}  {r.page:<6}  {r.views:>6,}" for r in busiest(minutes)],
            ),
            "",
            table(
                f"Top pages, views so far ({out / 'page-totals.jsonl'}):",
                f"{'page':<6}  {'views':>6}  through",
                [f"{r.page:<6}  {r.views:>6,}  {_minute(r.minute)}" for r in latest(totals)],
            ),
            "",
            *side_topics(log),
        ]
    )


def main() -> None:
    """Print the report, or what to run first when there is no output yet."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", nargs="?", type=Path, default=os.environ.get("CLICKS_OUTPUT"))
    parser.add_argument("--data-dir", type=Path, default=Path(".headwater"))
    parser.add_argument("--backend", choices=("embedded", "kafka"), default="embedded")
    args = parser.parse_args()
    out = Path(args.out or "out")
    if not (out / "page-minutes.jsonl").is_file() or not (out / "page-totals.jsonl").is_file():
        sys.exit(f"no output in {out}/: run `python3 examples/clickstream/generate.py && {RUN}`")
    print(report(out, PipelineLog(args.backend, args.data_dir)))


if __name__ == "__main__":
    main()
