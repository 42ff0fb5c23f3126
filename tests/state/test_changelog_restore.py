"""Restoring from the changelog: the last committed value of each key, whatever the runs of
headers, tombstones and uncommitted updates, chunk boundaries, local copies and a cache smaller
than the state; and a local copy that a kill -9 interrupted while it was being written is not
trusted."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from connectors import JsonLines, LogTopic
from pipelines import Pipeline, Topic
from pipelines.log import EmbeddedLog
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.runtime import state as task_state
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.state import TaskState
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watermarks import MARKS_STORE
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore, encode_key

INPUTS = [TopicPartition("orders", 0), TopicPartition("orders", 1)]
KEYS: list[Any] = [f"k{n}" for n in range(30)] + [("w", n * 60_000) for n in range(10)]

Changelog = list[tuple[dict[TopicPartition, int], RawBatch]]


def write_changes(store: KeyValueStore, rng: random.Random, batches: int) -> Changelog:
    """``batches`` changelog batches of ``store``: random puts and deletes, each batch
    reflecting random positions on the two inputs."""
    changelog = []
    for _ in range(batches):
        for _ in range(rng.randint(1, 30)):
            key = rng.choice(KEYS)
            if rng.random() < 0.25:
                store.delete(key)
            else:
                store.put(key, rng.randint(0, 1000))
        positions = {tp: rng.randint(0, 100) for tp in INPUTS}
        batch = store.changes(positions, now_ms=0)
        assert batch is not None
        changelog.append((positions, batch))
    return changelog


def committed_state(changelog: Changelog, committed: dict[TopicPartition, int]) -> dict[Any, Any]:
    """Record by record: one whose positions are all committed sets its key (or deletes it)."""
    state: dict[bytes, bytes] = {}
    for positions, batch in changelog:
        if any(offset > committed.get(tp, 0) for tp, offset in positions.items()):
            continue
        for key, value in zip(batch.keys, batch.values, strict=True):
            assert key is not None
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
    restored = KeyValueStore("reference", 0)
    restored.load(state)
    return dict(restored.items())


def by_name(committed: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}/{tp.partition}": offset for tp, offset in committed.items()}


def as_read(changelog: Changelog, rng: random.Random, *, shared: bool) -> list[RawBatch]:
    """The changelog as a restore reads it: cut into chunks anywhere (inside batches too), each
    record's header the one object of its batch (``shared``) or an equal copy of its own (as a
    frame that stores headers record by record decodes them)."""
    stream = RawBatch([], [], [], [])
    for _, batch in changelog:
        stream.extend(batch)
    if not shared:
        stream.headers = [tuple(list(header)) for header in stream.headers or []]
    cuts = sorted(rng.sample(range(1, len(stream)), 12))
    return [stream.take(range(a, b)) for a, b in pairwise([0, *cuts, len(stream)])]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_apply_keeps_the_last_committed_value_of_each_key(seed: int, shared: bool) -> None:
    rng = random.Random(seed)
    changelog = write_changes(KeyValueStore("count", 0), rng, 40)
    committed = {tp: rng.randint(30, 100) for tp in INPUTS}
    store = KeyValueStore("count", 0)
    applied = sum(
        store.apply(chunk, by_name(committed)) for chunk in as_read(changelog, rng, shared=shared)
    )
    expected = committed_state(changelog, committed)
    assert dict(store.items()) == expected
    assert len(store) == len(expected)
    kept = [b for p, b in changelog if all(o <= committed[tp] for tp, o in p.items())]
    assert applied == sum(len(b) for b in kept)
    assert 0 < len(kept) < len(changelog)  # (the seeds mix committed and uncommitted runs)


def test_apply_takes_records_without_headers_and_leaves_keyless_ones_out() -> None:
    store = KeyValueStore("count", 0)
    batch = RawBatch([b'"a"', None, b'"b"', b'"a"'], [b"1", b"2", b"3", None], [0] * 4)
    assert store.apply(batch, {}) == 3
    assert dict(store.items()) == {"b": 3}


def test_a_tombstone_then_a_value_in_one_run_keeps_the_value() -> None:
    before = KeyValueStore("count", 0)
    before.put("a", 1)
    written = before.changes({INPUTS[0]: 1}, now_ms=0)
    assert written is not None and written.headers is not None
    batch = RawBatch(
        [b'"a"', b'"a"', b'"b"', b'"b"'], [None, b"2", b"3", None], [0] * 4, written.headers * 4
    )
    store = KeyValueStore("count", 0)
    store.load({b'"b"': b"9"})
    assert store.apply(batch, {"orders/0": 1}) == 4
    assert dict(store.items()) == {"a": 2}


# -- through TaskState, with and without local copies ----------------------------------------


class Restores:
    """A count's changelog on an embedded log, written batch by batch, and restores of its
    partition 0 (as new owners of it, sharing one state directory)."""

    def __init__(self, tmp_path: Path, log: EmbeddedLog) -> None:
        pipeline = (
            Pipeline("restore-runs")
            .source(JsonLines(tmp_path / "events.jsonl"), into=Topic("events", partitions=1))
            .key_by("by-user", lambda e: e["user"])
            .count("count")
            .sink(LogTopic(Topic("counts", partitions=1)))
        )
        self.topology = compile_pipeline(pipeline)
        self.sub = self.topology.by_topic["restore-runs.by-user"]
        self.log = log
        self.outbox = Outbox(log.producer())
        self.state_dir = tmp_path / "state"
        self.rng = random.Random(3)
        self._writer = KeyValueStore("count", 0)
        self.changelog: Changelog = []

    async def write(self, batches: int) -> None:
        written = write_changes(self._writer, self.rng, batches)
        for _, batch in written:
            self.outbox.add_to_partition(self.topology.changelog_topic("count").name, 0, batch)
            await self.outbox.send()
        self.changelog += written

    async def restored(self, committed: dict[TopicPartition, int], *, copy: bool) -> TaskState:
        state = TaskState(self.topology, self.sub, 0, self.state_dir if copy else None)
        await state.restore(self.log, committed)
        return state


@pytest.fixture(params=[None, 7], ids=["cache-all", "cache-7"])
async def restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Restores]:
    """Small restore chunks, so that a few hundred records cross every boundary; a cache that
    holds every key, or 7 of the 40 (the replay and the copy then go to disk chunk by chunk)."""
    monkeypatch.setattr(task_state, "_RESTORE_CHUNK", 37)
    if request.param is not None:
        monkeypatch.setenv("HEADWATER_STATE_CACHE_KEYS", str(request.param))
    monkeypatch.setenv("HEADWATER_STATE_COPY_INTERVAL", "0")
    log = EmbeddedLog(tmp_path / "log")
    made = Restores(tmp_path, log)
    await prepare_topics(log, made.topology)
    try:
        yield made
    finally:
        await log.close()


async def test_a_restore_with_local_copies_equals_the_committed_changelog(
    restores: Restores,
) -> None:
    """Into memory; as a fresh worker (an empty state directory: it writes its copy); from that
    copy alone (nothing to replay); from the copy and a tail of the changelog."""
    await restores.write(60)
    committed = {tp: 60 for tp in INPUTS}
    expected = committed_state(restores.changelog, committed)
    assert len(expected) > 0

    into_memory = await restores.restored(committed, copy=False)
    assert dict(into_memory.stores["count"].items()) == expected
    into_memory.close()
    fresh = await restores.restored(committed, copy=True)
    assert fresh.restored > 0
    assert dict(fresh.stores["count"].items()) == expected
    fresh.close()

    again = await restores.restored(committed, copy=True)
    assert again.restored == 0
    assert dict(again.stores["count"].items()) == expected
    again.close()

    await restores.write(30)
    tail = await restores.restored(committed, copy=True)
    assert 0 < tail.restored < sum(len(b) for _, b in restores.changelog)
    assert dict(tail.stores["count"].items()) == committed_state(restores.changelog, committed)
    tail.close()


async def test_checkpoints_keep_the_copy_exact(restores: Restores) -> None:
    """Checkpoints of the owner that wrote the copy, setting and deleting keys (beyond its
    cache, with one of 7 keys); the next owner restores the same state from the copy alone."""
    await restores.write(60)
    committed = {tp: 60 for tp in INPUTS}
    owner = await restores.restored(committed, copy=True)
    store = owner.stores["count"]
    for round_ in range(10):
        for key in restores.rng.sample(KEYS, 10):
            if store.get(key) is None:
                store.put(key, round_)
            else:
                store.delete(key)
        owner.flush(restores.outbox, committed)
        await restores.outbox.send()
        await owner.persist(restores.log)
    expected = dict(store.items())
    assert len(store) == len(expected)
    owner.close()
    following = await restores.restored(committed, copy=True)
    assert following.restored == 0
    assert dict(following.stores["count"].items()) == expected
    following.close()


async def test_a_late_copy_claims_only_what_its_owner_committed(
    restores: Restores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies written a while after their commits (an interval): the owner's last checkpoint,
    at the hand-over, commits nothing new, and a newer owner has written to the changelog by
    then. The copy that checkpoint writes claims what the owner committed, not the changelog's
    end, so the next restore still reads the newer owner's records."""
    monkeypatch.setenv("HEADWATER_STATE_COPY_INTERVAL", "3600")
    await restores.write(20)
    committed = {tp: 100 for tp in INPUTS}  # every record's input committed
    owner = await restores.restored(committed, copy=True)
    store = owner.stores["count"]
    for value in (1000, 2000):  # the first copy is written at once, the second is not due
        store.put(f"k{value}", value)
        owner.flush(restores.outbox, committed)
        await restores.outbox.send()
        await owner.persist(restores.log)
    await restores.write(5)  # the newer owner
    await owner.persist(restores.log, final=True)
    owner.close()

    following = await restores.restored(committed, copy=True)
    # from the changes made: the other owner's, and this owner's two keys (none of its KEYS)
    expected = committed_state(restores.changelog, committed) | {"k1000": 1000, "k2000": 2000}
    assert dict(following.stores["count"].items()) == expected
    following.close()


