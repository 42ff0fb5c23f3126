"""Running a pipeline with batch boundaries the test knows.

The runtime moves a task's event-time watermark between batches, never inside one: the records
of a batch are judged (late or not) against the watermark from before it. What
:func:`pipelines.testing.run_pipeline` batches together depends on how far the sources got
before each poll, so a test whose expected results depend on batch boundaries runs the pipeline
with workers that poll one record at a time: every task then processes its partition's records
in batches of one, in the order they were written, and the watermark moves after each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from connectors.memory import Collect
from pipelines import Pipeline
from pipelines.log.memory import MemoryLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.steps import SinkStep
from pipelines.testing import TestResult


def _run_one_by_one(pipeline: Pipeline, *, workers: int = 1) -> TestResult:
    """Run ``pipeline`` on a fresh memory log until every input is processed, each worker
    polling one record at a time. The pipeline's ``Collect`` sinks (fresh ones: a test builds
    the pipeline for this run) receive the results."""
    sinks = {
        step.step_id: step.sink
        for step in pipeline.steps
        if isinstance(step, SinkStep) and isinstance(step.sink, Collect)
    }
    log = MemoryLog()
    asyncio.run(run_in_process(compile_pipeline(pipeline), log, workers=workers, max_batch=1))
    return TestResult(sinks=sinks, log=log, pipeline=pipeline)


@pytest.fixture
def run_one_by_one() -> Callable[..., TestResult]:
    """``run_one_by_one(pipeline, workers=1)``: run ``pipeline`` on a fresh memory log until
    every input is processed, each worker polling one record at a time; returns what its
    ``Collect`` sinks received and what is on the log."""
    return _run_one_by_one
