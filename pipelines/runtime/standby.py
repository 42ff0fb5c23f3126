"""Standby replicas: a worker keeps warm copies of other workers' task state, so that the task
it takes over when their owner dies starts at once instead of reloading it.

A pipeline declared with ``standby_replicas=1`` has every worker stand by the tasks of another
one: which partitions a worker stands by comes from the group membership and assignment, the
same on every member (on the embedded log, :func:`~pipelines.log._local.standby_assignment`:
the tasks of the member before it in the sorted member list). For each such task the worker
keeps a :class:`StandbyTask`: per store of the task, the state read from its changelog, without
processing any input. A worker does this between its own batches, every
:data:`STANDBY_INTERVAL` seconds, reading at most :data:`STANDBY_BUDGET` changelog records.

What a standby applies follows the restore's rule (:meth:`KeyValueStore.apply
<pipelines.state.store.KeyValueStore.apply>` with the group's committed offsets): a changelog
record whose input was not committed is never applied. While it follows the changelog the
standby *waits* at the first such record (its input may be committed later: the owner writes
the changelog before it commits) instead of passing it by; under exactly-once it never even
reads one, since readers of a transactional changelog see committed records only.

Each standby store (:class:`WarmStore`) starts from the task's local copy, as a restore would,
then keeps:

- the whole state in memory (a :class:`~pipelines.state.store.KeyValueStore` of raw bytes),
  while it fits in ``HEADWATER_STATE_CACHE_KEYS``; a larger state stays in the copy, which the
  task reads as asked once it takes the store over, as it would after a restore;
- the changes the owner's local copy lacks: the last change of each key since the copy's offset
  (``base``), with the changelog offset of each, so that when the owner writes its copy (every
  10 s, or every checkpoint for a store larger than the cache) those it now holds are dropped.
  The task that takes the store over keeps them as changes its copy lacks, and writes them at
  its copy's usual time.

A worker opens at most one standby task per round (it reads the task's local copies: ~0.07 s
per 125,000 keys), so its own tasks go on in between, and none while it catches up (its last
poll filled a batch: after a rebalance, say) or waits for partitions handed over to it; it
keeps the standby of a partition assigned to it until it takes the partition over, while the
owner hands it over.

When the group gives the worker a task it stands by, :meth:`Standbys.take` reads what is left
of each changelog (with the committed offsets the task starts from, passing uncommitted records
by as a restore does), hands the stores over as :class:`~pipelines.runtime.state.WarmStart`
and reports how many records that took. The task then starts without reading its copy or the
changelog (:meth:`TaskState.restore <pipelines.runtime.state.TaskState.restore>`).

Standbys need a state directory (the local copies) and a consumer that knows its standby
partitions (:class:`StandbyConsumer`: the embedded and memory logs' group consumer). On Kafka a
member knows only its own assignment: the worker refuses to start (see :func:`standbys_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby, repeat
from pathlib import Path
from typing import Protocol, TypeVar, cast, runtime_checkable

import lmdb

from pipelines.errors import PipelineError
from pipelines.log.base import Consumer, FetchedBatch, LogBackend, RawBatch, TopicPartition
from pipelines.runtime.checkpoint import TaskKey
from pipelines.runtime.state import TaskState, WarmStart
from pipelines.runtime.topology import Topology
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore

__all__ = [
    "STANDBY_BUDGET",
    "STANDBY_INTERVAL",
    "Handoff",
    "StandbyConsumer",
    "StandbyTask",
    "Standbys",
    "WarmStore",
    "standbys_for",
]

STANDBY_INTERVAL = 0.1
"""Seconds between two rounds of reading the changelogs of the tasks a worker stands by."""
STANDBY_BUDGET = 50_000
"""Changelog records a worker reads per round, over the tasks it stands by."""
_TAKEOVER_CHUNK = 100_000
_T = TypeVar("_T")


@runtime_checkable
class StandbyConsumer(Protocol):
    """A consumer that knows which partitions its member stands by."""

    def standby_partitions(self) -> frozenset[TopicPartition]: ...

    def unclaimed(self) -> frozenset[TopicPartition]: ...


def standbys_for(
    topology: Topology, log: LogBackend, consumer: Consumer, state_dir: Path | None
) -> Standbys | None:
    """The standbys of a worker of ``topology``, if its pipeline asks for them and there is
    state to keep warm (in a state directory); an error where the log cannot have them."""
    if not topology.pipeline.standby_replicas or state_dir is None:
        return None
    if not isinstance(consumer, StandbyConsumer):
        raise PipelineError(
            f"pipeline {topology.pipeline.name!r} asks for standby_replicas="
            f"{topology.pipeline.standby_replicas}, but standby_replicas is supported on the "
            f"embedded log only, for now (not on {log.name}); declare it without "
            "standby_replicas to run it here"
        )
    return Standbys(topology, log, consumer, state_dir)


def _changes_store(name: str, partition: int) -> KeyValueStore:
    """A store that keeps what it applies as unsaved changes, tombstones included (an
    incomplete store without a copy): the last change of each key."""
    store = KeyValueStore(name, partition)
    store.complete = False
    return store


class WarmStore:
    """One store of a task on standby (see the module docstring)."""

    def __init__(
        self, name: str, partition: int, changelog: TopicPartition, copy: Path, cache: int
    ) -> None:
        self.changelog = changelog
        self._name = name
        self._partition = partition
        self._copy = LocalStore(copy)
        self._cache = cache
        self.full: KeyValueStore | None = None
        """The whole state, while it fits in the cache."""
        self.position = 0
        """The changelog offset the state reflects: where reading goes on."""
        self._base = 0
        self._changes = _changes_store(name, partition)
        self._changed_at: dict[bytes, int] = {}
        self.start()

    def start(self) -> None:
        """Start (again) from the local copy, as a restore would: all of it, if it fits in the
        cache; else the copy's offset only (the task reads the copy as asked)."""
        offset = self._read(LocalStore.offset)
        if offset is None or self._read(LocalStore.count) <= self._cache:
            entries, offset = self._read(LocalStore.load)
            self.full = KeyValueStore(self._name, self._partition, cache_keys=self._cache)
            self.full.load(entries)
        else:
            self.full = None
        self.position = self._base = offset
        self._changes = _changes_store(self._name, self._partition)
        self._changed_at = {}

    def follow(self, fetched: FetchedBatch, committed: Mapping[str, int], *, wait: bool) -> int:
        """Apply the committed records of ``fetched`` (read at :attr:`position`), a changelog
        batch at a time; how many. ``wait``: stop at the first record whose input is not
        committed (it may be later); else pass such records by, as a restore does."""
        records = fetched.records
        applied = start = 0
        headers = records.headers or [()] * len(records)
        for _, run in groupby(headers):
            stop = start + len(list(run))
            after = fetched.offsets[stop] if stop < len(records) else fetched.next_offset
            done = self._apply(_slice(records, start, stop), committed, after)
            if wait and not done:
                return applied
            applied += done
            self.position = after
            start = stop
        return applied

    def _apply(self, records: RawBatch, committed: Mapping[str, int], after: int) -> int:
        """Apply one changelog batch if its input is committed; how many records it applied
        (the rule of :meth:`KeyValueStore.apply`, judged by the store of changes)."""
        applied = self._changes.apply(records, committed)
        if not applied:
            return 0
        self._changed_at.update(zip(cast("list[bytes]", records.keys), repeat(after)))
        if self.full is not None:
            self.full.apply(records, committed)
            if self.full.over_cache:  # outgrew the cache: the copy holds the rest
                self.full = None
        return applied

    def prune(self) -> None:
        """Forget the changes the owner's copy now holds (see the module docstring)."""
        copied = self._read(LocalStore.offset)
        if copied is None or copied <= self._base:
            return
        self._base = copied
        kept = {key: at for key, at in self._changed_at.items() if at > copied}
        if len(kept) == len(self._changed_at):
            return
        changes = self._changes.unsaved()
        latest = dict(zip(cast("list[bytes]", changes.keys), changes.values, strict=True))
        keys: list[bytes | None] = list(kept)
        self._changes = _changes_store(self._name, self._partition)
        self._changes.apply(RawBatch(keys, [latest[k] for k in kept], [0] * len(keys)), {})
        self._changed_at = kept

    def _read(self, read: Callable[[LocalStore], _T]) -> _T:
        """``read`` the owner's local copy, opened again first if the owner made it outgrow
        the map this process has of it (LMDB's ``MDB_MAP_RESIZED``)."""
        try:
            return read(self._copy)
        except lmdb.MapResizedError:
            self._copy.close()
            self._copy = LocalStore(self._copy.path)
            return read(self._copy)

    def close(self) -> None:
        self._copy.close()

    def handoff(self) -> WarmStart:
        """The store as the task taking it over starts from."""
        self.prune()
        entries = None if self.full is None else dict(self.full.restored())
        return WarmStart(entries, self._changes.unsaved(), self._base, self.position)


