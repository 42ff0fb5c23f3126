"""``headwater run``: source tasks in this process, N worker processes in one consumer group.

``headwater worker`` (Kafka) starts only worker processes, which join the group of a pipeline
that runs elsewhere, and keeps them running until it is stopped.

Each worker process loads the pipeline module by path itself and runs one
:class:`~pipelines.runtime.worker.Worker`; it reports to the runner over its own pipe (one pipe
per worker, so a worker killed mid-message cannot jam the others). The runner shows progress,
notices dead workers (their partitions move to the survivors through the group) and starts new
ones in their place (``restart``, with a backoff and a limit), stops when the sources are
exhausted and every record is processed, and on Ctrl-C/SIGTERM stops the workers cleanly: each
finishes its batch, commits and leaves. Workers die with the runner: none outlives a ``kill -9``
of it holding partitions.

With the ``memory`` backend everything runs in this one process instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pipelines.errors import LogError, PipelineError
from pipelines.loader import load_pipeline
from pipelines.log import open_log
from pipelines.log.base import LogBackend
from pipelines.runtime.engine import (
    Sources,
    is_drained,
    lag,
    prepare_topics,
    refuse_a_second_copy,
)
from pipelines.runtime.hotkeys import HOT_KEY_SHARE
from pipelines.runtime.housekeeping import Housekeeping
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.progress import Progress, RunState
from pipelines.runtime.runlock import run_lock
from pipelines.runtime.status import StatusFile
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.runtime.watchdog import STALL_AFTER, Abandoned, Watchdog, WorkerNote, activity
from pipelines.runtime.worker import Worker, WorkerReport
from pipelines.settings import KafkaSettings

if TYPE_CHECKING:  # prometheus_client is an extra: imported only when asked for
    from pipelines.runtime.metrics import MetricsServer

__all__ = ["RunOptions", "quiet_clients", "run", "worker_main"]

_TICK = 0.1
_STOP_GRACE = 30.0
_RESTART_BACKOFF = 0.2
_RESTART_BACKOFF_MAX = 10.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a pipeline module."""

    spec: str
    workers: int = 1
    backend: str = "embedded"
    data_dir: Path = Path(".headwater")
    progress: bool = True
    kafka: KafkaSettings | None = None
    sources: bool = True
    """False for ``headwater worker``: join the group, run no sources, never stop on drain."""
    restart: str = "on-failure"
    """``on-failure``: start a new worker process for one that was killed or crashed (not for
    one that stopped on a pipeline error, which would only repeat it); ``never``."""
    restart_limit: int = 10
    """Restarts allowed within a minute; one more ends the run."""
    stall_after: float = STALL_AFTER
    """Seconds a step may run on one batch before the run reports it as stalled."""
    max_dead_letter_ratio: float | None = None
    """The share of a step's records it may dead-letter before the run fails; None: the
    pipeline's ``max_dead_letter_ratio``."""
    hot_key_share: float = HOT_KEY_SHARE
    """Warn when one key carries more than this share of a partition's records (see
    :mod:`pipelines.runtime.hotkeys`); above 1: never."""
    metrics_port: int | None = None
    """Serve Prometheus metrics of the run on this port (see :mod:`pipelines.runtime.metrics`)."""
    metrics_host: str = "127.0.0.1"

    @property
    def state_dir(self) -> Path | None:
        """Where workers keep local copies of their state (none for the memory backend)."""
        return None if self.backend == "memory" else self.data_dir / "state"

    def open_log(self) -> LogBackend:
        return open_log(self.backend, data_dir=self.data_dir, kafka=self.kafka)

    def compile(self) -> Topology:
        group = self.kafka.group_id if self.kafka is not None else None
        return compile_pipeline(load_pipeline(self.spec), group=group)


class RunFailed(PipelineError):
    """A worker stopped with an error, every worker died, or a step rejected too much."""


RATIO_AFTER = 100
"""Records a step must have had before its share of dead letters can fail the run."""


