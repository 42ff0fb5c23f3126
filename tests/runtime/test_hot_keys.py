"""Hot keys: the top-k sketch keeps its error bound against exact counts; a run warns once
about a key that carries most of a partition and not about a uniform load; the progress view,
``headwater status`` and the metrics show the top keys."""

from __future__ import annotations

import io
import re
import textwrap
from collections import Counter
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

import connectors
from pipelines import Pipeline, Topic
from pipelines.runtime.hotkeys import (
    SAMPLE_EVERY,
    KeySampler,
    PartitionKeys,
    TopKeys,
    display_key,
    hot_keys_over,
)
from pipelines.runtime.metrics import HOT_KEYS_SHOWN, RunCollector
from pipelines.runtime.progress import RunState, render
from pipelines.runtime.runner import RunOptions, run
from pipelines.runtime.status import StatusFile, describe
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.worker import WorkerReport

batches = st.lists(
    st.lists(st.integers(0, 40) | st.sampled_from([1, 1, 1, 2]), min_size=1, max_size=60),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(batches=batches, size=st.integers(1, 12))
def test_the_sketch_is_within_its_bound_of_the_exact_counts(
    batches: list[list[int]], size: int
) -> None:
    sketch = TopKeys(size)
    exact: Counter[int] = Counter()
    for batch in batches:
        sketch.add(Counter(batch))
        exact.update(batch)
    total = sum(exact.values())
    assert sketch.total == total
    assert len(sketch.counts) <= size
    assert sketch.error <= total / (size + 1)
    for key, count in exact.items():
        estimate = sketch.counts.get(key, 0)
        assert estimate <= count <= estimate + sketch.error
        if count > total / (size + 1):
            assert key in sketch.counts  # a heavy hitter is never missed


def test_a_sampler_counts_every_record_and_samples_one_batch_in_several() -> None:
    sampler = KeySampler()
    for _ in range(SAMPLE_EVERY):
        sampler.sample([b"hot", b"hot", b"hot", None])
    assert sampler.records == 4 * SAMPLE_EVERY
    assert sampler.sketch.total == 3  # the first batch only, its keyless record left out
    load = sampler.report("clicks", 2)
    assert (load.topic, load.partition, load.records) == ("clicks", 2, 4 * SAMPLE_EVERY)
    assert load.top == [("hot", 1.0)]


def test_keys_are_shown_decoded_and_short() -> None:
    assert display_key(b"/p/1") == "/p/1"
    assert display_key(b"\xff") == "\ufffd"
    assert display_key(b"x" * 100) == "x" * 39 + "…"


def test_only_a_key_over_the_share_of_a_busy_partition_with_enough_records_is_hot() -> None:
    busy = PartitionKeys("clicks", 0, 9000, [("hot", 0.8), ("cold", 0.1)])
    young = PartitionKeys("clicks", 1, 999, [("early", 0.9)])
    even = PartitionKeys("clicks", 2, 2000, [("a", 0.02)])
    assert hot_keys_over([busy, young, even], 0.5) == [(busy, "hot", 0.8)]
    assert hot_keys_over([busy, young, even], 0.05) == [(busy, "hot", 0.8), (busy, "cold", 0.1)]
    # two keys a partition, spread evenly: each carries half its partition, none is hot
    pairs = [PartitionKeys("clicks", p, 5000, [(f"k{p}", 0.51), (f"j{p}", 0.49)]) for p in range(6)]
    assert hot_keys_over(pairs, 0.5) == []
    # one partition: one task whatever the keys
    assert hot_keys_over([busy], 0.5) == []


MODULE = """
import connectors
from pipelines import Pipeline, Topic

keys = {keys!r}

pipeline = (
    Pipeline("loads")
    .source(
        connectors.Iterable([{{"k": k}} for k in keys], key=lambda v: v["k"]),
        into=Topic("loads", partitions=4),
    )
    .count("n")
    .sink(connectors.Collect(), step_id="out")
)
"""


def run_module(tmp_path: Path, keys: list[str], share: float = 0.5) -> RunState:
    module = tmp_path / "loads.py"
    module.write_text(textwrap.dedent(MODULE.format(keys=keys)))
    return run(RunOptions(spec=str(module), backend="memory", progress=False, hot_key_share=share))


def test_a_run_warns_once_about_a_hot_key(tmp_path: Path) -> None:
    keys = ["hot" if i % 5 else f"k{i}" for i in range(3000)]  # 80% one key
    state = run_module(tmp_path, keys)
    warnings = [note for note in state.notes if note.startswith("hot key")]
    assert len(warnings) == 1, state.notes
    assert "hot key 'hot' carries 9" in warnings[0]  # 80% of all, over 90% of its partition
    assert re.search(r"of partition loads\[\d\] \([\d,]+ records so far\)", warnings[0])
    assert "salt=N" in warnings[0]
    load = max(state.hot_keys(), key=lambda load: load.records)
    assert load.top[0][0] == "hot" and load.top[0][1] > 0.75


def test_a_uniform_load_brings_no_warning(tmp_path: Path) -> None:
    state = run_module(tmp_path, [f"k{i % 50}" for i in range(3000)])
    assert not [note for note in state.notes if note.startswith("hot key")], state.notes
    loads = state.hot_keys()
    assert sum(load.records for load in loads) == 3000
    assert all(share < 0.5 for load in loads for _, share in load.top)  # a dozen keys each


def test_the_share_is_the_run_s_to_set(tmp_path: Path) -> None:
    keys = ["hot" if i % 5 else f"k{i}" for i in range(3000)]  # over 90% of its partition
    state = run_module(tmp_path, keys, share=0.99)
    assert not [note for note in state.notes if note.startswith("hot key")], state.notes


def reported_state() -> RunState:
    pipeline = (
        Pipeline("shop")
        .source(connectors.Iterable([]), into=Topic("orders", partitions=2))
        .count("n")
        .sink(connectors.Collect(), step_id="out")
    )
    state = RunState(compile_pipeline(pipeline), "embedded", 1)
    top = [("big-customer", 0.7), ("c2", 0.1), ("c3", 0.05), ("c4", 0.01), ("c5", 0.01)]
    loads = [
        PartitionKeys("orders", 0, 10_000, top),
        PartitionKeys("orders", 1, 8_000, [("c9", 0.02)]),
    ]
    state.reports[0] = WorkerReport(0, {}, [], 18_000, hot_keys=loads)
    return state


def test_status_shows_the_top_keys(tmp_path: Path) -> None:
    StatusFile(tmp_path, reported_state()).update(force=True)
    document = orjson.loads((tmp_path / "runs" / "shop.status.json").read_bytes())
    assert document["hot_keys"]["orders[0]"] == {
        "records": 10_000,
        "top": [["big-customer", 0.7], ["c2", 0.1], ["c3", 0.05]],
    }
    text = describe({**document, "lag": {}})
    assert "  hot keys (share of the partition's records):" in text
    lines = text.splitlines()
    first = lines.index("  hot keys (share of the partition's records):") + 1
    assert lines[first] == "    orders[0]: 'big-customer' 70%, 'c2' 10%, 'c3' 5% (10,000 records)"
    assert lines[first + 1] == "    orders[1]: 'c9' 2% (8,000 records)"


def test_metrics_show_the_top_keys_of_each_partition_only() -> None:
    families = {family.name: family for family in RunCollector(reported_state()).collect()}
    samples = families["headwater_hot_key_share"].samples
    assert len(samples) == HOT_KEYS_SHOWN + 1
    first = samples[0]
    assert first.labels == {
        "pipeline": "shop",
        "topic": "orders",
        "partition": "0",
        "key": "big-customer",
    }
    assert first.value == 0.7


def test_the_progress_view_shows_the_hottest_partitions() -> None:
    out = io.StringIO()
    Console(file=out, width=120).print(render(reported_state()))
    view = out.getvalue()
    assert "hot key" in view
    hot = next(line for line in view.splitlines() if "big-customer" in line)
    assert hot.split() == ["big-customer", "orders[0]", "70%", "10,000"]
