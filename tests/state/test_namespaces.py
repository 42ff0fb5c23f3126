"""Namespaces of a step's state: separate keyspaces over one store, their changelog encoding
(the default namespace as before, another behind a NUL-delimited prefix), restores, the bounded
cache over a local copy, and state written before namespaces, which the window and join
operators move where it now belongs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.operators import Keyed, send_keyed

from operators._timing import TIME, WATERMARK, watermark
from operators.aggregations import Count
from operators.joins import JOINED, StreamJoin
from operators.windowed import WINDOWS, WindowedAggregate
from operators.windows import Tumbling
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.state.api import DEFAULT_NAMESPACE
from pipelines.state.local import LocalStore
from pipelines.state.store import KeyValueStore, encode_key, positions_header, split_key
from pipelines.testing import Checkpoint, OperatorHarness

INPUT = TopicPartition("input", 0)


def namespaced_store() -> KeyValueStore:
    """A store with the same keys in the default namespace and in two others."""
    store = KeyValueStore("step", 0)
    store.put("k", 1)
    store.namespace("a").put("k", 2)
    store.namespace("b").put(("k", 1), 3)
    return store


def test_each_namespace_is_a_keyspace_of_its_own() -> None:
    store = namespaced_store()
    a, b = store.namespace("a"), store.namespace("b")
    assert store.namespace() is store and store.namespace(DEFAULT_NAMESPACE) is store
    assert store.namespace("a") is a
    assert (store.get("k"), a.get("k"), b.get("k")) == (1, 2, None)
    assert (dict(store.items()), dict(a.items()), dict(b.items())) == (
        {"k": 1},
        {"k": 2},
        {("k", 1): 3},
    )
    assert (len(store), len(a), len(b)) == (1, 1, 1)
    a.delete("k")
    assert (store.get("k"), a.get("k"), len(a), len(store)) == (1, None, 0, 1)
    with pytest.raises(ValueError, match="NUL"):
        store.namespace("a\x00b")


def test_the_default_namespace_keeps_its_encoding_and_another_is_prefixed() -> None:
    changes = namespaced_store().changes({INPUT: 1}, now_ms=0)
    assert changes is not None
    written = dict(zip(changes.keys, changes.values, strict=True))
    assert written == {b'"k"': b"1", b'\x00a\x00"k"': b"2", b'\x00b\x00["k",1]': b"3"}
    assert encode_key("k") == b'"k"' and encode_key("k", "a") == b'\x00a\x00"k"'
    assert {split_key(key) for key in written if key is not None} == {
        (DEFAULT_NAMESPACE, "k"),
        ("a", "k"),
        ("b", ("k", 1)),
    }


def test_a_restore_gives_every_namespace_back() -> None:
    changes = namespaced_store().changes({INPUT: 1}, now_ms=0)
    assert changes is not None
    restored = KeyValueStore("step", 0)
    assert restored.apply(changes, {"input/0": 1}) == 3
    assert len(restored) == 1  # counted without decoding: the other namespaces are not in it
    a, b = restored.namespace("a"), restored.namespace("b")
    assert (len(a), len(b)) == (1, 1)
    assert (restored.get("k"), a.get("k"), b.get(("k", 1))) == (1, 2, 3)
    assert dict(b.items()) == {("k", 1): 3} and dict(restored.items()) == {"k": 1}


def test_namespaced_entries_are_evicted_to_the_copy_and_read_back(tmp_path: Path) -> None:
    """A store over its cache keeps the rest in its copy, in every namespace."""
    local = LocalStore(tmp_path / "step" / "0.lmdb")
    store = KeyValueStore("step", 0, backing=local, cache_keys=4)
    windows = store.namespace("w")
    for n in range(10):
        store.put(f"k{n}", n)
        windows.put((f"k{n}", 0, 100), n * 10)
    assert store.changes({INPUT: 10}, now_ms=0) is not None
    local.save(store.unsaved(), 1)
    store.saved()
    assert not store.complete
    assert (len(store), len(windows)) == (10, 10)
    assert [windows.get((f"k{n}", 0, 100)) for n in range(10)] == [n * 10 for n in range(10)]
    windows.delete(("k0", 0, 100))
    store.put("k10", 10)
    assert (len(store), len(windows)) == (11, 9)
    assert dict(windows.items()) == {(f"k{n}", 0, 100): n * 10 for n in range(1, 10)}
    assert dict(store.items()) == {f"k{n}": n for n in range(11)}
    local.close()


# -- state written before namespaces ----------------------------------------------------------


def old_changelog(entries: dict[Any, Any], mark: int) -> Checkpoint:
    """A checkpoint whose changelog holds ``entries`` as a step wrote them before namespaces
    (every key in the default namespace, the JSON of the key, tuples as arrays), with the
    event-time ``mark`` a restored task tells its steps."""
    keys: list[bytes | None] = [orjson.dumps(key) for key in entries]
    values: list[bytes | None] = [orjson.dumps(value) for value in entries.values()]
    header = positions_header({INPUT: 5})
    changelog = RawBatch(keys, values, [0] * len(keys), [header] * len(keys))
    return Checkpoint((changelog,), {INPUT: 5}, mark)


def counted_windows(checkpoint: Checkpoint | None = None, **options: Any) -> OperatorHarness:
    """A count of step ``agg`` per tumbling 100 ms window, driven by hand."""
    return OperatorHarness(
        lambda: WindowedAggregate(
            "agg",
            Tumbling(timedelta(milliseconds=100)),
            Count(),
            emit="close",
            grace_ms=0,
            lateness_ms=0,
        ),
        checkpoint=checkpoint,
        **options,
    )


def window_state(harness: OperatorHarness) -> tuple[dict[Any, Any], int]:
    return dict(harness.state(WINDOWS).items()), watermark(harness.state(TIME))


OPEN_WINDOWS: list[Keyed] = [("a", 110, 1), ("a", 150, 1), ("b", 120, 1), ("a", 250, 1)]


def test_a_window_changelog_of_the_old_layout_restores_the_same_state() -> None:
    """The windows and the watermark an old changelog holds (3-tuples and ``("watermark",)``
    in the default namespace) restore as a changelog of today's layout does, and close the
    same; the next checkpoint rewrites them in the new layout."""
    today = counted_windows()
    today.advance(100)
    send_keyed(today, OPEN_WINDOWS)
    restored_today = counted_windows(today.checkpoint())

    old = old_changelog(
        {("a", 100, 200): 2, ("b", 100, 200): 1, ("a", 200, 300): 1, ("watermark",): 100}, 100
    )
    restored_old = counted_windows(old)
    assert restored_old.pending == 3
    assert window_state(restored_old) == window_state(restored_today)
    assert (window_state(restored_old)[0], len(restored_old.store)) == (
        {("a", 100, 200): 2, ("b", 100, 200): 1, ("a", 200, 300): 1},
        0,
    )
    again = counted_windows(restored_old.checkpoint())
    assert window_state(again) == window_state(restored_today) and len(again.store) == 0
    assert set(again.finish().values) == set(restored_today.finish().values)
    assert sorted((r.value.key, r.value.value) for r in again.emitted) == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
    ]


def test_a_window_copy_of_the_old_layout_restores_the_same_state(tmp_path: Path) -> None:
    """A local copy written before namespaces: the same bytes, loaded into the store."""
    local = LocalStore(tmp_path / "agg" / "0.lmdb")
    old = {orjson.dumps(("a", 100, 200)): b"2", orjson.dumps(("watermark",)): b"150"}
    local.replace(old, 3)
    store = KeyValueStore("agg", 0, backing=local, cache_keys=100)
    store.load(local.load()[0])
    harness = counted_windows(store=store)
    assert harness.pending == 2  # an upper bound until the state is first read
    assert harness.advance(150).values == []  # the watermark restored: nothing moves
    assert window_state(harness) == ({("a", 100, 200): 2}, 150)
    assert harness.pending == 1
    assert [r.value for r in harness.advance(200).values] == [2]
    local.close()


def joined_pairs(checkpoint: Checkpoint | None = None) -> OperatorHarness:
    """An inner stream join of step ``pair`` within 100 ms, driven by hand."""
    return OperatorHarness(
        lambda: StreamJoin("pair", pair_of, how="inner", within_ms=100, grace_ms=0),
        checkpoint=checkpoint,
    )


def pair_of(left: Any, right: Any) -> list[Any]:
    return [left, right]


def test_a_join_changelog_of_the_old_layout_restores_the_same_state() -> None:
    """The records an old join changelog holds (4-tuples ``(side, key, time, seq)`` and the
    watermark in the default namespace) wait and join as those of today's layout do."""
    today = joined_pairs()
    today.advance(1000)
    send_keyed(today, [("a", 1050, "left-1"), ("b", 1060, "left-2")], input=0)
    restored_today = joined_pairs(today.checkpoint())

    old = old_changelog(
        {
            (0, "a", 1050, 0): ["left-1", False],
            (0, "b", 1060, 1): ["left-2", False],
            ("watermark",): 1000,
        },
        1000,
    )
    restored_old = joined_pairs(old)
    for harness in (restored_old, restored_today):
        out = send_keyed(harness, [("a", 1100, "right-1")], input=1)
        assert out.values == [["left-1", "right-1"]]
    assert dict(restored_old.state(JOINED).items()) == dict(restored_today.state(JOINED).items())
    assert watermark(restored_old.state(TIME)) == watermark(restored_today.state(TIME)) == 1000
    assert len(restored_old.store) == 0
    assert restored_old.state(TIME).get(WATERMARK) == 1000
