"""The pipeline ``bench/stateless.py`` runs: a stateless JSON filter + map between log topics.

Worker processes import this module by path, as ``headwater run`` does; the benchmark passes the
topic names and the partition count through the environment, which the workers inherit.

``BENCH_POLL_MS`` is an experiment, not a setting (``bench/stateless.py --poll-ms``): it
overrides the embedded log's private idle poll interval in every process that imports this
module, to show how much of the latency that interval accounts for.
"""

from __future__ import annotations

import os

from workload import is_click, summarize

from connectors.topic import LogTopic
from pipelines import Pipeline, Topic
from pipelines.log import embedded

INPUT_TOPIC = os.environ.get("BENCH_INPUT_TOPIC", "bench-in")
OUTPUT_TOPIC = os.environ.get("BENCH_OUTPUT_TOPIC", "bench-out")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "4"))

if "BENCH_POLL_MS" in os.environ:
    embedded._POLL_SECONDS = float(os.environ["BENCH_POLL_MS"]) / 1000

pipeline = (
    Pipeline("bench")
    .source(LogTopic(Topic(INPUT_TOPIC, partitions=PARTITIONS)))
    .filter("clicks", is_click)
    .map("summary", summarize)
    .sink(LogTopic(Topic(OUTPUT_TOPIC, partitions=PARTITIONS)))
)
