"""The worker: **the one component that owns the consume loop.**

A worker is one member of the pipeline's consumer group. It subscribes to the input topics of
every sub-topology, builds a :class:`~pipelines.runtime.task.Task` for each (sub-topology,
partition) the group assigns it, and loops::

    poll a batch per partition -> task.process (deserialise -> operators -> outbox / sinks)
    -> task.advance (the inputs' event-time mark moved: windows close) -> send the outbox
    -> every commit interval (and when idle, revoked or stopping): checkpoint

Checkpoints also write each task's watermark markers to the internal topics it feeds, when its
mark moved, and keep what it knows of its inputs' marks in its state (see
:mod:`pipelines.runtime.watermarks`).

What a checkpoint does, in which order, and how at-least-once and exactly-once differ is
:mod:`pipelines.runtime.checkpoint`'s: the worker only says when (and which tasks, on a
revocation). A batch whose records were all filtered out still advances its partition's offset.
Sinks outside the log (files, stdout) stay at-least-once under either guarantee.

Stopping (``stop`` is set, e.g. on SIGTERM) finishes the batch in hand, checkpoints, revokes and
leaves the group. A step stuck in a user function when the worker is told to stop is interrupted
(:mod:`pipelines.runtime.watchdog`): the worker then leaves without a checkpoint, and what it did
since the last one is processed again by the partitions' next owner.

The calls of async step functions run on the process's step loop (:mod:`operators.steploop`),
not on the worker's: a worker holds that loop while it runs, and the last worker of the process
to leave closes it, once its tasks are closed.

Rebalance callbacks run inside ``poll`` on the local backends but in aiokafka's coordinator task
on Kafka, so a lock makes a callback wait until the batch in hand is processed, sent and
checkpointed; batches of a partition revoked in the meantime are dropped unprocessed (their
offsets were not committed, so the partition's next owner reads them).

A pipeline with ``standby_replicas`` has the worker also keep warm copies of the state of tasks
it stands by (:mod:`pipelines.runtime.standby`), between batches; a task assigned to it that it
stood by starts from its standby's stores. The worker says in its reports when a standby task
is warm (read to the end of its changelogs once) and when it took a task over from one
(:attr:`WorkerReport.standby_events`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from connectors.base import SinkContext, SinkWriter
from operators.steploop import step_loop
from pipelines.errors import FencedError, PipelineError
from pipelines.log.base import FetchedBatch, LogBackend, TopicPartition
from pipelines.runtime.checkpoint import Checkpoint, Fenced, TaskKey, checkpoint_for
from pipelines.runtime.hotkeys import PartitionKeys
from pipelines.runtime.standby import STANDBY_INTERVAL, Handoff, Standbys, standbys_for
from pipelines.runtime.task import StepStats, Task
from pipelines.runtime.topology import Topology
from pipelines.runtime.watchdog import Abandoned
from pipelines.runtime.watermarks import Clock, SystemClock

__all__ = ["Worker", "WorkerReport"]

MAX_BATCH = 2000
"""Records fetched per poll, across the worker's partitions."""
COMMIT_INTERVAL = 0.5
"""Seconds between checkpoints while records keep coming."""
REPORT_INTERVAL = 0.5
TICK_INTERVAL = 0.5
"""Seconds between the timer ticks that let idle inputs follow the wall clock."""

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerReport:
    """What a worker tells the runner about itself now."""

    worker: int
    steps: dict[str, list[int]]
    partitions: list[str]
    records: int
    pending: int = 0
    """Results waiting for time to pass (open windows) in this worker's tasks."""
    done: bool = False
    error: str | None = None
    retriable: bool = False
    """The error is transient (a log that did not answer): a restart may get past it."""
    first_errors: dict[str, str] = field(default_factory=dict)
    """Per step that rejected records: what went wrong with the first."""
    hot_keys: list[PartitionKeys] = field(default_factory=list)
    """Per input partition of this worker's tasks: its top keys and their shares."""
    standby_events: list[str] = field(default_factory=list)
    """What its standbys did, as sentences, in order: each standby task once warm, each task
    taken over from its standby."""
    at: float = field(default_factory=time.time)


