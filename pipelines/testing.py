"""Test pipelines without any infrastructure: run them on the ``memory`` backend.

::

    from pipelines.testing import run_pipeline

    result = run_pipeline(pipeline, inputs={"clicks": [{"user": "ann", "url": "/p/1"}]})
    assert result.values("sink.stdout") == [...]

``inputs`` replaces the connector of a source step (by step id) with the given values, keyed
by the replaced source's ``key=`` function if it has one (a value it cannot key gets none, as in
a file source); every
sink of the pipeline is replaced by an in-memory collector, so ``result`` holds what each sink
would have received. Records that failed go to the dead-letter topic as they would in
production: ``result.dead_letters``. Works in plain Python, pytest and inside Jupyter (where an
event loop is already running): use :func:`run_pipeline_async` from async code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from connectors.memory import Collect
from connectors.memory import Iterable as IterableSource
from pipelines.errors import PipelineDefinitionError
from pipelines.log.base import TopicPartition
from pipelines.log.memory import MemoryLog
from pipelines.pipeline import Pipeline, Step
from pipelines.record import Record, from_millis
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watermarks import split_markers

__all__ = ["TestResult", "run_pipeline", "run_pipeline_async"]


@dataclass(slots=True)
class TestResult:
    """What each sink received, and what ended up on the log."""

    __test__ = False  # not a pytest test class

    sinks: dict[str, Collect]
    log: MemoryLog
    pipeline: Pipeline

    def values(self, sink_step: str) -> list[Any]:
        """The values sink step ``sink_step`` received, in arrival order."""
        return list(self._sink(sink_step).values)

    def records(self, sink_step: str) -> list[Record]:
        """The records sink step ``sink_step`` received."""
        return list(self._sink(sink_step).records)

    def _sink(self, step_id: str) -> Collect:
        try:
            return self.sinks[step_id]
        except KeyError:
            raise KeyError(
                f"no sink step {step_id!r}; the pipeline's sinks are {sorted(self.sinks)}"
            ) from None

    def topic(self, name: str) -> list[Record]:
        """Every record on topic ``name``, partition by partition (not the watermark markers
        among them)."""
        found: list[Record] = []
        for partition in range(self.log.spec(name).partitions):
            fetched = self.log.read_now(TopicPartition(name, partition), 0, 1 << 62)
            fetched, _ = split_markers(fetched)
            raw = fetched.records
            found += [
                Record(
                    key=raw.keys[i],
                    value=raw.values[i],
                    timestamp=from_millis(raw.timestamps[i]),
                    headers=raw.header_at(i),
                    topic=name,
                    partition=partition,
                    offset=fetched.offsets[i],
                )
                for i in range(len(raw))
            ]
        return found

    @property
    def dead_letters(self) -> list[Record]:
        """Records that failed: original bytes, with the error and step in their headers."""
        return self.topic(self.pipeline.dead_letter_topic.name)


def _keyed_as(source: object) -> Callable[[Any], Any] | None:
    """The key function of a replaced source (``key=`` of JsonLines, Csv, Iterable...), made to
    give no key to a value it does not fit instead of failing."""
    key = getattr(source, "key", None)
    if not callable(key):
        return None

    def keyed(value: Any) -> Any:
        try:
            return key(value)
        except Exception:  # a malformed value: no key, as a file source gives it
            return None

    return keyed


def _prepared(
    pipeline: Pipeline, inputs: Mapping[str, Iterable[Any]]
) -> tuple[Pipeline, dict[str, Collect]]:
    sources = {s.step_id for s in pipeline.steps if s.kind == "source"}
    unknown = sorted(set(inputs) - sources)
    if unknown:
        raise PipelineDefinitionError(
            f"inputs name no source step: {unknown}; the source steps are {sorted(sources)}"
        )
    sinks: dict[str, Collect] = {}
    steps: list[Step] = []
    for declared in pipeline.steps:
        step = declared
        if step.step_id in inputs:
            key = _keyed_as(step.source)
            step = replace(step, source=IterableSource(list(inputs[step.step_id]), key=key))
        elif step.kind == "sink" and step.sink is not None:
            sinks[step.step_id] = Collect()
            step = replace(step, sink=sinks[step.step_id])
        steps.append(step)
    prepared = pipeline._derive(tuple(steps), pipeline.tail)
    return prepared, sinks


async def run_pipeline_async(
    pipeline: Pipeline, inputs: Mapping[str, Iterable[Any]] | None = None, *, workers: int = 1
) -> TestResult:
    """Run ``pipeline`` on a fresh memory log until every input is processed."""
    prepared, sinks = _prepared(pipeline, inputs or {})
    log = MemoryLog()
    await run_in_process(compile_pipeline(prepared), log, workers=workers)
    return TestResult(sinks=sinks, log=log, pipeline=prepared)


def run_pipeline(
    pipeline: Pipeline, inputs: Mapping[str, Iterable[Any]] | None = None, *, workers: int = 1
) -> TestResult:
    """:func:`run_pipeline_async` from synchronous code, also where a loop is already running
    (Jupyter): then the pipeline runs on its own loop in a helper thread."""
    coroutine = run_pipeline_async(pipeline, inputs, workers=workers)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: list[TestResult | BaseException] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(coroutine))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=target, name="headwater-testing")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]
