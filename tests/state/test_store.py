"""The keyed store: dirty keys become changelog batches; a restore applies committed ones only."""

from __future__ import annotations

from pathlib import Path

from pipelines.log.base import RawBatch, TopicPartition
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore

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
    applied = after.apply(committed_batch, {"orders/0": 10})
    skipped = after.apply(uncommitted_batch, {"orders/0": 10})
    assert sorted(applied.keys) == [b'"ann"', b'["bob",60000]']
    assert len(skipped) == 0
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
    local = LocalStore(tmp_path / "s" / "0.sqlite")
    assert local.load() == ({}, 0)
    store = KeyValueStore("count", 0)
    store.put("ann", 3)
    store.put("bob", 4)
    local.save(_changes(store, 7), changelog_offset=2)
    store.delete("bob")
    local.save(_changes(store, 8), changelog_offset=3)
    local.close()
    reopened = LocalStore(tmp_path / "s" / "0.sqlite")
    entries, offset = reopened.load()
    assert offset == 3
    restored = KeyValueStore("count", 0)
    restored.load(entries)
    assert dict(restored.items()) == {"ann": 3}


def test_a_count_with_a_ttl_forgets_idle_keys_without_a_scan() -> None:
    from datetime import timedelta

    import connectors
    from pipelines import Pipeline, Topic
    from pipelines.testing import run_pipeline

    events = [("a", 0), ("b", 100), ("a", 500), ("b", 1_500), ("a", 2_000), ("a", 2_100)]
    source = connectors.Iterable(
        [{"k": k, "t": t} for k, t in events], key=lambda v: v["k"], timestamp=lambda v: v["t"]
    )
    pipeline = (
        Pipeline("ttl")
        .source(source, into=Topic("events"))
        .count("n", ttl=timedelta(seconds=1))
        .sink(connectors.Collect(), step_id="out")
    )
    counts = [(r.key, r.value) for r in run_pipeline(pipeline).records("out")]
    # a: 0, 500 count up; at 2000, a's last update (500) is more than 1 s old: a starts again
    # b: 100, then 1500 comes more than 1 s later (b was forgotten when event time passed 1100)
    assert counts == [("a", 1), ("b", 1), ("a", 2), ("b", 1), ("a", 1), ("a", 2)]
