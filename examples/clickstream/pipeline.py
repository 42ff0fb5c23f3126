"""Product-page views per user, from a clickstream.

Reads ``data/clicks.jsonl`` (``CLICKS_INPUT`` overrides it) into a 6-partition topic, validates
each click against the ``Click`` model (bad lines go to the dead-letter topic), keeps the
product pages, re-keys by user through the log (so every view of a user is handled by one
task) and appends the views to ``out/product-views.jsonl`` (``CLICKS_OUTPUT``).

    headwater run examples/clickstream/pipeline.py --workers 2
    python examples/clickstream/report.py
"""

from __future__ import annotations

import os
from datetime import datetime

from pydantic import BaseModel

import connectors
from pipelines import Pipeline, Topic


class Click(BaseModel):
    user: str
    url: str
    ts: datetime
    session: str


def product_view(click: Click) -> dict[str, str]:
    return {"user": click.user, "page": click.url, "ts": click.ts.isoformat()}


clicks = Topic("clicks", partitions=6, value=Click)

pipeline = (
    Pipeline("clickstream")
    .source(connectors.JsonLines(os.environ.get("CLICKS_INPUT", "data/clicks.jsonl")), into=clicks)
    .filter("product-pages", lambda click: click.url.startswith("/p/"))
    .map("to-view", product_view)
    .key_by("by-user", lambda view: view["user"])
    .sink(
        connectors.JsonLinesSink(os.environ.get("CLICKS_OUTPUT", "out/product-views.jsonl")),
        step_id="views-file",
    )
)
