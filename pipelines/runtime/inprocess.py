"""Run a whole pipeline inside this process: sources and N workers on one event loop.

This is how the ``memory`` backend runs (notebooks, ``pipelines.testing``, ``headwater run
--backend memory``); it works on any backend, but only the runner's worker processes use more
than one core.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from pipelines.log.base import LogBackend
from pipelines.runtime.engine import Sources, is_drained, prepare_topics
from pipelines.runtime.housekeeping import Housekeeping
from pipelines.runtime.sources import SourceProgress
from pipelines.runtime.topology import Topology
from pipelines.runtime.worker import COMMIT_INTERVAL, MAX_BATCH, Worker, WorkerReport

__all__ = ["InProcessRun", "run_in_process"]

_CHECK_SECONDS = 0.02


@dataclass(slots=True)
class InProcessRun:
    """What a finished in-process run reports."""

    sources: list[SourceProgress]
    reports: dict[int, WorkerReport] = field(default_factory=dict)


async def run_in_process(
    topology: Topology,
    log: LogBackend,
    *,
    workers: int = 1,
    stop: asyncio.Event | None = None,
    on_report: Callable[[WorkerReport], None] | None = None,
    commit_interval: float = COMMIT_INTERVAL,
    max_batch: int = MAX_BATCH,
) -> InProcessRun:
    """Run until the sources are exhausted and every record is processed, or until ``stop``.
    ``commit_interval`` (seconds between the workers' checkpoints, and so their watermark
    markers) and ``max_batch`` (records per poll) are the workers'."""
    await prepare_topics(log, topology)
    run = InProcessRun(sources=[])

    def report(item: WorkerReport) -> None:
        run.reports[item.worker] = item
        if on_report is not None:
            on_report(item)

    members = [
        Worker(
            topology,
            log,
            index=i,
            report=report,
            commit_interval=commit_interval,
            max_batch=max_batch,
        )
        for i in range(workers)
    ]
    worker_tasks = [asyncio.create_task(w.run(), name=f"worker {w.index}") for w in members]
    sources = Sources(log, topology)
    housekeeping = Housekeeping(log, topology)
    run.sources = sources.progress
    try:
        await sources.start()
        while stop is None or not stop.is_set():
            sources.raise_failure()
            await housekeeping.run_due()
            for task in worker_tasks:
                if task.done():
                    task.result()  # a worker only ends early by raising
            settled = all(member.pending == 0 for member in members)
            if sources.done and settled and await is_drained(log, topology):
                break
            await asyncio.sleep(_CHECK_SECONDS)
    finally:
        for member in members:
            member.stop.set()
        await sources.stop()
        results = await asyncio.gather(*worker_tasks, return_exceptions=True)
    errors = [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
    if errors:
        raise errors[0]
    return run
