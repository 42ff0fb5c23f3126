"""Product-page views per page and minute, and per page so far, from a clickstream.

    python3 examples/clickstream/generate.py
    headwater run examples/clickstream/pipeline.py --workers 2
    python3 examples/clickstream/report.py

Line by line:

- ``source``: the lines of ``data/clicks.jsonl`` (``CLICKS_INPUT`` overrides it) go into the
  6-partition topic ``clicks``, each keyed by its page (``key=`` reads the line's ``url``), so
  every click on one page lands in one partition and is counted by one task, whichever worker
  runs it. A worker validates each value against ``Click`` when it reads it: a line that is
  not JSON or not a click goes to the topic ``clickstream.dead-letters``, with the error in its
  headers, and the run goes on.
- ``filter``: keep the clicks on product pages (``/p/...``).
- ``window``: cut each page's clicks into one-minute windows of *event time*: the click's
  ``ts``, not the time it is processed. Clicks arrive up to 8 s out of order, so a window
  waits until the clicks read have passed its end by ``lateness`` (10 s) before it closes; a
  click that comes after its window closed goes to ``clickstream.views-per-minute.late``,
  counted, never folded in.
- ``count``: the views of each page in each minute, kept in state that survives crashes. Each
  window emits its count once, when it closes, as a ``WindowResult`` keyed by the page.
- ``map`` and ``sink``: one JSON line per page and minute, to ``out/page-minutes.jsonl``.
- The chain goes on after the sink: ``reduce`` keeps each page's running total (a page's
  minutes close in order, each adding its views) and writes it to ``out/page-totals.jsonl``:
  the page, the last minute counted and the views up to the end of it. ``CLICKS_OUTPUT``
  overrides ``out``.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import connectors
from operators.windowed import WindowResult
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

CLICKS = os.environ.get("CLICKS_INPUT", "data/clicks.jsonl")
OUT = Path(os.environ.get("CLICKS_OUTPUT", "out"))


class Click(BaseModel):
    """One line of the input."""

    user: str
    url: str
    ts: datetime
    session: str


def page_minute(window: WindowResult) -> dict[str, Any]:
    """A closed window as a row: its key is the page, its value the views it counted."""
    return {"page": window.key, "minute": window.start.isoformat(), "views": window.value}


def add_minute(so_far: dict[str, Any], minute: dict[str, Any]) -> dict[str, Any]:
    """A page's running total after one more of its minutes."""
    return {**minute, "views": so_far["views"] + minute["views"]}


pipeline = (
    Pipeline("clickstream")
    .source(
        connectors.JsonLines(CLICKS, key=lambda line: line["url"]),
        into=Topic("clicks", partitions=6, value=Click),
    )
    .filter("product-pages", lambda click: click.url.startswith("/p/"))
    .window(
        "minutes", Tumbling(minutes=1), time=lambda click: click.ts, lateness=timedelta(seconds=10)
    )
    .count("views-per-minute")
    .map("page-minute", page_minute)
    .sink(connectors.JsonLinesSink(OUT / "page-minutes.jsonl"), step_id="page-minutes-file")
    .reduce("views-so-far", add_minute)
    .sink(connectors.JsonLinesSink(OUT / "page-totals.jsonl"), step_id="page-totals-file")
)