def check_dead_letters(state: RunState, limit: float) -> None:
    """Fail the run when a step, after :data:`RATIO_AFTER` records, has sent more than
    ``limit`` of them to dead letters: a broken function should stop the run, not quietly
    dead-letter the whole input."""
    totals = state.step_totals()
    for step_id, (records_in, _, _, dead, _) in totals.items():
        if records_in < RATIO_AFTER or dead <= limit * records_in:
            continue
        topic = state.topology.pipeline.dead_letter_topic.name
        first = state.first_errors().get(step_id, "unknown")
        raise RunFailed(
            f"step {step_id!r} sent {dead:,} of its {records_in:,} records to dead letters "
            f"({dead / records_in:.0%}), more than the {limit:.0%} allowed "
            f"(max_dead_letter_ratio of the pipeline, or --max-dead-letter-ratio). The first: "
            f"{first}. Fix the step and run again; the rejected records are on {topic} "
            f"(`headwater topics tail {topic}`)"
        )


def quiet_clients() -> None:
    """Keep the Kafka client's own logging out of the user's terminal: it reports every
    rebalance, and during a broker outage thousands of reconnection attempts a second; and the
    exceptions of its background tasks nobody retrieved. What matters reaches the user as
    Headwater's own errors (connection timeouts name the servers)."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ClientLeftovers) for f in asyncio_log.filters):
        asyncio_log.addFilter(_ClientLeftovers())


class _ClientLeftovers(logging.Filter):
    """Drops asyncio's report of an exception nobody retrieved when it is the Kafka client's (a
    send of a producer fenced while its worker was stopping with an error of its own; the TLS
    alert a connection's read task got from a broker that refused the client's certificate):
    the user hears of what went wrong from Headwater, in one paragraph, not as a traceback
    after it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not _from_client(error)


def _from_client(error: BaseException) -> bool:
    """Whether ``error`` is one of the Kafka client's own, or was raised in its code (an
    ``ssl.SSLError`` is raised through aiokafka's connection)."""
    if type(error).__module__.startswith("aiokafka"):
        return True
    trace = error.__traceback__
    while trace is not None:
        if str(trace.tb_frame.f_globals.get("__name__", "")).startswith("aiokafka."):
            return True
        trace = trace.tb_next
    return False


def worker_main(options: RunOptions, index: int, channel: Connection, parent: int) -> None:
    """The body of a worker process."""
    _stop_with(parent)
    quiet_clients()
    # a worker allocates a dict or two per record and keeps few of them: collecting young
    # objects every 700 allocations cost 9% of at-least-once CPU (18% under exactly-once)
    gc.set_threshold(50_000, 20, 20)
    send = _serialised(channel)
    try:
        asyncio.run(_work(options, options.compile(), index, send))
    except PipelineError as error:
        retriable = isinstance(error, LogError) and error.retriable
        send(WorkerReport(index, {}, [], 0, done=True, error=str(error), retriable=retriable))
        raise SystemExit(1) from None


def _serialised(channel: Connection) -> Callable[[object], None]:
    """``channel.send`` for two threads (the worker's and its watchdog's)."""
    lock = threading.Lock()

    def send(message: object) -> None:
        with lock:
            channel.send(message)

    return send