@dataclass(frozen=True, slots=True)
class Handoff:
    """A task's stores as its standby hands them over."""

    replayed: int
    """Changelog records read at the takeover, after the standby's position."""
    warm: dict[str, WarmStart]


class StandbyTask:
    """The stores of one task on standby."""

    def __init__(self, topology: Topology, key: TaskKey, state_dir: Path) -> None:
        sub = topology.subtopologies[key[0]]
        self.warm = False
        """Whether it was read to the end of its changelogs once."""
        self.inputs = [TopicPartition(t.name, key[1]) for t in sub.topics]
        state = TaskState(topology, sub, key[1], state_dir)  # where its changelogs and copies are
        paths = {name: copy.path for name, copy in state.copies.items()}
        state.close()
        self.stores = {
            name: WarmStore(name, key[1], tp, paths[name], state.cache_keys)
            for name, tp in state.changelogs.items()
        }

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class Standbys:
    """The standby tasks of one worker (see the module docstring)."""

    def __init__(
        self, topology: Topology, log: LogBackend, consumer: StandbyConsumer, state_dir: Path
    ) -> None:
        self._topology = topology
        self._log = log
        self._consumer = consumer
        self._state_dir = state_dir
        self.tasks: dict[TaskKey, StandbyTask] = {}

    async def step(self, owned: Iterable[TaskKey], *, open_one: bool = True) -> list[TaskKey]:
        """One round: stand by the tasks the group says (but ``owned``, the worker's own),
        keeping those of partitions assigned to the worker and not handed over yet, opening
        at most one (it reads its local copies; none unless ``open_one``, nor while partitions
        are handed over to the worker), and read some of their changelogs; the tasks warm for
        the first time (read to the end)."""
        wanted = self._keys(self._consumer.standby_partitions()) - set(owned)
        awaited = self._keys(self._consumer.unclaimed())
        for key in self.tasks.keys() - wanted - awaited:
            self.tasks.pop(key).close()
        missing = sorted(wanted - self.tasks.keys())
        if missing and open_one and not awaited:  # (taking its own partitions comes first)
            self.tasks[missing[0]] = StandbyTask(self._topology, missing[0], self._state_dir)
        return await self._follow()

    def _keys(self, partitions: Iterable[TopicPartition]) -> set[TaskKey]:
        by_topic = self._topology.by_topic
        return {(by_topic[tp.topic].index, tp.partition) for tp in partitions}

    async def _follow(self) -> list[TaskKey]:
        """Read some of each standby store's changelog; the tasks warm for the first time."""
        stores = [store for task in self.tasks.values() for store in task.stores.values()]
        if not stores:
            return []
        inputs = [tp for task in self.tasks.values() for tp in task.inputs]
        committed = _by_name(await self._log.committed_offsets(self._topology.group, inputs))
        ends = await self._log.end_offsets([store.changelog for store in stores])
        budget = STANDBY_BUDGET
        for store in stores:
            end = ends[store.changelog]
            if store.position > end:  # the changelog was recreated: start again
                store.start()
            if store.position < end and budget > 0:
                fetched = await self._log.read(store.changelog, store.position, budget)
                budget -= len(fetched.records)
                if fetched.next_offset > store.position:
                    store.follow(fetched, committed, wait=True)
            store.prune()
        warmed = []
        for key, task in self.tasks.items():
            if not task.warm and all(s.position >= ends[s.changelog] for s in task.stores.values()):
                task.warm = True
                warmed.append(key)
        return warmed

    async def take(
        self, keys: Iterable[TaskKey], committed: Mapping[TopicPartition, int]
    ) -> dict[TaskKey, Handoff]:
        """Hand over the stores of the tasks of ``keys`` this worker stands by, read to the
        end of their changelogs with ``committed`` (the offsets the tasks start from)."""
        by_name = _by_name(committed)
        handoffs = {}
        for key in keys:
            task = self.tasks.pop(key, None)
            if task is None:
                continue
            replayed = 0
            ends = await self._log.end_offsets([s.changelog for s in task.stores.values()])
            for store in task.stores.values():
                replayed += await self._catch_up(store, ends[store.changelog], by_name)
            warm = {name: store.handoff() for name, store in task.stores.items()}
            task.close()  # (its local copies: the task opens them again)
            handoffs[key] = Handoff(replayed, warm)
        return handoffs

    async def _catch_up(self, store: WarmStore, end: int, committed: Mapping[str, int]) -> int:
        """Read ``store``'s changelog to ``end``; how many records that took."""
        read = 0
        while store.position < end:
            fetched = await self._log.read(store.changelog, store.position, _TAKEOVER_CHUNK)
            if fetched.next_offset <= store.position:
                break  # (a transaction not decided yet: the restore sees to it)
            read += len(fetched.records)
            store.follow(fetched, committed, wait=False)
        return read

    def close(self) -> None:
        for task in self.tasks.values():
            task.close()
        self.tasks.clear()


def _by_name(committed: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Committed offsets as :meth:`KeyValueStore.apply` takes them."""
    return {f"{tp.topic}/{tp.partition}": offset for tp, offset in committed.items()}


def _slice(records: RawBatch, start: int, stop: int) -> RawBatch:
    """The records ``start`` to ``stop`` of ``records``."""
    headers = None if records.headers is None else records.headers[start:stop]
    return RawBatch(
        records.keys[start:stop],
        records.values[start:stop],
        records.timestamps[start:stop],
        headers,
    )
