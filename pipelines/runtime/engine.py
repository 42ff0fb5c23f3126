"""What every way of running a pipeline does around the workers: set up topics, start the
source tasks, and tell when everything the sources wrote has been processed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipelines.errors import PipelineError
from pipelines.log.base import LogBackend, TopicPartition
from pipelines.runtime.sources import SourceProgress, load_positions, run_source
from pipelines.runtime.topology import Topology

__all__ = ["Sources", "is_drained", "lag", "prepare_topics", "refuse_a_second_copy"]


async def prepare_topics(log: LogBackend, topology: Topology) -> None:
    """Create every topic the pipeline uses (a no-op for those that exist alike)."""
    await log.create_topics([t.spec for t in [*topology.topics, topology.positions_topic]])


async def refuse_a_second_copy(log: LogBackend, topology: Topology, spec: str) -> None:
    """Stop a run that starts afresh (no source position stored, no offset committed) while a
    sink already holds output, which can only be an earlier run's: the run would write its own
    after it, and the output would hold everything twice."""
    held = [
        f"{step.step_id} ({found})"
        for step in topology.sink_steps
        if (found := await step.sink.earlier_output(topology.pipeline.name, step.step_id))
        is not None
    ]
    if not held or await load_positions(log, topology.positions_topic):
        return
    everything = [tp for tps in _partitions(topology) for tp in tps]
    if any((await log.committed_offsets(topology.group, everything)).values()):
        return
    raise PipelineError(
        f"pipeline {topology.pipeline.name!r} starts afresh (the log has no record of an "
        f"earlier run), but its sinks already hold output: {', '.join(held)}. Running would "
        "add a second copy after it. Move or remove that output to run from the start, or run "
        f"`headwater reset {spec}`, which removes it with everything else the pipeline keeps"
    )


class Sources:
    """The source tasks of a run, sharing one producer."""

    def __init__(self, log: LogBackend, topology: Topology) -> None:
        self._log = log
        self._topology = topology
        self._producer = log.producer()
        self.tasks: list[asyncio.Task[None]] = []
        self.progress: list[SourceProgress] = []

    async def start(self) -> None:
        """One asyncio task per source step, resuming from its stored position."""
        positions = await load_positions(self._log, self._topology.positions_topic)
        for step in self._topology.source_steps:
            state = SourceProgress(step.step_id)
            self.progress.append(state)
            start = positions.get(step.step_id)
            self.tasks.append(
                asyncio.create_task(
                    run_source(self._topology, step, self._log, self._producer, state, start),
                    name=f"source {step.step_id}",
                )
            )

    @property
    def done(self) -> bool:
        """Whether every source has read its input to the end."""
        return all(t.done() for t in self.tasks)

    def raise_failure(self) -> None:
        """Raise the error of a source that failed, if one did."""
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                task.result()

    async def stop(self) -> None:
        """Cancel the sources that are still reading and close the producer."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._producer.close()


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