def _stop_with(parent: int) -> None:
    """Have the kernel kill this process when its parent (the runner) dies, so a ``kill -9``
    of the runner leaves no orphan worker holding its partitions, even one stuck in a user
    function (Linux: the parent-death signal). A worker that is not stuck would notice anyway,
    when its next report finds the pipe broken; SIGKILL is what reaches a stuck one. What it
    had not committed is replayed by the next owner, as after any crash."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the runner died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


async def _work(
    options: RunOptions, topology: Topology, index: int, send: Callable[[object], None]
) -> None:
    log = options.open_log()
    worker = Worker(topology, log, index=index, report=send, state_dir=options.state_dir)
    watchdog = Watchdog(index, send, stall_after=options.stall_after)
    loop = asyncio.get_running_loop()
    signals = 0

    def stop(signum: int, frame: FrameType | None) -> None:
        # a plain handler, not the loop's: it runs even while a user function holds the
        # thread, and a second SIGTERM abandons a stuck step at once
        nonlocal signals
        signals += 1
        watchdog.stopping()
        loop.call_soon_threadsafe(worker.stop.set)
        if signals > 1 and activity.step is not None:
            raise Abandoned(f"stopped in step {activity.step!r}, on {activity.where()}")

    # Ctrl-C reaches every process of the terminal's group: the runner alone answers it (it
    # stops the workers with SIGTERM, or kills them on a second Ctrl-C)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    watchdog.start()
    try:
        await worker.run()
    finally:
        watchdog.close()
        await log.close()
    if worker.abandoned is not None:
        send(
            WorkerNote(
                index,
                f"worker {index} {worker.abandoned}: it left without committing what it did "
                "since its last checkpoint, which is processed again when the pipeline runs",
            )
        )


@dataclass
class _WorkerProcess:
    index: int
    process: BaseProcess
    channel: Connection
    gone: bool = False
    noted: bool = False
    failed: bool = False
    """Killed or crashed without reporting an error: a restart may help."""
    replaced: bool = False


def run(options: RunOptions) -> RunState:
    """Run the pipeline module ``options.spec`` to the end of its input (or until stopped)."""
    topology = options.compile()
    state = RunState(topology, options.backend, options.workers)
    if not options.sources or options.backend == "memory":
        return asyncio.run(_run(options, topology, state))
    with run_lock(options.data_dir, topology.pipeline.name):
        return asyncio.run(_run(options, topology, state))


async def _run(options: RunOptions, topology: Topology, state: RunState) -> RunState:
    log = options.open_log()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted(signum: int) -> None:
        if stop.is_set():  # the second Ctrl-C: no more waiting
            state.forced = True
        state.stopped_by = signum
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, interrupted, signum)
    metrics = None
    status = (
        StatusFile(options.data_dir, state)
        if options.sources and options.backend != "memory"
        else None
    )
    outcome = "failed"
    try:
        metrics = _serve_metrics(options, state)
        with Progress(state, enabled=options.progress) as progress:
            if options.backend == "memory":
                await _run_here(options, topology, log, state, progress, stop)
            else:
                await _supervise(options, topology, log, state, progress, stop, status)
        outcome = "finished" if state.stopped_by is None else "stopped"
    except PipelineError as error:
        outcome = f"failed: {error}"
        raise
    finally:
        if status is not None:
            status.update(outcome, force=True)
        if metrics is not None:
            metrics.close()
        await log.close()
    return state


def _serve_metrics(options: RunOptions, state: RunState) -> MetricsServer | None:
    """The run's ``/metrics`` endpoint, if asked for."""
    if options.metrics_port is None:
        return None
    try:
        from pipelines.runtime.metrics import MetricsServer  # noqa: PLC0415 (optional Prometheus)
    except ImportError:
        raise PipelineError(
            "--metrics-port needs the Prometheus client: pip install 'headwater[metrics]'"
        ) from None
    try:
        return MetricsServer(state, options.metrics_port, options.metrics_host)
    except OSError as error:
        raise PipelineError(
            f"cannot serve metrics on {options.metrics_host}:{options.metrics_port}: "
            f"{error.strerror or error}; choose another --metrics-port"
        ) from None


async def _run_here(
    options: RunOptions,
    topology: Topology,
    log: LogBackend,
    state: RunState,
    progress: Progress,
    stop: asyncio.Event,
) -> None:
    def on_report(report: WorkerReport) -> None:
        state.reports[report.worker] = report
        progress.warn_hot_keys(options.hot_key_share)
        progress.refresh()

    await prepare_topics(log, topology)
    await refuse_a_second_copy(log, topology, options.spec)  # in memory: always afresh
    result = await run_in_process(
        topology, log, workers=options.workers, stop=stop, on_report=on_report
    )
    state.sources = result.sources
    state.lag = await lag(log, topology)
    check_dead_letters(state, _dead_letter_limit(options, topology))


def _dead_letter_limit(options: RunOptions, topology: Topology) -> float:
    if options.max_dead_letter_ratio is not None:
        return options.max_dead_letter_ratio
    return topology.pipeline.max_dead_letter_ratio


