"""``pipelines.notebook.watch``: a pipeline run from a notebook with its own sources and sinks,
drawn live, stopped by its end, a count, a timeout or an interrupt, and resumed cleanly."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from connectors.files import JsonLines, JsonLinesSink
from pipelines import Pipeline, Topic
from pipelines.notebook import Sample, Watched, chart, render, watch


def doubled(source: Path, out: Path, *, follow: bool = False) -> Pipeline:
    """Each input line {"i": n} becomes {"i": n, "twice": 2n} in ``out``."""
    return (
        Pipeline("watched")
        .source(JsonLines(source, follow=follow), into=Topic("numbers", partitions=2))
        .map("double", lambda v: {"i": v["i"], "twice": 2 * v["i"]})
        .sink(JsonLinesSink(out), step_id="out")
    )


def write_lines(path: Path, numbers: range) -> None:
    with path.open("ab") as file:
        file.write(b"".join(orjson.dumps({"i": n}) + b"\n" for n in numbers))


def output(path: Path) -> Counter[int]:
    found: Counter[int] = Counter()
    for line in path.read_bytes().splitlines():
        value = orjson.loads(line)
        assert value["twice"] == 2 * value["i"]
        found[value["i"]] += 1
    return found


def test_a_finite_run_on_the_embedded_log_is_drawn_while_it_runs(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, range(20_000))
    frames: list[str] = []
    watched = watch(
        doubled(source, out),
        data_dir=tmp_path / "data",
        every=0.05,
        show=lambda w: frames.append(render(w)),
    )
    assert watched.stopped_by is None
    assert output(out) == Counter(range(20_000))  # each input once, from the input alone
    assert watched.state.records >= 20_000
    assert watched.samples[-1].lag == 0
    assert frames
    assert "double" in frames[-1]
    assert "numbers" in frames[-1]  # the lag table
    history = watched.to_pandas()
    assert list(history.columns) == ["elapsed", "records", "rate", "lag"]
    assert history["records"].is_monotonic_increasing


def test_an_endless_run_stops_at_a_count_or_a_timeout(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, range(5_000))
    counted = watch(
        doubled(source, out, follow=True), data_dir=tmp_path / "data", count=1_000, show=print
    )
    assert counted.stopped_by == "count"
    assert counted.state.records >= 1_000
    started = time.monotonic()
    timed = watch(
        doubled(source, out, follow=True), data_dir=tmp_path / "data", timeout=1.0, show=print
    )
    assert timed.stopped_by == "timeout"
    assert time.monotonic() - started < 15
    assert output(out) == Counter(range(5_000))  # the second run went on from the first


def test_an_interrupt_stops_the_run_cleanly_and_the_next_run_goes_on(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, range(3_000))
    pipeline = doubled(source, out, follow=True)

    def interrupt_after_more_input() -> None:
        time.sleep(1.0)
        write_lines(source, range(3_000, 6_000))
        time.sleep(1.0)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    threading.Thread(target=interrupt_after_more_input).start()
    first = watch(pipeline, data_dir=tmp_path / "data", every=0.1, show=lambda w: None)
    assert first.stopped_by == "interrupt"
    assert set(output(out)) <= set(range(6_000))
    assert max(output(out).values()) == 1
    write_lines(source, range(6_000, 9_000))
    second = watch(pipeline, data_dir=tmp_path / "data", timeout=2.0, show=lambda w: None)
    assert second.stopped_by == "timeout"
    assert output(out) == Counter(range(9_000))


def test_outside_a_notebook_each_frame_is_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, range(100))
    watch(doubled(source, out), backend="memory", every=0.05)
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert lines[-1].startswith("headwater watched: ")
    assert "records/s" in lines[-1]


def test_the_chart_draws_rate_and_lag_scaled_to_their_maximum() -> None:
    samples = [Sample(0.0, 0, 0.0, 100), Sample(1.0, 500, 500.0, 50), Sample(2.0, 900, 400.0, 0)]
    svg = chart(samples)
    assert "records/s (max 500)" in svg
    assert "lag (max 100)" in svg
    assert svg.count("<polyline") == 2
    assert chart(samples[:1]).startswith("<svg")


def test_watch_refuses_bad_stops(tmp_path: Path) -> None:
    pipeline = doubled(tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    for kwargs in ({"count": 0}, {"timeout": 0}, {"every": 0}):
        with pytest.raises(ValueError, match="must be"):
            watch(pipeline, data_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert not os.path.exists(tmp_path / "runs")
    assert Watched.__slots__
