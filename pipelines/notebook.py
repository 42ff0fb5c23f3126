"""Run a pipeline from a notebook and watch it: a live table and chart that stop cleanly.

``watch(pipeline)`` does what ``headwater run`` does with one process: the pipeline's own
sources and sinks (unlike :mod:`pipelines.testing`, which replaces them), on the embedded log
in ``data_dir`` (the default), on Kafka, or in memory. While it runs, the cell shows per-step
counts, lag per topic, and a chart of records/s and lag, redrawn every ``every`` seconds. It
ends when the input is processed, at ``count=`` records or after ``timeout=`` seconds, or when
the cell is interrupted (Kernel > Interrupt, or Ctrl-C outside a notebook): the workers then
finish their batch and commit, as on Ctrl-C in a terminal, so the next ``watch`` (or
``headwater run``) of the same pipeline and directory goes on where this one stopped.

The pipeline runs on its own event loop in a helper thread (a notebook already runs one); the
cell's thread only draws, so an interrupt reaches it between two draws.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from pipelines.log import open_log
from pipelines.log.base import LogBackend
from pipelines.log.embedded import DEFAULT_DATA_DIR
from pipelines.pipeline import Pipeline
from pipelines.runtime.engine import lag, prepare_topics, refuse_a_second_copy
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.progress import RunState
from pipelines.runtime.runlock import run_lock
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.runtime.worker import WorkerReport
from pipelines.settings import KafkaSettings

__all__ = ["Sample", "Watched", "watch"]

Show = Callable[["Watched"], None]
"""Draws one frame of the view of a run."""


@dataclass(frozen=True, slots=True)
class Sample:
    """The run at one moment: seconds since it started, records processed, records/s, lag."""

    elapsed: float
    records: int
    rate: float
    lag: int


@dataclass(slots=True)
class Watched:
    """A run watched from a notebook: where it got to, and how it went."""

    state: RunState
    samples: list[Sample] = field(default_factory=list)
    stopped_by: str | None = None
    """``"count"``, ``"timeout"`` or ``"interrupt"``; None when the input was processed."""

    def to_pandas(self) -> Any:
        """The samples as a DataFrame: ``elapsed``, ``records``, ``rate``, ``lag``."""
        import pandas as pd  # noqa: PLC0415 (pandas, an optional dependency)

        return pd.DataFrame([asdict(s) for s in self.samples], columns=list(Sample.__slots__))

    def _repr_html_(self) -> str:
        return render(self)


def watch(
    pipeline: Pipeline,
    *,
    backend: str = "embedded",
    data_dir: Path | str = DEFAULT_DATA_DIR,
    kafka: KafkaSettings | None = None,
    workers: int = 1,
    count: int | None = None,
    timeout: float | None = None,
    every: float = 1.0,
    show: Show | None = None,
) -> Watched:
    """Run ``pipeline`` here, showing its progress live, until its input is processed, it
    has processed ``count`` records, ``timeout`` seconds passed, or the cell is interrupted.
    ``show`` draws a frame (default: the notebook's output area, or a line on stdout)."""
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
    if not every > 0:
        raise ValueError(f"every must be a positive number of seconds, not {every}")
    topology = compile_pipeline(pipeline)
    log = open_log(backend, data_dir=data_dir, kafka=kafka)
    watched = Watched(RunState(topology, backend, workers))
    run = _Run(topology, log, watched, every)
    lock: AbstractContextManager[None] = (
        run_lock(Path(data_dir), pipeline.name) if backend == "embedded" else nullcontext()
    )
    draw = show or _default_show()
    with lock:
        run.start()
        try:
            _follow(run, draw, count, timeout, every)
        except KeyboardInterrupt:
            watched.stopped_by = "interrupt"
            run.request_stop()
        finally:
            run.join()
    draw(watched)
    return watched


def _follow(run: _Run, draw: Show, count: int | None, timeout: float | None, every: float) -> None:
    """Draw every ``every`` seconds until the run ends, stopping it at ``count``/``timeout``."""
    watched = run.watched
    deadline = None if timeout is None else time.monotonic() + timeout
    while run.alive():
        if count is not None and watched.state.records >= count:
            watched.stopped_by = "count"
            run.request_stop()
        elif deadline is not None and time.monotonic() >= deadline:
            watched.stopped_by = "timeout"
            run.request_stop()
        draw(watched)
        run.wait(every if count is None else min(every, 0.05))


class _Run:
    """The pipeline on its own loop in a helper thread, sampling itself every ``every``."""

    def __init__(self, topology: Topology, log: LogBackend, watched: Watched, every: float):
        self.topology, self.log, self.watched, self.every = topology, log, watched, every
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._ready = threading.Event()
        self._finished = threading.Event()
        """Set when the run has ended. Waited on instead of ``Thread.join``: an interrupt
        that lands inside ``join`` can leave the thread looking finished while it runs."""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="headwater-watch")

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def alive(self) -> bool:
        return not self._finished.is_set()

    def wait(self, seconds: float) -> None:
        self._finished.wait(seconds)

    def request_stop(self) -> None:
        """Ask the workers to finish their batch, commit and leave (once is enough)."""
        self._stop_requested = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop closed in between: the run has ended
                loop.call_soon_threadsafe(stop.set)

    def join(self) -> None:
        """Wait for the run to end; raise what ended it, if it failed."""
        self._finished.wait()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as error:
            self._error = error
        finally:
            self._ready.set()
            self._finished.set()

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        self._ready.set()
        state, topology, log = self.watched.state, self.topology, self.log
        try:
            await prepare_topics(log, topology)
            await refuse_a_second_copy(log, topology, topology.pipeline.name)
            sampler = asyncio.create_task(self._sample())
            try:
                result = await run_in_process(
                    topology, log, workers=state.workers, stop=self._stop, on_report=self._report
                )
            finally:
                sampler.cancel()
            state.sources = result.sources
            state.lag = await lag(log, topology)
            self._take_sample()
        finally:
            await log.close()

    def _report(self, report: WorkerReport) -> None:
        self.watched.state.reports[report.worker] = report

    async def _sample(self) -> None:
        while True:
            self.watched.state.lag = await lag(self.log, self.topology)
            self._take_sample()
            await asyncio.sleep(self.every)

    def _take_sample(self) -> None:
        state = self.watched.state
        state.update_rate()
        elapsed = time.monotonic() - state.started
        self.watched.samples.append(
            Sample(elapsed, state.records, state.rate, sum(state.lag.values()))
        )