async def _supervise(
    options: RunOptions,
    topology: Topology,
    log: LogBackend,
    state: RunState,
    progress: Progress,
    stop: asyncio.Event,
    status: StatusFile | None = None,
) -> None:
    await prepare_topics(log, topology)
    if options.sources:
        await refuse_a_second_copy(log, topology, options.spec)
    workers = [_spawn(options, i) for i in range(options.workers)]
    restarts = _Restarts(options)
    sources = Sources(log, topology)
    housekeeping = Housekeeping(log, topology)
    state.sources = sources.progress
    finished_once = False  # the end is confirmed by two checks in a row (a report in flight)
    outage = _Outage(progress)
    limit = _dead_letter_limit(options, topology)
    try:
        if options.sources:
            await sources.start()
        while not stop.is_set():
            _collect_reports(workers, state, progress, restart=options.restart != "never")
            check_dead_letters(state, limit)
            progress.warn_hot_keys(options.hot_key_share)
            if options.restart != "never":
                workers += restarts.due(workers, progress)
            if all(w.process.exitcode is not None for w in workers) and not restarts.pending:
                raise RunFailed("every worker has stopped before the input was processed")
            sources.raise_failure()
            ended = options.sources and sources.done
            drained = await _look_after(log, topology, state, housekeeping, outage, ended=ended)
            progress.refresh()
            if status is not None:
                status.update()
            finished = drained and _settled(workers, state)
            if finished and finished_once:
                break
            finished_once = bool(finished)
            await asyncio.sleep(_TICK)
        else:
            progress.note("stopping: the workers finish their batch, commit and leave")
    finally:
        await sources.stop()
        await _stop_workers(workers, state, progress)
        state.lag = await lag(log, topology)
    _collect_reports(workers, state, progress)
    progress.warn_hot_keys(options.hot_key_share)
    check_dead_letters(state, limit)


def _settled(workers: list[_WorkerProcess], state: RunState) -> bool:
    """Whether every live worker has reported, with nothing waiting for time (open windows)."""
    live = [w for w in workers if not w.gone]
    return all(w.index in state.reports and state.reports[w.index].pending == 0 for w in live)


def _spawn(options: RunOptions, index: int) -> _WorkerProcess:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=worker_main,
        args=(options, index, sender, os.getpid()),
        name=f"headwater-worker-{index}",
    )
    process.start()
    sender.close()
    return _WorkerProcess(index, process, receiver)


async def _look_after(
    log: LogBackend,
    topology: Topology,
    state: RunState,
    housekeeping: Housekeeping,
    outage: _Outage,
    *,
    ended: bool,
) -> bool:
    """Housekeeping and the lag, then whether the input is drained (only once the sources
    ``ended``). A log error a retry may help goes to ``outage`` and counts as not drained: the
    workers go on, or stop and are restarted, on their own."""
    try:
        await housekeeping.run_due()
        state.lag = await lag(log, topology)
        drained = ended and await is_drained(log, topology)
    except LogError as error:
        if not error.retriable:
            raise
        outage.lost(error)
        return False
    outage.back()
    return drained


