"""Keep a running pipeline's log bounded: purge processed repartition records, apply retention.

The runner calls :meth:`Housekeeping.run_due` as it supervises; every
``HEADWATER_HOUSEKEEPING_SECONDS`` (10 by default) it

* seals the active segment of each topic below that has held records for
  ``HEADWATER_SEGMENT_MS`` (an hour; a topic's ``retention_ms`` if shorter), since only sealed
  segments are dropped or compacted: a partition that went quiet lets its last records go too;
* purges each ``key_by`` topic of the pipeline below the offsets the pipeline's group has
  committed. Only that group reads those topics, the records below are processed, and a
  restore reads changelogs, never them: Kafka Streams purges its repartition topics the same
  way. The embedded log drops whole sealed segments (see
  :mod:`pipelines.log._partition_file`), so each partition keeps its active segment.
* applies the ``retention_ms`` and ``retention_bytes`` of the pipeline's topics on backends
  that do not do so
  themselves (the embedded log; Kafka's brokers apply retention on their own);
* compacts its compacted topics (state changelogs, source positions, tables) on those
  backends: the last record of each key stays (see :mod:`pipelines.log._compaction`).

A consumer that falls behind a topic's retention gets an error naming the topic when it reads
below the log's new start, never a silent skip.
"""

from __future__ import annotations

import os
import time

from pipelines.errors import PipelineDefinitionError
from pipelines.log.base import LogBackend, TopicPartition
from pipelines.runtime.topology import Topology
from pipelines.steps import KeyByStep

__all__ = ["Housekeeping", "housekeeping_seconds"]

SECONDS_VARIABLE = "HEADWATER_HOUSEKEEPING_SECONDS"


def housekeeping_seconds() -> float:
    """Seconds between two rounds: ``HEADWATER_HOUSEKEEPING_SECONDS``, or 10."""
    raw = os.environ.get(SECONDS_VARIABLE)
    if not raw:
        return 10.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise PipelineDefinitionError(
            f"{SECONDS_VARIABLE}={raw!r}: give the seconds between two purges of the log, a "
            "positive number (the default is 10)"
        )
    return seconds


class Housekeeping:
    """Purges and retention of one pipeline's topics, run every so often."""

    def __init__(self, log: LogBackend, topology: Topology, every: float | None = None) -> None:
        self._log = log
        self._topology = topology
        self._every = housekeeping_seconds() if every is None else every
        self._due = time.monotonic() + self._every

    async def run_due(self) -> None:
        """Run a round if one is due."""
        if time.monotonic() < self._due:
            return
        await self.run()
        self._due = time.monotonic() + self._every

    async def run(self) -> None:
        """Roll segments open too long, purge the repartition topics, apply retention and
        compact, now."""
        topology = self._topology
        purged = [
            step.topic.spec for step in topology.pipeline.steps if isinstance(step, KeyByStep)
        ]
        kept = [
            t.spec
            for t in topology.topics
            if t.retention_ms is not None or t.retention_bytes is not None
        ]
        compacted = [t.spec for t in (*topology.topics, topology.positions_topic) if t.compacted]
        now = int(time.time() * 1000)
        looked_after = {spec.name: spec for spec in (*purged, *kept, *compacted)}
        await self._log.roll_segments(list(looked_after.values()), now)
        if purged:
            internal = [
                TopicPartition(spec.name, partition)
                for spec in purged
                for partition in range(spec.partitions)
            ]
            committed = await self._log.committed_offsets(topology.group, internal)
            await self._log.purge(committed)
        if kept:
            await self._log.enforce_retention(kept, now)
        if compacted:
            await self._log.compact(compacted, now)