def _default_show() -> Show:
    """Draw into the notebook's output area, replacing the last frame; outside a notebook,
    print a line per frame."""
    try:  # untyped: looked up as plain objects
        core: Any = importlib.import_module("IPython")
        shown: Any = importlib.import_module("IPython.display")
    except ImportError:
        return _print_line
    if core.get_ipython() is None:
        return _print_line
    handle = shown.display(shown.HTML("<i>starting...</i>"), display_id=True)

    def show(watched: Watched) -> None:
        handle.update(shown.HTML(render(watched)))

    return show


def _print_line(watched: Watched) -> None:
    """A terminal's frame: one line."""
    state = watched.state
    print(
        f"headwater {state.topology.pipeline.name}: {state.records:,} records, "
        f"{state.rate:,.0f} records/s, lag {sum(state.lag.values()):,}"
        + (f", stopped by {watched.stopped_by}" if watched.stopped_by else ""),
        flush=True,
    )


# -- the view --------------------------------------------------------------------------------

_STEP_COLUMNS = ("in", "out", "skipped", "dead-lettered", "late")


def render(watched: Watched) -> str:
    """The view: title line, records per step, lag per topic, chart of rate and lag."""
    state = watched.state
    elapsed = watched.samples[-1].elapsed if watched.samples else 0.0
    ending = f" · stopped by {watched.stopped_by}" if watched.stopped_by else ""
    title = (
        f"<b>{escape(state.topology.pipeline.name)}</b> · {escape(state.backend)} · "
        f"{state.workers} worker(s) · {elapsed:,.1f}s · {state.records:,} records · "
        f"<b>{state.rate:,.0f} records/s</b>{escape(ending)}"
    )
    return (
        f"<div>{title}</div><div style='display:flex;gap:2em;align-items:flex-start'>"
        f"{_steps_table(state)}{_lag_table(state)}{chart(watched.samples)}</div>"
    )


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cells = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><tr>{header}</tr>{cells}</table>"


def _steps_table(state: RunState) -> str:
    totals = state.step_totals()
    rows: list[tuple[str, ...]] = [
        (f"{s.step_id} (source{', done' if s.done else ''})", "", f"{s.records:,}", "", "", "")
        for s in state.sources
    ]
    rows += [
        (step.step_id, *(f"{n:,}" for n in totals[step.step_id]))
        for step in state.topology.pipeline.steps
        if step.step_id in totals
    ]
    return _table(("step", *_STEP_COLUMNS), rows)


def _lag_table(state: RunState) -> str:
    by_topic: dict[str, int] = {}
    for tp, behind in state.lag.items():
        by_topic[tp.topic] = by_topic.get(tp.topic, 0) + behind
    return _table(("topic", "lag"), [(t, f"{n:,}") for t, n in sorted(by_topic.items())])


_WIDTH, _HEIGHT, _PAD = 360.0, 120.0, 24.0


def chart(samples: list[Sample]) -> str:
    """Records/s (green) and lag (orange) over time as SVG, each scaled to its own maximum."""
    if len(samples) < 2:
        return "<svg width='360' height='120'></svg>"
    span = samples[-1].elapsed - samples[0].elapsed or 1.0
    lines = []
    for name, colour, values in (
        ("records/s", "#2a9d8f", [s.rate for s in samples]),
        ("lag", "#e76f51", [float(s.lag) for s in samples]),
    ):
        top = max(values) or 1.0
        points = " ".join(
            f"{_PAD + (s.elapsed - samples[0].elapsed) / span * (_WIDTH - 2 * _PAD):.1f},"
            f"{_HEIGHT - _PAD - v / top * (_HEIGHT - 2 * _PAD):.1f}"
            for s, v in zip(samples, values, strict=True)
        )
        lines.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2">'
            f"<title>{name}</title></polyline>"
        )
    legend = (
        f'<text x="{_PAD}" y="14" fill="#2a9d8f">records/s (max '
        f"{max(s.rate for s in samples):,.0f})</text>"
        f'<text x="{_WIDTH / 2 + 10}" y="14" fill="#e76f51">lag (max '
        f"{max(s.lag for s in samples):,})</text>"
        f'<text x="{_PAD}" y="{_HEIGHT - 6}" fill="#888">{span:,.1f} s</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH:.0f}" height="{_HEIGHT:.0f}" '
        f'font-family="sans-serif" font-size="11">{legend}{"".join(lines)}</svg>'
    )