async def test_the_marks_copy_is_written_now_and_then_and_the_changelog_fills_the_gap(
    restores: Restores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marks store's copy costs an ``fdatasync`` a task, so it is written at the first
    checkpoint and then every ``_MARKS_COPY_INTERVAL`` or at a hand-over, whatever the copy
    interval (0 here: the count's copy is written at every checkpoint). A new owner between two
    of its copies replays the marks changelog written since, and ends with the last marks."""
    committed = {tp: 60 for tp in INPUTS}
    owner = await restores.restored(committed, copy=True)
    marks, count = owner.stores[MARKS_STORE], owner.stores["count"]
    marks_copy = (
        restores.state_dir
        / restores.topology.group
        / restores.topology.marks_changelogs[restores.sub.index].name
        / "0.lmdb"
    )

    async def checkpoint(value: int, *, final: bool = False) -> None:
        marks.put("mark", value)
        count.put("k0", value)
        owner.flush(restores.outbox, committed)
        await restores.outbox.send()
        await owner.persist(restores.log, final=final)

    def copied() -> tuple[dict[bytes, bytes], int]:
        local = LocalStore(marks_copy)  # (LMDB: not while the owner has it open)
        try:
            return local.load()
        finally:
            local.close()

    for value in (1, 2, 3):
        await checkpoint(value)
    owner.close()
    assert copied() == ({encode_key("mark"): b"1"}, 1)  # the first checkpoint's only

    following = await restores.restored(committed, copy=True)
    assert following.stores[MARKS_STORE].get("mark") == 3
    assert following.stores["count"].get("k0") == 3
    assert following.restored == 2  # the marks of the two later checkpoints; the count's none
    owner = following
    marks, count = owner.stores[MARKS_STORE], owner.stores["count"]
    monkeypatch.setattr(task_state, "_MARKS_COPY_INTERVAL", 0.0)
    await checkpoint(4)  # due now
    await checkpoint(5, final=True)  # a hand-over
    owner.close()
    assert copied() == ({encode_key("mark"): b"5"}, 5)


# -- the local copy ----------------------------------------------------------------------------


def test_a_copy_round_trips_long_keys_and_deletes(tmp_path: Path) -> None:
    """Keys longer than LMDB's 511 bytes are kept under a digest, and read back as they were."""
    path = tmp_path / "s" / "0.lmdb"
    local = LocalStore(path)
    assert local.load() == ({}, 0)
    assert local.offset() is None
    long_key = encode_key("x" * 600)
    state = {encode_key(f"k{n}"): b"%d" % n for n in range(6)} | {long_key: b"7"}
    local.replace(state, 4)
    assert local.load() == (state, 4)
    local.save(
        RawBatch([b'"k1"', long_key, b'"new"', b'"k1"'], [None, b"8", b"1", b"11"], [0] * 4), 5
    )
    state |= {b'"k1"': b"11", long_key: b"8", b'"new"': b"1"}
    local.save(RawBatch([b'"k2"', b'"absent"'], [None, None], [0, 0]), 6)
    del state[b'"k2"']
    local.close()
    local = LocalStore(path)
    assert local.load() == (state, 6)
    assert local.count() == len(state)
    assert local.get(long_key) == b"8"
    assert local.get(b'"k2"') is None
    assert dict(local.items()) == state
    local.close()


_KILLED_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from pipelines.log.base import RawBatch
from pipelines.state import local

copy = local.LocalStore(Path(sys.argv[1]))
if sys.argv[2] == "old":
    copy.replace({b'"old"': b"1"}, 5)
ordered = local.LocalStore._sorted

def dying(self, entries):
    for number, entry in enumerate(ordered(self, entries)):
        if number == 40_000:  # inside the write transaction, 40,000 entries in
            os.kill(os.getpid(), signal.SIGKILL)
        yield entry

local.LocalStore._sorted = dying
keys = [b'"k%d"' % n for n in range(50_000)]
copy.save(RawBatch(keys, [b"x" * 100] * len(keys), [0] * len(keys)), 9)
"""


@pytest.mark.slow
@pytest.mark.parametrize("before", ["old", "fresh"])
def test_a_copy_killed_while_being_written_is_as_before(tmp_path: Path, before: str) -> None:
    path = tmp_path / "0.lmdb"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_SAVING, str(path), before],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    local = LocalStore(path)
    expected = ({b'"old"': b"1"}, 5) if before == "old" else ({}, 0)
    assert local.load() == expected
    local.close()


# -- copies of older versions (SQLite, ``<partition>.sqlite``) ----------------------------------


async def test_an_older_versions_copy_is_removed_and_the_changelog_replayed(
    restores: Restores,
) -> None:
    await restores.write(30)
    committed = {tp: 60 for tp in INPUTS}
    older = restores.state_dir / restores.topology.group / "count" / "0.sqlite"
    older.parent.mkdir(parents=True)
    db = sqlite3.connect(older)
    db.execute("create table kv (k blob primary key, v blob not null) without rowid")
    db.execute("insert into kv values (?, ?)", (b'"k1"', b"12345"))
    db.commit()
    db.close()
    restored = await restores.restored(committed, copy=True)
    assert not older.exists()
    assert restored.restored > 0
    assert dict(restored.stores["count"].items()) == committed_state(restores.changelog, committed)
    restored.close()
