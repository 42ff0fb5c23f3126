"""What the live progress view shows, from a run's state: lag per topic (64 partitions fit in
one line), only the step columns that are not all zero, and a rate averaged over seconds."""

from __future__ import annotations

from rich.console import Console

import connectors
from pipelines import Pipeline, Topic
from pipelines.log.base import TopicPartition
from pipelines.runtime.progress import RATE_WINDOW, RunState, render
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.worker import WorkerReport


def state_of(steps: dict[str, list[int]], lag: dict[TopicPartition, int]) -> RunState:
    pipeline = (
        Pipeline("shop")
        .source(connectors.Iterable([]), into=Topic("orders", partitions=64))
        .map("parse", lambda v: v)
        .key_by("by-user", lambda v: v)
        .sink(connectors.Stdout())
    )
    state = RunState(compile_pipeline(pipeline), "embedded", 2)
    state.reports[0] = WorkerReport(0, steps, [], sum(c[0] for c in steps.values()))
    state.lag = lag
    return state


def shown(state: RunState) -> list[str]:
    console = Console(width=120, record=True, color_system=None)
    console.print(render(state))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_lag_is_one_line_per_topic_with_the_partition_most_behind() -> None:
    lag = {TopicPartition("orders", p): p % 5 for p in range(64)}
    lag |= {TopicPartition("shop.by-user", p): 0 for p in range(64)}
    lines = shown(state_of({"parse": [10, 10, 0, 0, 0]}, lag))
    orders = [line for line in lines if line.startswith("orders")]
    assert len(orders) == 1
    assert orders[0].split() == [
        "orders",
        "64",
        f"{sum(p % 5 for p in range(64))}",
        "4",
        "(partition",
        "4)",
    ]
    assert [line.split() for line in lines if line.startswith("shop.by-user")] == [
        ["shop.by-user", "64", "0"]
    ]


def test_columns_that_are_zero_for_every_step_are_left_out() -> None:
    quiet = shown(state_of({"parse": [10, 10, 0, 0, 0]}, {}))
    header = next(line for line in quiet if line.startswith("step"))
    assert header.split() == ["step", "in", "out"]
    rejected = shown(state_of({"parse": [10, 8, 0, 2, 0]}, {}))
    header = next(line for line in rejected if line.startswith("step"))
    assert header.split() == ["step", "in", "out", "dead-lettered"]
    assert next(line for line in rejected if line.startswith("parse")).split() == [
        "parse",
        "10",
        "8",
        "2",
    ]


def test_the_rate_is_averaged_over_the_last_seconds() -> None:
    state = state_of({}, {})
    at = 1000.0
    for second in range(20):
        # bursts: a report every other second brings 2,000 records
        state.reports[0].records = 2000 * (second // 2)
        state.update_rate(at + second)
    assert 800 <= state.rate <= 1200  # 1,000 records/s, not 0 or 2,000 by the last report
    assert RATE_WINDOW >= 4