class _Outage:
    """Whether the runner's own calls to the log (lag, the end of the input, housekeeping)
    fail with an error a retry may help, such as a broker restarting: said once when they start
    failing and once when they answer again; meanwhile the run goes on."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._since: float | None = None

    def lost(self, error: LogError) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._progress.note(
                f"the runner cannot reach the log: {error}; the run goes on, and the runner "
                "tries again",
                logging.WARNING,
            )

    def back(self) -> None:
        if self._since is not None:
            seconds = time.monotonic() - self._since
            self._progress.note(f"the runner reaches the log again, after {seconds:.0f} s")
            self._since = None


class _Restarts:
    """Starts a new worker process for each failed one, after a backoff that doubles with
    every restart of the last minute (0.2 s, 0.4 s ... at most 10 s), up to the limit."""

    def __init__(self, options: RunOptions) -> None:
        self._options = options
        self._next_index = options.workers  # a new index: the old one's numbers stay counted
        self._recent: list[float] = []  # when restarts happened, over the last minute
        self._waiting: dict[int, float] = {}  # index of a failed worker -> when to replace it

    @property
    def pending(self) -> bool:
        return bool(self._waiting)

    def due(self, workers: list[_WorkerProcess], progress: Progress) -> list[_WorkerProcess]:
        """The workers started now, in place of failed ones whose backoff is over."""
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < 60]
        for worker in workers:
            if worker.failed and not worker.replaced and worker.index not in self._waiting:
                if len(self._recent) + len(self._waiting) >= self._options.restart_limit:
                    raise RunFailed(
                        f"worker {worker.index} failed after {self._options.restart_limit} "
                        "restarts within a minute; giving up (see the messages above)"
                    )
                backoff = min(_RESTART_BACKOFF * 2 ** len(self._recent), _RESTART_BACKOFF_MAX)
                self._waiting[worker.index] = now + backoff
        started = []
        for worker in workers:
            if self._waiting.get(worker.index, now + 1) <= now:
                del self._waiting[worker.index]
                worker.replaced = True
                self._recent.append(now)
                new = _spawn(self._options, self._next_index)
                progress.note(f"worker {new.index} started in place of worker {worker.index}")
                progress.state.restarts += 1
                self._next_index += 1
                started.append(new)
        return started


def _note_standbys(report: WorkerReport, last: WorkerReport | None, progress: Progress) -> None:
    """Show what the worker's standbys did since its last report."""
    for message in report.standby_events[len(last.standby_events) if last is not None else 0 :]:
        progress.note(message)


def _collect_reports(
    workers: list[_WorkerProcess], state: RunState, progress: Progress, *, restart: bool = False
) -> None:
    for worker in workers:
        try:
            while not worker.gone and worker.channel.poll():
                report = worker.channel.recv()
                if isinstance(report, WorkerNote):
                    progress.note(report.message, logging.WARNING)
                    continue
                _note_standbys(report, state.reports.get(report.worker), progress)
                if report.error is not None and report.worker in state.reports:
                    # a worker's last words carry no counts: keep those it reported before
                    last = state.reports[report.worker]
                    report.steps, report.records = last.steps, last.records
                    report.first_errors = last.first_errors
                state.reports[report.worker] = report
                if report.error is not None and report.retriable and restart:
                    progress.note(
                        f"worker {worker.index} stopped on a transient error: {report.error}",
                        logging.WARNING,
                    )
                elif report.error is not None:
                    raise RunFailed(f"worker {worker.index} stopped: {report.error}")
        except (EOFError, OSError):
            worker.gone = True
        code = worker.process.exitcode
        if code is None or worker.noted:
            continue
        worker.gone = worker.noted = True
        if code < 0:
            progress.note(
                f"worker {worker.index} was killed by signal {-code}; "
                "its partitions move to the other workers",
                logging.WARNING,
            )
        elif code > 0 and not restart:
            raise RunFailed(f"worker {worker.index} exited with status {code}")
        elif code > 0:
            progress.note(f"worker {worker.index} exited with status {code}", logging.WARNING)
        worker.failed = code != 0


async def _stop_workers(workers: list[_WorkerProcess], state: RunState, progress: Progress) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()  # SIGTERM: finish the batch, commit, leave
    deadline = asyncio.get_running_loop().time() + _STOP_GRACE
    while any(w.process.is_alive() for w in workers):
        if state.forced:
            progress.note(
                "stopped at once: the workers were killed; what they did since their last "
                "checkpoint is processed again when the pipeline runs next",
                logging.WARNING,
            )
            for worker in workers:
                worker.process.kill()
            break
        if asyncio.get_running_loop().time() > deadline:
            for worker in workers:
                if worker.process.is_alive():
                    progress.note(
                        f"worker {worker.index} did not stop in time; killing it", logging.WARNING
                    )
                    worker.process.kill()
            break
        for worker in workers:
            _drain(worker, state, progress)
        await asyncio.sleep(0.05)
    for worker in workers:
        worker.process.join(timeout=5)


def _drain(worker: _WorkerProcess, state: RunState, progress: Progress) -> None:
    """Take in what a stopping worker has sent."""
    try:
        while worker.channel.poll():
            report = worker.channel.recv()
            if isinstance(report, WorkerNote):
                progress.note(report.message, logging.WARNING)
            else:
                state.reports[report.worker] = report
    except (EOFError, OSError):
        pass
