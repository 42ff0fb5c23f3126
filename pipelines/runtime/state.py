"""The state of one task: its stores, restored before the task processes anything, turned into
changelog batches at each checkpoint, and copied to local disk once the checkpoint committed.

Checkpoint order (the worker drives it): ``flush`` (changelog batches into the outbox) ->
producer flush -> commit input offsets -> ``persist`` (the local copy). See
:mod:`pipelines.state.store` for why a restore skips updates whose input was never committed.

Restore, per store: the local copy, if there is one, becomes the store's state as it is loaded
(raw bytes, decoded when first read); then the changelog after the copy's offset is read in
chunks of ``_RESTORE_CHUNK`` records, each applied a changelog batch's run of records at a time
(:meth:`~pipelines.state.store.KeyValueStore.apply`), so memory ends up holding the last
committed value of each key and the replayed records are not kept. If the replay applied
anything, the copy is then rewritten whole from the store's state
(:meth:`~pipelines.state.local.LocalStore.replace`: packed parts, one transaction), which costs
about 0.1 s per 500,000 keys where upserting the replayed records row by row cost 1-3 s; a fresh
worker (an empty state directory) builds its copy that way. A restore killed before that write
leaves the copy as it was, and the next restore replays the same records again.

A store larger than ``HEADWATER_STATE_CACHE_KEYS`` entries (:class:`~pipelines.settings.
StateSettings`) keeps only that many in memory over its local copy (see
:mod:`pipelines.state.store`): a restore then loads no more than that (a larger copy is read
key by key as the task asks), and a replay that outgrows it goes into the copy chunk by chunk,
each chunk written with the offset after it.

The copy is written at a checkpoint (``persist``) when the store is over its cache (it must be,
before it evicts), when the task's partitions are handed over (a rebalance, a stop), and at
least every ``HEADWATER_STATE_COPY_INTERVAL`` seconds otherwise: 0 by default, so at every
checkpoint (see :class:`~pipelines.settings.StateSettings`); a crash replays the changelog
written since. The marks store is copied every ``_MARKS_COPY_INTERVAL`` (10 s) instead,
whatever the setting: its copy at every checkpoint was half of a stateless worker's checkpoint.
A copy claims the changelog offset read right after the checkpoint that last committed the
store's changes, whenever it is written (see :meth:`TaskState.persist`). Each write holds the
latest value of every key changed since the last one: at 1M keys, where each record changes
another key, writing the copy at every checkpoint (0.5 s) cost ~1.4 µs a record in LMDB (~3 µs
in SQLite before it), most of the CPU a record may take, while a key changed many times between
two writes is written once.

A task taken over from a standby (:mod:`pipelines.runtime.standby`) is given a
:class:`WarmStart` per store before its restore (:meth:`TaskState.warm_start`): the whole state
(when it fits in the cache; else the copy is read as asked), read from the changelog to its end,
and the changes the local copy lacks. The store takes those over as its unsaved changes, so the
next write of the copy (at its usual time, not in the takeover) writes them with everything
since, and the restore reads nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.log.base import LogBackend, RawBatch, TopicPartition
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.topology import SubTopology, Topology
from pipelines.runtime.watermarks import MARKS_STORE
from pipelines.settings import StateSettings
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore
from pipelines.state.table import TableStore
from pipelines.steps import HasStore, TableJoinStep

__all__ = ["TaskState", "WarmStart"]

_RESTORE_CHUNK = 100_000
_MARKS_COPY_INTERVAL = 10.0
"""Seconds between two copies of the marks store at the most, whatever the copy interval (it
is also copied when the task's partitions are handed over). Its changelog gets a record or two a
checkpoint, so a crash replays a few dozen; a copy at every checkpoint cost one ``fdatasync`` a
task, about half of a stateless worker's checkpoint (0.2 ms a task of 1.6 ms for four, at
680,000 records/s), during which the input waited."""


@dataclass(frozen=True, slots=True)
class WarmStart:
    """One store as a standby kept it, handed to the task that takes the store over."""

    entries: dict[bytes, bytes] | None
    """The whole state as raw changelog bytes (None: larger than the cache, so the store reads
    its local copy as asked, with ``changes`` over it)."""
    changes: RawBatch
    """The last change of each key changed since ``base`` (None values delete)."""
    base: int
    """A changelog offset at or below the local copy's: the copy lacks at most ``changes``."""
    position: int
    """The changelog offset the state reflects."""


