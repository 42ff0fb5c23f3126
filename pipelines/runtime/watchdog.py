"""Watching the steps as they run: stalls, per-record timeouts, and stopping a stuck worker.

A worker runs every step of every task on one thread, so a user function that never returns
(a ``time.sleep(60)``, a request without a timeout) holds up the whole worker. Three things keep
that visible and bounded:

- :data:`activity` says what the stepping thread is doing: the step it is in, since when, and
  which input records (set once per step and batch, so the hot loop does not pay per record).
- A :class:`Watchdog` thread in each worker process looks at it a few times a second. A step
  that has not returned for ``stall_after`` seconds is reported once, with the worker, step,
  partition, offsets and the file and line the thread is at; so is its end, if it comes.
  When the worker is asked to stop and the thread is stuck in a step, the watchdog interrupts
  it: the batch in hand is abandoned uncommitted (the next owner of its partitions processes
  it again, as after a crash) and the worker leaves at once instead of after a grace period.
- ``timeout=`` on ``map``, ``filter``, ``flat_map`` and ``peek`` (:func:`with_timeout`) bounds
  each call of the user function with a real-time interval timer; a call that runs over raises
  :class:`~pipelines.errors.StepTimeout` inside it, and the step's error policy routes that
  record like any other error. Timers are signals, which only the main thread receives:
  elsewhere (a pipeline run from a thread) the calls go unbounded, with a warning. An
  ``async def`` step function needs no timer: each of its calls is cancelled on its loop once
  it runs over, and fails with the same error (:mod:`operators.concurrent`).

Interrupting works for Python code and for the blocking calls Python retries on a signal
(sleeps, socket and file I/O); a C extension that never checks for signals cannot be interrupted
this way, and only killing the process stops it (the runner does that after its grace period).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pipelines.errors import StepTimeout
from pipelines.log.base import TopicPartition

__all__ = [
    "STALL_AFTER",
    "Abandoned",
    "Activity",
    "Watchdog",
    "WorkerNote",
    "activity",
    "with_timeout",
]

_log = logging.getLogger(__name__)

STALL_AFTER = 10.0
"""Seconds a step may run on one batch before it is reported as stalled."""
_LOOK_EVERY = 0.2
_STOP_WAIT = 1.0
"""Seconds a stopping worker lets a step finish before interrupting it."""
_INTERRUPT = signal.SIGUSR1


class Abandoned(BaseException):
    """Raised in the stepping thread of a worker told to stop while a step was stuck.

    A ``BaseException``, so that the ``except Exception`` of a user function or of the error
    policy does not take it for a record's failure."""


@dataclass(frozen=True, slots=True)
class WorkerNote:
    """Something a worker tells the runner to show as it happens: a step stalled, or returned
    at last; work abandoned when the worker was told to stop."""

    worker: int
    message: str


class Activity:
    """What the stepping thread of this process is doing (one per process: see above)."""

    __slots__ = ("first", "last", "since", "step", "tp")

    def __init__(self) -> None:
        self.step: str | None = None
        self.since = 0.0
        self.tp: TopicPartition | None = None
        self.first = self.last = 0

    def reading(self, tp: TopicPartition, first: int, last: int) -> None:
        """The records being processed: offsets ``first``..``last`` of ``tp``."""
        self.tp, self.first, self.last = tp, first, last

    def enter(self, step: str) -> None:
        """Start running ``step``."""
        self.step = step
        self.since = time.monotonic()

    def idle(self) -> None:
        """No step is running."""
        self.step = None

    def where(self) -> str:
        """The records being processed, for a message."""
        if self.tp is None:
            return "no input yet"
        return f"{self.tp} offsets {self.first:,}-{self.last:,}"


activity = Activity()
"""The activity of the one thread that runs steps in this process."""


def _location(frame: FrameType | None) -> str:
    """``file:line in function`` of the innermost Python frame of a thread."""
    if frame is None:
        return "an unknown place"
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


class Watchdog:
    """A daemon thread that reports stalled steps and interrupts a stuck worker told to stop.

    Create it on the thread that runs the steps (the main thread of a worker process)."""

    def __init__(
        self,
        worker: int,
        report: Callable[[WorkerNote], None],
        *,
        stall_after: float = STALL_AFTER,
    ) -> None:
        self._worker = worker
        self._report = report
        self._stall_after = stall_after
        self._target = threading.get_ident()
        self._closed = threading.Event()
        self._stopping_since: float | None = None
        self._interrupted: tuple[str, float] | None = None  # the step interrupted last
        self._stalled: tuple[str, float] | None = None  # the stall reported, until it ends
        self._thread = threading.Thread(target=self._watch, name="headwater-watchdog", daemon=True)
        signal.signal(_INTERRUPT, _abandon)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=1)

    def stopping(self) -> None:
        """The worker was told to stop (call from its signal handler): a stuck step is
        interrupted if it has not returned within a second."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()

    def _watch(self) -> None:
        while not self._closed.wait(_LOOK_EVERY):
            step, since = activity.step, activity.since
            now = time.monotonic()
            if self._stalled is not None and (step, since) != self._stalled:
                self._ended(now)
            if step is None:
                continue
            stopping = self._stopping_since
            if (
                stopping is not None
                and self._interrupted != (step, since)
                and now - max(since, stopping) >= _STOP_WAIT
            ):
                self._interrupted = (step, since)
                signal.pthread_kill(self._target, _INTERRUPT)
            if self._stalled is None and now - since >= self._stall_after:
                self._stalled = (step, since)
                frame = sys._current_frames().get(self._target)
                self._send(
                    f"worker {self._worker}: step {step!r} has not returned for "
                    f"{now - since:,.0f} s, on {activity.where()}, at {_location(frame)}"
                )

    def _ended(self, now: float) -> None:
        assert self._stalled is not None
        step, since = self._stalled
        self._stalled = None
        self._send(f"worker {self._worker}: step {step!r} returned after {now - since:,.0f} s")

    def _send(self, message: str) -> None:
        with contextlib.suppress(OSError):  # the runner is gone; this process goes with it
            self._report(WorkerNote(self._worker, message))


def _abandon(signum: int, frame: FrameType | None) -> None:
    """The watchdog's interrupt: abandon the step in hand, if one still runs."""
    if activity.step is not None:
        raise Abandoned(f"stopped in step {activity.step!r}, on {activity.where()}")


class _Timers:
    """The process's one real-time timer, as :func:`with_timeout` uses it."""

    bound = 0.0  # the timeout of the call running now, for the message
    warned = False  # that timeouts are not enforced off the main thread


def with_timeout(fn: Callable[[Any], Any], seconds: float) -> Callable[[Any], Any]:
    """``fn`` with each call bounded to ``seconds`` of real time (see the module docstring)."""

    @functools.wraps(fn)
    def bounded(value: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            _warn_unbounded(fn)
            return fn(value)
        if signal.getsignal(signal.SIGALRM) is not _time_out:
            signal.signal(signal.SIGALRM, _time_out)
        _Timers.bound = seconds
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(value)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    return bounded


def _time_out(signum: int, frame: FrameType | None) -> None:
    raise StepTimeout(_Timers.bound)


def _warn_unbounded(fn: Callable[[Any], Any]) -> None:
    if not _Timers.warned:
        _Timers.warned = True
        _log.warning(
            "timeout= of %s is not enforced: the pipeline runs outside the main thread, and "
            "timers only interrupt the main thread",
            getattr(fn, "__qualname__", fn),
        )
