"""Standby tasks (:mod:`pipelines.runtime.standby`) in one process, on the embedded log: what a
standby applies (committed changelog records only; it waits at the others), and that a task
taken over from its standby has the state a restore gives, reads nothing at its restore, and
leaves a local copy that a later restore trusts. The kill test is
tests/chaos/test_standby.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from connectors.memory import Collect, Iterable
from pipelines import Pipeline, Topic
from pipelines.errors import PipelineError
from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.standby import Standbys, WarmStore, standbys_for
from pipelines.runtime.state import TaskState
from pipelines.runtime.topology import Topology, compile_pipeline

INPUT = TopicPartition("in", 0)
TASK = (0, 0)


def counting(standby_replicas: int = 1) -> Topology:
    pipeline = (
        Pipeline("standby", standby_replicas=standby_replicas)
        .source(Iterable([]), into=Topic("in", partitions=1))
        .count("n")
        .sink(Collect())
    )
    return compile_pipeline(pipeline)


class StandbyMember:
    """The consumer of a member that stands by partition 0 of ``in``."""

    def standby_partitions(self) -> frozenset[TopicPartition]:
        return frozenset({INPUT})

    def unclaimed(self) -> frozenset[TopicPartition]:
        return frozenset()


class Owner:
    """The task's owner, writing its changelog and committing its input as a worker does (in
    another process, as far as the local copy goes: one process opens a copy once, so an owner
    here has one, ``state_dir``, only while no standby has it open)."""

    def __init__(self, topology: Topology, log: EmbeddedLog, state_dir: Path | None) -> None:
        self.topology, self.log = topology, log
        self.state = TaskState(topology, topology.subtopologies[0], 0, state_dir)
        self.store = self.state.stores["n"]
        self.producer = log.producer()
        self.outbox = Outbox(self.producer)

    async def checkpoint(self, position: int, changes: dict[str, Any], *, commit: bool) -> None:
        """Change the store as if input up to ``position`` was processed; write the changelog;
        commit the input (else: the owner dies before its commit)."""
        for key, value in changes.items():
            if value is None:
                self.store.delete(key)
            else:
                self.store.put(key, value)
        self.state.flush(self.outbox, {INPUT: position})
        await self.outbox.send()
        await self.producer.flush()
        if commit:
            self.log.store_offsets(self.topology.group, {INPUT: position})


async def restored(topology: Topology, log: EmbeddedLog, state_dir: Path) -> TaskState:
    state = TaskState(topology, topology.subtopologies[0], 0, state_dir)
    await state.restore(log, await log.committed_offsets(topology.group, [INPUT]))
    return state


def store_entries(state: TaskState) -> dict[Any, Any]:
    return dict(state.stores["n"].items())


async def test_a_task_taken_over_from_its_standby_starts_with_the_state_of_a_restore(
    tmp_path: Path,
) -> None:
    topology = counting()
    log = EmbeddedLog(tmp_path / "log")
    state_dir = tmp_path / "state"
    await prepare_topics(log, topology)
    first = Owner(topology, log, state_dir)
    await first.checkpoint(2, {"a": 1, "b": 1}, commit=True)
    await first.state.persist(log, final=True)  # the copy: a=1, b=1
    first.state.close()
    owner = Owner(topology, log, None)
    standbys = Standbys(topology, log, StandbyMember(), state_dir)
    assert await standbys.step([]) == [TASK]  # opened from the copy, read to the end: warm
    await owner.checkpoint(5, {"a": 2, "b": None, "c": 1}, commit=True)
    await owner.checkpoint(7, {"c": 2, "d": 1}, commit=False)  # then the owner dies
    await standbys.step([])
    changelog = owner.state.changelogs["n"]
    warm = standbys.tasks[TASK].stores["n"]
    assert warm.position == 2 + 3  # waits at the batch whose input is not committed
    owner.state.close()

    committed = await log.committed_offsets(topology.group, [INPUT])
    handoff = (await standbys.take([TASK], committed))[TASK]
    assert handoff.replayed == 2  # the uncommitted batch, passed by as a restore does
    assert not standbys.tasks
    taken = TaskState(topology, topology.subtopologies[0], 0, state_dir)
    taken.warm_start(handoff.warm)
    await taken.restore(log, committed)
    assert taken.restored == 0  # nothing read from the copy or the changelog
    assert store_entries(taken) == {"a": 2, "c": 1}
    reference = await restored(topology, log, tmp_path / "elsewhere")  # the changelog alone
    assert store_entries(reference) == store_entries(taken)

    await taken.persist(log, final=True)  # the copy gets the changes it lacked
    taken.close()
    again = await restored(topology, log, state_dir)
    assert again.restored == 0  # the copy is trusted as of the changelog's end
    assert store_entries(again) == {"a": 2, "c": 1}
    assert (await log.end_offsets([changelog]))[changelog] == 7
    for state in (reference, again):
        state.close()
    await log.close()


async def test_a_standby_applies_a_batch_once_its_input_is_committed(tmp_path: Path) -> None:
    topology = counting()
    log = EmbeddedLog(tmp_path / "log")
    state_dir = tmp_path / "state"
    await prepare_topics(log, topology)
    owner = Owner(topology, log, None)
    standbys = Standbys(topology, log, StandbyMember(), state_dir)
    assert await standbys.step([]) == [TASK]  # an empty changelog: warm at once
    warm = standbys.tasks[TASK].stores["n"]
    await owner.checkpoint(3, {"a": 1}, commit=False)  # written, its commit to come
    await standbys.step([])
    assert warm.position == 0  # it waits at the batch
    log.store_offsets(topology.group, {INPUT: 3})
    await standbys.step([])
    assert warm.position == 1
    assert warm.handoff().entries == {b'"a"': b"1"}
    owner.state.close()
    standbys.close()
    await log.close()


async def test_standbys_are_refused_where_the_log_cannot_have_them(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    with pytest.raises(PipelineError, match="supported on the embedded log only, for now"):
        standbys_for(counting(), log, object(), tmp_path)  # type: ignore[arg-type]
    consumer = log.consumer("standby")
    assert standbys_for(counting(standby_replicas=0), log, consumer, tmp_path) is None
    assert standbys_for(counting(), log, consumer, None) is None  # in memory: nothing to warm
    await log.close()


def test_a_standby_reads_a_copy_its_owner_made_outgrow_the_map_it_opened(tmp_path: Path) -> None:
    """LMDB refuses a reader whose map the file outgrew (``MDB_MAP_RESIZED``): the standby
    opens the copy again."""
    copy = tmp_path / "0.lmdb"
    warm = WarmStore("n", 0, TopicPartition("changelog", 0), copy, 1_000_000)
    grow = textwrap.dedent(
        f"""
        from pathlib import Path
        from pipelines.state.local import LocalStore
        owner = LocalStore(Path({str(copy)!r}))
        owner.replace({{b"k%d" % i: b"v" * 200 for i in range(400_000)}}, 7)
        owner.close()
        """
    )
    subprocess.run([sys.executable, "-c", grow], check=True)  # another process: 90 MB
    assert copy.stat().st_size > 64 << 20  # more than the map the standby opened
    warm.start()
    assert warm.position == 7
    assert len(warm.handoff().entries or {}) == 400_000
    warm.close()
