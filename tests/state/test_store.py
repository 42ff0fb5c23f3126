"""The keyed store: dirty keys become changelog batches; a restore applies committed ones only."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support.operators import send_keyed

import connectors
from operators.aggregations import Count
from operators.stateful import Aggregate
from pipelines import Pipeline, Topic
from pipelines.errors import ErrorPolicy
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore
from pipelines.testing import OperatorHarness, TestResult

INPUT = TopicPartition("orders", 0)


def _changes(store: KeyValueStore, position: int) -> RawBatch:
    batch = store.changes({INPUT: position}, now_ms=0)
    assert batch is not None
    return batch


def test_only_dirty_keys_reach_the_changelog_once_each() -> None:
    store = KeyValueStore("count", 0)
    for n in range(5):
        store.put("ann", n)
    store.put(("bob", 60_000), [1, 2])
    batch = _changes(store, 10)
    assert sorted(batch.keys) == [b'"ann"', b'["bob",60000]']
    assert store.changes({INPUT: 11}, now_ms=0) is None


def test_restore_applies_committed_updates_and_skips_the_rest() -> None:
    before = KeyValueStore("count", 0)
    before.put("ann", 1)
    before.put(("bob", 60_000), {"n": 2})
    committed_batch = _changes(before, 10)
    before.put("ann", 99)  # processed after offset 10, never committed
    before.delete(("bob", 60_000))
    uncommitted_batch = _changes(before, 20)

    after = KeyValueStore("count", 0)
    assert after.apply(committed_batch, {"orders/0": 10}) == 2
    assert after.apply(uncommitted_batch, {"orders/0": 10}) == 0
    assert after.get("ann") == 1
    assert after.get(("bob", 60_000)) == {"n": 2}
    assert dict(after.items()) == {"ann": 1, ("bob", 60_000): {"n": 2}}


def test_a_tombstone_deletes_on_restore() -> None:
    before = KeyValueStore("count", 0)
    before.put("ann", 1)
    first = _changes(before, 1)
    before.delete("ann")
    second = _changes(before, 2)
    after = KeyValueStore("count", 0)
    after.apply(first, {"orders/0": 5})
    after.apply(second, {"orders/0": 5})
    assert after.get("ann") is None
    assert len(after) == 0


def test_local_copy_round_trip(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "s" / "0.lmdb")
    assert local.load() == ({}, 0)
    store = KeyValueStore("count", 0)
    store.put("ann", 3)
    store.put("bob", 4)
    local.save(_changes(store, 7), changelog_offset=2)
    store.delete("bob")
    local.save(_changes(store, 8), changelog_offset=3)
    local.close()
    reopened = LocalStore(tmp_path / "s" / "0.lmdb")
    entries, offset = reopened.load()
    assert offset == 3
    restored = KeyValueStore("count", 0)
    restored.load(entries)
    assert dict(restored.items()) == {"ann": 3}


def test_many_copies_open_in_one_process(tmp_path: Path) -> None:
    """A worker may own hundreds of stores (steps x partitions); each copy reserves address
    space for its file, and that must not run out long before memory does."""
    copies = [LocalStore(tmp_path / f"{n}.lmdb") for n in range(300)]
    for n, local in enumerate(copies):
        local.save(RawBatch([b"k"], [b"%d" % n], [0]), changelog_offset=n + 1)
    assert [local.load() for local in copies] == [({b"k": b"%d" % n}, n + 1) for n in range(300)]
    for local in copies:
        local.close()


def test_a_copy_grows_past_its_first_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipelines.state.local._MAP_START", 1 << 20)
    path = tmp_path / "0.lmdb"
    local = LocalStore(path)
    expected: dict[bytes, bytes] = {}
    rng = random.Random(7)
    long_key = b"x" * 2_000  # over LMDB's key limit: stored under its hash
    for offset in range(1, 9):
        keys = [b"%d" % rng.randrange(20_000) for _ in range(5_000)] + [long_key]
        values = [rng.randbytes(100) for _ in keys]
        gone = [b"%d" % rng.randrange(20_000) for _ in range(500)]
        local.save(RawBatch(keys + gone, [*values, *[None] * len(gone)], [0] * 5_501), offset)
        expected.update(zip(keys, values, strict=True))
        for key in gone:
            expected.pop(key, None)
    assert path.stat().st_size > 4 << 20
    local.close()
    reopened = LocalStore(path)
    assert reopened.load() == (expected, 8)
    assert reopened.get(long_key) == expected[long_key]
    reopened.close()


# -- a count with a ttl ------------------------------------------------------------------------

TTL = 1000
EVENTS = [("a", 0), ("b", 100), ("a", 500), ("b", 1_500), ("a", 2_000), ("a", 2_100)]


def ttl_reference(batches: list[list[tuple[str, int]]], ttl: int) -> list[tuple[str, int]]:
    """The count emitted per record when each batch is counted with the keys known before it,
    and after it the mark (the largest event time so far) forgets every key whose latest event
    time is at least ``ttl`` behind."""
    counts: dict[str, int] = {}
    latest: dict[str, int] = {}
    mark: int | None = None
    emitted = []
    for batch in batches:
        for key, stamp in batch:
            counts[key] = counts.get(key, 0) + 1
            latest[key] = max(latest.get(key, stamp), stamp)
            emitted.append((key, counts[key]))
        if batch:
            mark = max([s for _, s in batch] + ([] if mark is None else [mark]))
            for key in [k for k, s in latest.items() if mark >= s + ttl]:
                del counts[key], latest[key]
    return emitted


def test_the_ttl_reference_on_an_example() -> None:
    # one record per batch: b's record at 1500 comes when the mark is 500, so b (last at 100)
    # is still known; the mark 1500 after it forgets a (last at 500): a starts again at 2000
    assert ttl_reference([[e] for e in EVENTS], TTL) == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 1),
        ("a", 2),
    ]
    # b's record at 1500 after a batch that took the mark to 1100: b was forgotten, a (last
    # at 500) was not, and the later records of the batch count on
    assert ttl_reference([EVENTS[:3], [("c", 1100)], EVENTS[3:]], TTL) == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("c", 1),
        ("b", 1),
        ("a", 3),
        ("a", 4),
    ]
    # in one batch nothing is forgotten: the mark moves after it
    assert ttl_reference([EVENTS], TTL) == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("a", 4),
    ]


def test_a_count_with_a_ttl_forgets_idle_keys(
    run_one_by_one: Callable[..., TestResult],
) -> None:
    source = connectors.Iterable(
        [{"k": k, "t": t} for k, t in EVENTS], key=lambda v: v["k"], timestamp=lambda v: v["t"]
    )
    pipeline = (
        Pipeline("ttl")
        .source(source, into=Topic("events"))
        .count("n", ttl=timedelta(milliseconds=TTL))
        .sink(connectors.Collect(), step_id="out")
    )
    # one record per batch (conftest.py): the runtime tells the step the mark after each
    counts = [(r.key, r.value) for r in run_one_by_one(pipeline).records("out")]
    assert counts == ttl_reference([[e] for e in EVENTS], TTL)


class ScanCountingStore(KeyValueStore):
    """A store that counts how often it is scanned."""

    def __init__(self, step_id: str, partition: int) -> None:
        super().__init__(step_id, partition)
        self.scans = 0

    def items(self) -> Iterator[tuple[Any, Any]]:
        self.scans += 1
        return super().items()


def counted(
    batches: list[list[tuple[str, int]]], ttl: int
) -> tuple[list[tuple[str, int]], OperatorHarness, ScanCountingStore]:
    """The counts an ``Aggregate`` with ``ttl`` (a rejection fails the test) emits for
    ``batches``, told after each the mark the runtime would (the largest event time so far);
    the harness and its store."""
    store = ScanCountingStore("n", 0)
    harness = OperatorHarness(
        lambda: Aggregate("n", Count(), ttl), error_policy=ErrorPolicy.FAIL, store=store
    )
    emitted: list[tuple[str, int]] = []
    mark: int | None = None
    for records in batches:
        out = send_keyed(harness, [(k, t, None) for k, t in records])
        emitted += zip(out.keys, out.values, strict=True)
        if records:
            mark = max([t for _, t in records] + ([] if mark is None else [mark]))
            assert not harness.advance(mark)
    assert harness.late == []  # an aggregation has no late records
    return emitted, harness, store


def test_an_aggregate_with_a_ttl_forgets_when_the_mark_passes_without_a_scan() -> None:
    rng = random.Random(5)
    records = []
    for n in range(300):
        records.append((rng.choice("abcde"), n * 40 + rng.randint(-300, 300)))
    cuts = sorted(rng.sample(range(1, len(records)), 40))
    batchings = [
        [records],
        [[r] for r in records],
        [records[a:b] for a, b in itertools.pairwise([0, *cuts, len(records)])],
    ]
    results = []
    for batches in batchings:
        emitted, _, store = counted(batches, TTL)
        assert emitted == ttl_reference(batches, TTL)
        assert store.scans <= 1  # loading the (empty) store at the start, never again
        results.append(emitted)
    assert results[1] != results[0]  # the batches decide what was forgotten in between

    emitted, harness, store = counted([[e] for e in EVENTS], TTL)
    assert dict(store.items()) == {"a": [2, 2_100], "b": [2, 1_500]}  # [count, latest]
    harness.advance(2_499)
    assert sorted(store.items()) == [("a", [2, 2_100]), ("b", [2, 1_500])]
    harness.advance(2_500)  # b's 1500 + ttl
    assert dict(store.items()) == {"a": [2, 2_100]}
    harness.advance(3_100)
    assert len(store) == 0
    assert harness.send([None], keys=["a"], timestamps=[3_000]).values == [1]