class TaskState:
    """The stores of the stateful steps of one task, and the store of its input marks
    (:data:`~pipelines.runtime.watermarks.MARKS_STORE`)."""

    def __init__(
        self, topology: Topology, sub: SubTopology, partition: int, state_dir: Path | None
    ) -> None:
        self.partition = partition
        self.stores: dict[str, KeyValueStore] = {}
        self._changelogs: dict[str, TopicPartition] = {}
        self._local: dict[str, LocalStore] = {}
        settings = StateSettings()
        self._cache_keys = settings.cache_keys
        self._copy_interval = settings.copy_interval
        self._next_copy = 0.0  # (monotonic) when the copies are written at the latest
        self._next_marks_copy = 0.0  # (monotonic) the same for the marks store
        self._flushed: set[str] = set()
        """The stores whose changes went into the checkpoint under way (:meth:`flush`)."""
        self._copy_offset: dict[str, int] = {}
        """The changelog offset each store's unsaved changes reach: its changelog's end read
        right after the last checkpoint that committed changes of the store (see
        :meth:`persist`)."""
        self.restored = 0
        self._warm: dict[str, WarmStart] = {}
        self.tables: dict[str, TableStore] = {}
        """The table of each ``join_table`` step, bootstrapped from its topic in restore."""
        changelogs = {MARKS_STORE: topology.marks_changelogs[sub.index]}
        for step in sub.steps:
            if isinstance(step, TableJoinStep):
                self.tables[step.step_id] = TableStore(step.table, partition)
            if isinstance(step, HasStore):
                changelogs[step.step_id] = topology.changelog_topic(step.step_id)
        for name, topic in changelogs.items():
            self._changelogs[name] = TopicPartition(topic.name, partition)
            local = None
            if state_dir is not None:
                directory = name if name != MARKS_STORE else topic.name
                path = state_dir / topology.group / directory / f"{partition}.lmdb"
                local = self._local[name] = LocalStore(path)
            self.stores[name] = KeyValueStore(
                name, partition, backing=local, cache_keys=self._cache_keys
            )

    async def restore(self, log: LogBackend, committed: Mapping[TopicPartition, int]) -> None:
        """Load each store: its local copy, then the changelog after it (committed updates);
        read each table from its topic, start to end. A copy the replay changed is then
        rewritten whole from the store (see the module docstring)."""
        for table in self.tables.values():
            await table.bootstrap(log)
        if not self.stores:
            return
        by_name = {f"{tp.topic}/{tp.partition}": offset for tp, offset in committed.items()}
        ends = await log.end_offsets(list(self._changelogs.values()))
        for step_id, store in self.stores.items():
            tp = self._changelogs[step_id]
            local = self._local.get(step_id)
            if self._adopt(step_id, store, ends[tp]):
                continue
            offset = 0 if local is None else self._open_copy(local, store, ends[tp])
            copied = offset
            applied = 0
            while offset < ends[tp]:
                fetched = await log.read(tp, offset, _RESTORE_CHUNK)
                if fetched.next_offset <= offset:  # (a read in a repaired hole moves past it)
                    break
                applied += store.apply(fetched.records, by_name)
                offset = fetched.next_offset
                if local is not None and not store.complete:  # the replay goes to the copy
                    local.save(store.unsaved(), offset)
                    store.saved()
                elif local is not None and store.over_cache:  # outgrew memory: so far, whole
                    local.replace(store.restored(), offset)
                    store.saved()
            self.restored += applied
            if local is None or offset == copied or not store.complete:
                continue
            if applied:  # the copy must hold what it now claims to reflect
                local.replace(store.restored(), offset)
            else:  # nothing applied (uncommitted updates only): the copy just moves past them
                local.save(RawBatch([], [], []), offset)

    @property
    def changelogs(self) -> Mapping[str, TopicPartition]:
        """The changelog partition of each store."""
        return self._changelogs

    @property
    def copies(self) -> Mapping[str, LocalStore]:
        """The local copy of each store (none without a state directory)."""
        return self._local

    @property
    def cache_keys(self) -> int:
        """At most this many entries of a store stay in memory."""
        return self._cache_keys

    def warm_start(self, stores: Mapping[str, WarmStart]) -> None:
        """Start these stores from a standby's at the next :meth:`restore`."""
        self._warm = dict(stores)

    def _adopt(self, step_id: str, store: KeyValueStore, end: int) -> bool:
        """Start ``store`` from its :class:`WarmStart`, if it has one that reflects the whole
        changelog (``end``) and changes that cover what its copy lacks; whether it did."""
        warm = self._warm.pop(step_id, None)
        local = self._local.get(step_id)
        if warm is None or local is None or warm.position != end:
            return False
        copied = local.offset()
        if copied is None:
            local.reset()  # nothing trusted: the changes are the whole state
            copied = 0
        if not warm.base <= copied <= end:
            return False
        if warm.entries is None:
            self._open_copy(local, store, end)
        # the changes become the store's unsaved ones (an incomplete store takes what it
        # applies as such, and drops them from its restored entries), then the entries come in
        complete, store.complete = store.complete, False
        store.apply(warm.changes, {})
        store.complete = complete
        if warm.entries is not None:
            store.load(warm.entries)
        elif complete:
            changed = zip(warm.changes.keys, warm.changes.values, strict=True)
            store.load({k: v for k, v in changed if k is not None and v is not None})
        # the copy is due when it would have been for the owner, not in the takeover
        self._next_copy = time.monotonic() + self._copy_interval
        self._copy_offset[step_id] = end  # what the changes taken over reach
        return True

    def _open_copy(self, local: LocalStore, store: KeyValueStore, end: int) -> int:
        """Start ``store`` from its copy: all of it, if it fits in the cache, else none (read
        as asked); the changelog offset to replay from."""
        offset = local.offset()
        if offset is None:
            return 0
        if offset > end:  # the changelog was recreated: the copy is of no use
            local.reset()
            return 0
        if local.count() <= self._cache_keys:
            store.load(local.load()[0])
        else:
            store.complete = False
        return offset

    def flush(self, outbox: Outbox, positions: Mapping[TopicPartition, int]) -> None:
        """Queue every store's changes since the last flush for its changelog."""
        now_ms = int(time.time() * 1000)
        for step_id, store in self.stores.items():
            changes = store.changes(positions, now_ms)
            if changes is None:
                continue
            tp = self._changelogs[step_id]
            outbox.add_to_partition(tp.topic, tp.partition, changes)
            self._flushed.add(step_id)

    async def persist(self, log: LogBackend, *, final: bool = False) -> None:
        """Copy what the last checkpoint committed to local disk, where it is due (see the
        module docstring; ``final``: the task's partitions are being handed over).

        A copy claims the changelog offset its changes reach: the changelog's end read right
        after the checkpoint that last committed changes of the store, never the end when the
        copy is written. A checkpoint with nothing new commits nothing, so even a task whose
        partitions went to a newer owner (a zombie, on Kafka) gets through it; by then that
        owner may have written to the changelog, and a copy claiming the end would hide its
        records from the next restore. (With copies written a while after the commit, ``kill
        -9`` chaos runs under exactly-once failed that way: counts rolled back.)"""
        flushed, self._flushed = self._flushed & self._local.keys(), set()
        if flushed:
            ends = await log.end_offsets([self._changelogs[s] for s in flushed])
            for step_id in flushed:
                self._copy_offset[step_id] = ends[self._changelogs[step_id]]
        now = time.monotonic()
        periodic = now >= self._next_copy
        marks_periodic = now >= self._next_marks_copy
        due = [
            step_id
            for step_id, store in self.stores.items()
            if step_id in self._local
            and store.has_unsaved
            and (
                final
                or store.over_cache
                or (marks_periodic if step_id == MARKS_STORE else periodic)
            )
        ]
        if periodic:
            self._next_copy = now + self._copy_interval
        if marks_periodic:
            self._next_marks_copy = now + _MARKS_COPY_INTERVAL
        for step_id in due:
            store = self.stores[step_id]
            self._local[step_id].save(store.unsaved(), self._copy_offset[step_id])
            store.saved()

    def close(self) -> None:
        for local in self._local.values():
            local.close()
