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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from pipelines.log.base import LogBackend, RawBatch, TopicPartition
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.topology import SubTopology, Topology
from pipelines.runtime.watermarks import MARKS_STORE
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore
from pipelines.state.table import TableStore
from pipelines.steps import HasStore, TableJoinStep

__all__ = ["TaskState"]

_RESTORE_CHUNK = 100_000


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
        self._unsaved: dict[str, RawBatch] = {}
        self.restored = 0
        self.tables: dict[str, TableStore] = {}
        """The table of each ``join_table`` step, bootstrapped from its topic in restore."""
        changelogs = {MARKS_STORE: topology.marks_changelogs[sub.index]}
        for step in sub.steps:
            if isinstance(step, TableJoinStep):
                self.tables[step.step_id] = TableStore(step.table, partition)
            if isinstance(step, HasStore):
                changelogs[step.step_id] = topology.changelog_topic(step.step_id)
        for name, topic in changelogs.items():
            self.stores[name] = KeyValueStore(name, partition)
            self._changelogs[name] = TopicPartition(topic.name, partition)
            if state_dir is not None:
                directory = name if name != MARKS_STORE else topic.name
                path = state_dir / topology.group / directory / f"{partition}.sqlite"
                self._local[name] = LocalStore(path)

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
            offset = 0
            local = self._local.get(step_id)
            if local is not None:
                entries, offset = local.load()
                if offset > ends[tp]:  # the changelog was recreated: the copy is of no use
                    local.reset()
                    entries, offset = {}, 0
                store.load(entries)
            copied = offset
            applied = 0
            while offset < ends[tp]:
                fetched = await log.read(tp, offset, _RESTORE_CHUNK)
                if fetched.next_offset <= offset:  # (a read in a repaired hole moves past it)
                    break
                applied += store.apply(fetched.records, by_name)
                offset = fetched.next_offset
            self.restored += applied
            if local is None or offset == copied:
                continue
            if applied:  # the copy must hold what it now claims to reflect
                local.replace(store.restored(), offset)
            else:  # nothing applied (uncommitted updates only): the copy just moves past them
                local.save(RawBatch([], [], []), offset)

    def flush(self, outbox: Outbox, positions: Mapping[TopicPartition, int]) -> None:
        """Queue every store's changes since the last flush for its changelog."""
        now_ms = int(time.time() * 1000)
        for step_id, store in self.stores.items():
            changes = store.changes(positions, now_ms)
            if changes is None:
                continue
            tp = self._changelogs[step_id]
            outbox.add_to_partition(tp.topic, tp.partition, changes)
            if step_id in self._local:
                _accumulate(self._unsaved, step_id, changes)

    async def persist(self, log: LogBackend) -> None:
        """Copy what the last checkpoint committed to local disk."""
        if not self._unsaved:
            return
        unsaved, self._unsaved = self._unsaved, {}
        ends = await log.end_offsets([self._changelogs[s] for s in unsaved])
        for step_id, changes in unsaved.items():
            self._local[step_id].save(changes, ends[self._changelogs[step_id]])

    def close(self) -> None:
        for local in self._local.values():
            local.close()


def _accumulate(unsaved: dict[str, RawBatch], step_id: str, changes: RawBatch) -> None:
    earlier = unsaved.get(step_id)
    if earlier is None:
        unsaved[step_id] = changes.copy()
    else:
        earlier.extend(changes)
