"""The pipelines ``bench/stateful.py`` runs: a keyed count, or a per-minute tumbling window count.

Worker processes import this module by path, as ``headwater run`` does; the benchmark chooses
the variant and names its topics through the environment, which the workers inherit:

``BENCH_KIND``
    ``count``: ``.count("n")`` per record key, one output record (the key's new count) per
    input record. ``window``: ``.window(Tumbling(minutes=1), idle=BENCH_IDLE_MS)`` then
    ``.count("n")``, emitted once per key and minute when the window closes.
``BENCH_PIPELINE``
    the pipeline's name, so its consumer group and changelog topic (fresh ones per run on Kafka).
``BENCH_GUARANTEE``
    ``at_least_once`` or ``exactly_once``.
``BENCH_STANDBY_REPLICAS``
    the pipeline's ``standby_replicas`` (default 0).

The input is already keyed (no ``key_by``): a ``LogTopic`` read straight into the count.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Literal

from connectors.topic import LogTopic
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

KIND = os.environ.get("BENCH_KIND", "count")
NAME = os.environ.get("BENCH_PIPELINE", "bench-stateful")
GUARANTEE: Literal["at_least_once", "exactly_once"] = (
    "exactly_once" if os.environ.get("BENCH_GUARANTEE") == "exactly_once" else "at_least_once"
)
INPUT_TOPIC = os.environ.get("BENCH_INPUT_TOPIC", "bench-in")
OUTPUT_TOPIC = os.environ.get("BENCH_OUTPUT_TOPIC", "bench-out")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "4"))
IDLE_MS = int(os.environ.get("BENCH_IDLE_MS", "1000"))
STANDBY_REPLICAS = int(os.environ.get("BENCH_STANDBY_REPLICAS", "0"))


def build() -> Pipeline:
    """The variant the environment asks for."""
    chain = Pipeline(
        NAME, processing_guarantee=GUARANTEE, standby_replicas=STANDBY_REPLICAS
    ).source(LogTopic(Topic(INPUT_TOPIC, partitions=PARTITIONS)))
    if KIND == "window":
        chain = chain.window(
            "per-minute", Tumbling(minutes=1), idle=timedelta(milliseconds=IDLE_MS)
        )
    elif KIND != "count":
        raise ValueError(f"BENCH_KIND must be count or window, not {KIND!r}")
    return chain.count("n").sink(LogTopic(Topic(OUTPUT_TOPIC, partitions=PARTITIONS)))


pipeline = build()
