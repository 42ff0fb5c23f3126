"""What every way of running a pipeline does around the workers: set up topics, start the
source tasks, and tell when everything the sources wrote has been processed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipelines.log.base import LogBackend, TopicPartition
from pipelines.runtime.sources import SourceProgress, load_positions, run_source
from pipelines.runtime.topology import Topology

__all__ = ["is_drained", "lag", "prepare_topics", "start_sources"]


async def prepare_topics(log: LogBackend, topology: Topology) -> None:
    """Create every topic the pipeline uses (a no-op for those that exist alike)."""
    await log.create_topics([t.spec for t in [*topology.topics, topology.positions_topic]])


async def start_sources(
    log: LogBackend, topology: Topology
) -> tuple[list[asyncio.Task[None]], list[SourceProgress]]:
    """One asyncio task per source step, resuming from its stored position."""
    positions = await load_positions(log, topology.positions_topic)
    producer = log.producer()
    tasks, progress = [], []
    for step in topology.source_steps:
        state = SourceProgress(step.step_id)
        progress.append(state)
        tasks.append(
            asyncio.create_task(
                run_source(topology, step, log, producer, state, positions.get(step.step_id)),
                name=f"source {step.step_id}",
            )
        )
    return tasks, progress


def _partitions(topology: Topology) -> list[list[TopicPartition]]:
    return [[TopicPartition(t.name, p) for p in range(t.partitions)] for t in topology.input_topics]


async def lag(log: LogBackend, topology: Topology) -> dict[TopicPartition, int]:
    """Records on each input partition that the group has not committed yet."""
    everything: Sequence[TopicPartition] = [tp for tps in _partitions(topology) for tp in tps]
    ends = await log.end_offsets(everything)
    committed = await log.committed_offsets(topology.group, everything)
    return {tp: ends[tp] - committed.get(tp, 0) for tp in everything}


async def is_drained(log: LogBackend, topology: Topology) -> bool:
    """Whether the group has committed every record of every input topic.

    Topics are checked upstream first: a committed upstream offset means the records it led to
    downstream are already on the log, so a downstream check made afterwards sees them.
    """
    for tps in _partitions(topology):
        ends = await log.end_offsets(tps)
        committed = await log.committed_offsets(topology.group, tps)
        if any(committed.get(tp, 0) < ends[tp] for tp in tps):
            return False
    return True
