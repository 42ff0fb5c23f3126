"""The event loop async step functions run on: one per process, in a daemon thread.

An operator's ``process`` is synchronous, and the thread that calls it is the one running the
worker's own event loop: it cannot wait there for a coroutine of that loop, which would only
run once ``process`` returned. So the calls of async steps run on a loop of their own, in a
thread named ``headwater-async-steps`` started on first use; ``process`` hands it one coroutine
per batch and blocks until it is done. Every async step of the process uses that one loop for
as long as it runs, so a client a step function creates lazily on it (an ``aiohttp`` session,
a database pool) keeps working across batches, tasks and rebalances.

A worker holds the loop while it runs (:meth:`StepLoop.hold`); when the last worker of the
process leaves, the loop cancels what is left on it, shuts down, and its thread ends: a run in
a test or a notebook leaves no thread behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["THREAD_NAME", "StepLoop", "step_loop"]

THREAD_NAME = "headwater-async-steps"
_CLOSE_WAIT = 5.0
"""Seconds the loop has, when it closes, to cancel what still runs on it."""

_log = logging.getLogger(__name__)
T = TypeVar("T")


class StepLoop:
    """The loop of this process's async step calls (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._holders = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """What ``coroutine`` returns, run on the loop (started if it does not run yet)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._running())
        try:
            return future.result()
        except BaseException:
            # interrupted while waiting (a worker told to stop abandons a stuck step): the
            # calls still in flight are cancelled rather than left running on their own
            future.cancel()
            raise

    def hold(self) -> None:
        """A worker starts: keep the loop until it calls :meth:`release`."""
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """A worker leaves: the last one closes the loop."""
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._close()

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name=THREAD_NAME, daemon=True
                )
                self._thread.start()
            return self._loop

    def _close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(_wind_down(), loop).result(_CLOSE_WAIT)
        except TimeoutError:
            _log.warning(
                "async step calls still ran %g s after they were cancelled; their thread %s "
                "is left to end with the process",
                _CLOSE_WAIT,
                THREAD_NAME,
            )
            return
        finally:
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _wind_down() -> None:
    """What ``asyncio.run`` does before it closes its loop: cancel the tasks still running
    (ones a step function started in the background), finish async generators, and stop the
    default executor's threads."""
    loop = asyncio.get_running_loop()
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


step_loop = StepLoop()
"""The one loop of this process."""
