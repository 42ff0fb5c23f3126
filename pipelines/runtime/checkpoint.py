"""A worker's checkpoint: how the work of its tasks becomes durable, **in this order** (the one
place the order is stated; everything else links here):

1. each task writes its watermark markers (when its mark moved) and its state changes (the
   changelog batches of its stores) into its outbox;
2. the sink writers flush (sinks outside the log: files, stdout, databases);
3. the outboxes are sent and the input offsets after the processed batches committed, as the
   guarantee says:

   * :class:`AtLeastOnce` sends the worker's one outbox, flushes the producer (every record is
     acknowledged), and only then commits the offsets. A crash before the commit replays from
     the last one: nothing is lost, a replayed record may be written twice.
   * :class:`ExactlyOnce` gives each task an outbox of its own on a transactional producer
     named after the group, sub-topology and partition (a newer owner fences a zombie), and
     commits the task's outputs, changelog records and offsets in one transaction: a crash
     replays only what no transaction committed, and nothing written twice is ever visible.

4. each task copies its committed state to local disk where that is due (:meth:`TaskState.persist
   <pipelines.runtime.state.TaskState.persist>`: always when its partitions are handed over):
   the copy never holds state whose input was not committed.

A task whose transaction a newer owner fenced is reported back to the worker, which drops it
(see :meth:`Worker._drop_fenced <pipelines.runtime.worker.Worker._drop_fenced>`). A task's new
owner fences the earlier one before it reads the offsets it resumes from and restores its state
(:meth:`Checkpoint.fence`), so that nothing commits past them meanwhile.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from connectors.base import SinkWriter
from pipelines.errors import FencedError
from pipelines.log.base import Consumer, LogBackend, TopicPartition, TransactionalProducer
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.task import Task

__all__ = ["AtLeastOnce", "Checkpoint", "ExactlyOnce", "Fenced", "TaskKey", "checkpoint_for"]

TaskKey = tuple[int, int]
"""(sub-topology index, partition) of a task."""
Fenced = list[tuple[TaskKey, FencedError]]
"""The tasks a newer owner fenced, with the error that said so."""


class Checkpoint(ABC):
    """Makes the work of a worker's tasks durable (see the module docstring for the order)."""

    def __init__(self, log: LogBackend) -> None:
        self._log = log

    async def fence(self, keys: Iterable[TaskKey]) -> None:
        """Before the tasks ``keys`` read the offsets they resume from and restore their state:
        make sure no earlier owner can commit for them any more (see
        :meth:`~pipelines.log.base.TransactionalProducer.fence`). At-least-once has nothing to
        fence: a replayed record may be written twice anyway."""
        del keys

    @abstractmethod
    def outbox(self, key: TaskKey) -> Outbox:
        """Where the task ``key``, being opened, writes what it produces."""

    @abstractmethod
    async def send(self, tasks: Mapping[TaskKey, Task]) -> Fenced:
        """Send what the tasks produced so far (between checkpoints, so that batches go out
        as they are made); not yet durable or committed."""

    @abstractmethod
    async def _commit(
        self,
        tasks: Mapping[TaskKey, Task],
        positions: dict[TopicPartition, int],
        partitions: frozenset[TopicPartition] | None,
    ) -> Fenced:
        """Step 3: send the outboxes of ``tasks`` and commit the offsets in ``positions``
        (those of ``partitions``, if given), removing the committed ones from it."""

    async def run(
        self,
        tasks: Mapping[TaskKey, Task],
        positions: dict[TopicPartition, int],
        writers: Iterable[SinkWriter],
        now_ms: int,
        partitions: frozenset[TopicPartition] | None = None,
    ) -> Fenced:
        """Checkpoint ``tasks`` (those of ``partitions``, which are being handed over, if
        given): steps 1 to 4 of the module docstring."""
        for task in tasks.values():
            task.checkpoint_marks(now_ms, handing_over=partitions is not None)
            task.state.flush(task.outbox, task.positions)
        for writer in writers:
            await writer.flush()
        fenced = await self._commit(tasks, positions, partitions)
        gone = {key for key, _ in fenced}
        for key, task in tasks.items():
            if key not in gone:
                await task.state.persist(self._log, final=partitions is not None)
        return fenced

    async def release(self, key: TaskKey) -> None:
        """The task ``key`` closed: let go of what was its own."""
        del key

    @abstractmethod
    async def close(self) -> None:
        """The worker leaves: close the producers."""


class AtLeastOnce(Checkpoint):
    """One outbox for every task; offsets committed once the producer has flushed."""

    def __init__(self, log: LogBackend, consumer: Consumer) -> None:
        super().__init__(log)
        self._producer = log.producer()
        self._outbox = Outbox(self._producer)
        self._consumer = consumer

    def outbox(self, key: TaskKey) -> Outbox:
        return self._outbox

    async def send(self, tasks: Mapping[TaskKey, Task]) -> Fenced:
        await self._outbox.send()
        return []

    async def _commit(
        self,
        tasks: Mapping[TaskKey, Task],
        positions: dict[TopicPartition, int],
        partitions: frozenset[TopicPartition] | None,
    ) -> Fenced:
        await self._outbox.send()
        await self._producer.flush()
        chosen = {
            tp: offset for tp, offset in positions.items() if partitions is None or tp in partitions
        }
        if chosen:
            await self._consumer.commit(chosen)
            for tp in chosen:
                del positions[tp]
        return []

    async def close(self) -> None:
        await self._producer.close()


class ExactlyOnce(Checkpoint):
    """An outbox and a transaction per task; each task's outputs, changelog records and
    offsets commit together."""

    def __init__(self, log: LogBackend, group: str) -> None:
        super().__init__(log)
        self._group = group
        self._transactions: dict[TaskKey, TransactionalProducer] = {}

    async def fence(self, keys: Iterable[TaskKey]) -> None:
        for key in keys:
            await self._transaction(key).fence()

    def outbox(self, key: TaskKey) -> Outbox:
        return Outbox(self._transaction(key))

    def _transaction(self, key: TaskKey) -> TransactionalProducer:
        """The task's transactional producer (made the first time it is asked for)."""
        producer = self._transactions.get(key)
        if producer is None:
            producer = self._log.transactional_producer(f"{self._group}.{key[0]}.{key[1]}")
            self._transactions[key] = producer
        return producer

    async def send(self, tasks: Mapping[TaskKey, Task]) -> Fenced:
        fenced: Fenced = []
        for key, task in tasks.items():
            try:
                await task.outbox.send()
            except FencedError as error:
                fenced.append((key, error))
        return fenced

    async def _commit(
        self,
        tasks: Mapping[TaskKey, Task],
        positions: dict[TopicPartition, int],
        partitions: frozenset[TopicPartition] | None,
    ) -> Fenced:
        fenced: Fenced = []
        for key, task in tasks.items():
            done = {tp: positions.pop(tp) for tp in task.partitions & positions.keys()}
            try:
                await task.outbox.send()
                await self._transactions[key].commit(done, self._group)
            except FencedError as error:
                fenced.append((key, error))
        return fenced

    async def release(self, key: TaskKey) -> None:
        transaction = self._transactions.pop(key, None)
        if transaction is not None:
            await transaction.close()

    async def close(self) -> None:
        for key in list(self._transactions):
            await self.release(key)


def checkpoint_for(log: LogBackend, consumer: Consumer, group: str, guarantee: str) -> Checkpoint:
    """The checkpoint of a pipeline's ``processing_guarantee``."""
    if guarantee == "exactly_once":
        return ExactlyOnce(log, group)
    return AtLeastOnce(log, consumer)