class Worker:
    """One consumer-group member running the pipeline's tasks (see the module docstring)."""

    def __init__(
        self,
        topology: Topology,
        log: LogBackend,
        *,
        index: int = 0,
        report: Callable[[WorkerReport], None] | None = None,
        max_batch: int = MAX_BATCH,
        commit_interval: float = COMMIT_INTERVAL,
        state_dir: Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.topology = topology
        self._clock = clock or SystemClock()
        self._state_dir = state_dir
        self.index = index
        self.stop = asyncio.Event()
        self._log = log
        self._report = report
        self._max_batch = max_batch
        self._commit_interval = commit_interval
        self._consumer = log.consumer(topology.group)
        self._checkpoints: Checkpoint = checkpoint_for(
            log, self._consumer, topology.group, topology.pipeline.processing_guarantee
        )
        self._writers: dict[str, SinkWriter] = {}
        self._stats: dict[str, StepStats] = {}
        self._tasks: dict[TaskKey, Task] = {}
        self._positions: dict[TopicPartition, int] = {}  # processed, not yet committed
        self._fenced: set[TopicPartition] = set()  # of dropped zombie tasks, until a rebalance
        self._records = 0
        self._standbys: Standbys | None = None  # (in run: it may refuse the log)
        self._standby_events: list[str] = []
        self._lock = asyncio.Lock()
        self.abandoned: str | None = None
        """Why the worker left without its last checkpoint (told to stop while a step was
        stuck; see :mod:`pipelines.runtime.watchdog`), if it did."""

    async def run(self) -> None:
        """Consume until :attr:`stop` is set; then checkpoint and leave the group."""
        pipeline = self.topology.pipeline
        try:
            self._standbys = standbys_for(self.topology, self._log, self._consumer, self._state_dir)
        except PipelineError:
            await self._consumer.close()  # (not subscribed: nothing to revoke)
            raise
        for step in self.topology.sink_steps:
            ctx = SinkContext(pipeline.name, step.step_id, self.index)
            self._writers[step.step_id] = writer = step.sink.open(ctx)
            await writer.start()
        await self._consumer.subscribe([t.name for t in self.topology.input_topics], self)
        next_checkpoint = time.monotonic() + self._commit_interval
        next_report = next_tick = next_standby = 0.0
        step_loop.hold()  # the loop of async steps lives as long as a worker of the process
        try:
            while not self.stop.is_set():
                fetched = await self._consumer.poll(self._max_batch, timeout=0.1)
                async with self._lock:
                    self._process(fetched)
                    now = time.monotonic()
                    moved = False
                    if now >= next_tick and not fetched:
                        # only a worker with nothing to fetch lets quiet inputs follow the wall
                        # clock: one still catching up (after a rebalance, say) would close
                        # windows too early
                        moved = any([task.advance(idle=True) for task in self._tasks.values()])
                        next_tick = now + TICK_INTERVAL
                    await self._drop_all_fenced(await self._checkpoints.send(self._tasks))
                    # idle with progress to commit, or a mark that moved: checkpoint now, so
                    # what the end of a run waits for is durable when this worker reports
                    if now >= next_checkpoint or (not fetched and self._positions) or moved:
                        await self._checkpoint()
                        next_checkpoint = now + self._commit_interval
                        next_report = now  # tell the runner what this checkpoint committed
                if now >= next_report:
                    self._send_report()
                    next_report = now + REPORT_INTERVAL
                if self._standbys is not None and now >= next_standby:
                    async with self._lock:
                        # a worker catching up (a full batch) opens no standby task
                        busy = sum(len(b.records) for b in fetched) >= self._max_batch
                        warm = await self._standbys.step(self._tasks, open_one=not busy)
                    for key in warm:
                        self._standby_event(
                            f"worker {self.index} keeps a warm standby of task {key[0]}.{key[1]}"
                        )
                    next_standby = now + STANDBY_INTERVAL
                # a local poll that finds data never suspends: yield once per batch so signal
                # handlers, other workers and sources on this loop, and client heartbeats run
                await asyncio.sleep(0)
        except Abandoned as stopped:
            self.abandoned = str(stopped)
        finally:
            try:
                await self._shutdown()
            finally:
                step_loop.release()  # after the tasks closed: their steps are done with it

    @property
    def pending(self) -> int:
        """Results waiting for time to pass (open windows) in this worker's tasks."""
        return sum(task.pending for task in self._tasks.values())

    def _process(self, fetched: list[FetchedBatch]) -> None:
        owned = self._consumer.assignment()
        touched: dict[tuple[int, int], Task] = {}
        for batch in fetched:
            tp = batch.topic_partition
            if tp not in owned or tp in self._fenced:
                continue  # revoked while this batch was on its way, or taken over
            key = (self.topology.by_topic[batch.topic].index, batch.partition)
            task = self._tasks.get(key)
            if task is None:  # its task failed to open (on Kafka, meanwhile): poll raises why
                continue
            touched[key] = task
            task.process(batch)
            self._positions[tp] = batch.next_offset
            self._records += len(batch.records)
        for task in touched.values():
            task.advance(idle=False)

    async def _shutdown(self) -> None:
        loads = self._hot_keys()  # the tasks close with the consumer: the last word has these
        try:
            # revokes everything: checkpoints through on_revoked, unless the work in hand was
            # abandoned half done (then nothing since the last checkpoint is kept: the
            # partitions' next owner processes it again)
            await self._consumer.close()
        finally:
            if self.abandoned is None:
                for writer in self._writers.values():
                    await writer.close()
            if self._standbys is not None:
                self._standbys.close()
            await self._checkpoints.close()
            self._send_report(done=True, hot_keys=loads)

    async def _checkpoint(self, partitions: frozenset[TopicPartition] | None = None) -> None:
        """Checkpoint every task, or those of ``partitions`` (being revoked): see
        :mod:`pipelines.runtime.checkpoint`."""
        tasks = {
            key: task
            for key, task in self._tasks.items()
            if partitions is None or task.partitions & partitions
        }
        fenced = await self._checkpoints.run(
            tasks, self._positions, self._writers.values(), self._clock.wall_ms(), partitions
        )
        await self._drop_all_fenced(fenced)

    async def _drop_all_fenced(self, fenced: Fenced) -> None:
        for key, error in fenced:
            await self._drop_fenced(key, error)

    async def _drop_fenced(self, key: TaskKey, error: FencedError) -> None:
        """Drop a task whose transactions a newer owner took over: the group moved its
        partitions in a rebalance this worker has not seen yet (it was too slow to rejoin).
        What it did since its last commit is aborted; its partitions are skipped until the
        rebalance reaches this worker, which may give them back (restored from the commit)."""
        task = self._tasks.pop(key)
        _log.warning("worker %d: task %d.%d dropped: %s", self.index, *key, error)
        self._fenced |= task.partitions
        for tp in task.partitions:
            self._positions.pop(tp, None)
        task.close()
        await self._checkpoints.release(key)

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        async with self._lock:
            self._fenced -= partitions
            await self._open_tasks(partitions)

    async def _open_tasks(self, partitions: frozenset[TopicPartition]) -> None:
        """Build the tasks of newly assigned partitions and restore their state (from their
        standbys, for those this worker stood by)."""
        started = time.monotonic()
        keys = sorted(
            {(self.topology.by_topic[tp.topic].index, tp.partition) for tp in partitions}
            - self._tasks.keys()
        )
        if not keys:
            return
        subs = self.topology.subtopologies
        inputs = [TopicPartition(t.name, p) for i, p in keys for t in subs[i].topics]
        await self._checkpoints.fence(keys)  # no earlier owner commits past what is read next
        committed = await self._log.committed_offsets(self.topology.group, inputs)
        # before the tasks open their local copies: the standbys close theirs
        handoffs = {} if self._standbys is None else await self._standbys.take(keys, committed)
        opened = []
        for key in keys:
            task = Task(
                self.topology,
                subs[key[0]],
                key[1],
                self._checkpoints.outbox(key),
                self._writers,
                self._stats,
                self._state_dir,
                clock=self._clock,
            )
            self._tasks[key] = task
            opened.append(task)
            if key in handoffs:
                task.state.warm_start(handoffs[key].warm)
        for task in opened:
            await task.restore(self._log, committed)
        for key, handoff in handoffs.items():
            self._took_over(key, handoff, time.monotonic() - started)

    def _took_over(self, key: TaskKey, handoff: Handoff, seconds: float) -> None:
        """Say that the task ``key`` started from its standby, how long the tasks opened with it
        took to start, how many changelog records its takeover read, and how many its restore
        did (none, when every store was warm)."""
        restored = self._tasks[key].state.restored
        message = (
            f"worker {self.index} took over task {key[0]}.{key[1]} from its standby in "
            f"{seconds * 1000:,.0f} ms: "
            f"{handoff.replayed:,} changelog records read at the takeover, "
            f"{restored:,} restored from the local copy and changelog"
        )
        self._standby_event(message)

    def _standby_event(self, message: str) -> None:
        _log.info(message)
        self._standby_events.append(message)

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        async with self._lock:
            self._fenced -= partitions
            if self.abandoned is None:
                await self._checkpoint(partitions)
            await self._close_tasks(partitions)

    async def _close_tasks(self, partitions: frozenset[TopicPartition]) -> None:
        still_owned = self._consumer.assignment() - partitions
        for key in list(self._tasks):
            sub_index, partition = key
            sub = self.topology.subtopologies[sub_index]
            if not any(TopicPartition(t.name, partition) in still_owned for t in sub.topics):
                self._tasks.pop(key).close()
                await self._checkpoints.release(key)

    def _hot_keys(self) -> list[PartitionKeys]:
        """The key load of every input partition of the worker's tasks."""
        return [
            sampler.report(tp.topic, tp.partition)
            for task in self._tasks.values()
            for tp, sampler in task.samplers.items()
        ]

    def _send_report(
        self, *, done: bool = False, hot_keys: list[PartitionKeys] | None = None
    ) -> None:
        if self._report is None:
            return
        self._report(
            WorkerReport(
                worker=self.index,
                steps={step_id: s.as_list() for step_id, s in self._stats.items()},
                partitions=sorted(str(tp) for tp in self._consumer.assignment()),
                records=self._records,
                pending=self.pending,
                done=done,
                first_errors={
                    step_id: s.first_error
                    for step_id, s in self._stats.items()
                    if s.first_error is not None
                },
                hot_keys=self._hot_keys() if hot_keys is None else hot_keys,
                standby_events=list(self._standby_events),
            )
        )
