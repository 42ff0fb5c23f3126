"""Views per product page, counted as they come, for ``notebooks/kafka.ipynb``.

    headwater run examples/notebooks/page_views.py --backend kafka --bootstrap-servers HOST:PORT

Reads the clickstream's JSON lines (``PAGE_VIEWS_INPUT``, default ``data/clicks.jsonl``) into
the 6-partition topic ``clicks<suffix>``, keyed by page; keeps the product pages, counts each
page's views and writes every new count to ``page-views<suffix>``, keyed by the page. The
pipeline is ``page-views<suffix>``: ``PAGE_VIEWS_SUFFIX`` (default empty) gives each run its own
topics and consumer group on a shared cluster.
"""

from __future__ import annotations

import os

import connectors
from pipelines import Pipeline, Topic

INPUT = os.environ.get("PAGE_VIEWS_INPUT", "data/clicks.jsonl")
SUFFIX = os.environ.get("PAGE_VIEWS_SUFFIX", "")
CLICKS = Topic(f"clicks{SUFFIX}", partitions=6)
VIEWS = Topic(f"page-views{SUFFIX}", partitions=3)

pipeline = (
    Pipeline(f"page-views{SUFFIX}")
    .source(connectors.JsonLines(INPUT, key=lambda line: line["url"]), into=CLICKS)
    .filter("product-pages", lambda click: click["url"].startswith("/p/"))
    .count("views")
    .sink(connectors.LogTopic(VIEWS))
)
