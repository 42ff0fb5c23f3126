"""The pipeline ``bench/hot_keys.py`` runs: a keyed sum over Zipf-distributed keys.

Worker processes import this module by path, as ``headwater run`` does; the benchmark passes
the salt through the environment, which the workers inherit:

``BENCH_SALT``
    ``0`` (the default): ``key_by`` then ``sum``, so every record of a key is folded by one
    task. ``N``: ``key_by(..., salt=N)`` then the same ``sum``, folded per sub-key and merged.

The input carries no keys (spread evenly over its partitions, as a source without ``key=``
writes it); each value is ``{"k": "<key>", "n": <number>}``.
"""

from __future__ import annotations

import os
from typing import Any

from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

INPUT_TOPIC = "hot-in"
OUTPUT_TOPIC = "hot-out"
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "4"))
SALT = int(os.environ.get("BENCH_SALT", "0"))


def key_of(value: dict[str, Any]) -> str:
    return str(value["k"])


def amount(value: dict[str, Any]) -> int:
    return int(value["n"])


pipeline = (
    Pipeline("bench-hot-keys")
    .source(LogTopic(Topic(INPUT_TOPIC, partitions=PARTITIONS)))
    .key_by("by-key", key_of, salt=SALT or None)
    .sum("total", amount)
    .sink(LogTopic(Topic(OUTPUT_TOPIC, partitions=PARTITIONS)))
)
