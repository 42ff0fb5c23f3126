"""The operator contract: ``open(ctx)`` / ``process(batch)`` / ``close()``.

``process`` is synchronous and works on a whole :class:`~pipelines.batch.Batch`: the task that
calls it never awaits. An async step function does not change that: its operator runs the
batch's calls concurrently on a loop of their own and waits for them all
(:mod:`operators.concurrent`).

An operator never decides what happens to a record whose user function raised: it reports it
with :meth:`StepContext.reject` and the runtime applies the step's error policy (fail, skip, or
dead-letter with the original bytes). :func:`reject_call` is how every operator does that for a
user function's error, from the ``except`` of the ``try`` around the call (or around the loop of
calls, as :func:`call_each` has), so a record that passes pays for no call of its own.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, Protocol

from pipelines.batch import Batch
from pipelines.errors import RecordError, StepError
from pipelines.state.store import KeyValueStore

__all__ = [
    "USER_MODULE_PREFIX",
    "CallsEach",
    "Operator",
    "StepContext",
    "call_each",
    "describe_function",
    "reject_call",
]

USER_MODULE_PREFIX = "headwater_user_"
"""The name of a pipeline module loaded from its path starts with this."""


class StepContext(Protocol):
    """What the runtime gives an operator for one task (one sub-topology on one partition)."""

    @property
    def step_id(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def store(self) -> KeyValueStore:
        """The step's keyed state on this partition (stateful steps only)."""
        ...

    def reject(self, batch: Batch, index: int, error: RecordError) -> None:
        """Apply the step's error policy to record ``index`` of ``batch`` (may raise)."""

    def late(self, batch: Batch, index: int) -> None:
        """Send record ``index`` of ``batch`` to the step's late-data topic, and count it."""

    def observe(self, batch: Batch) -> None:
        """The records of ``batch`` now carry their event times (the step set them): they are
        what moves the mark of the input partition they were read from."""


class Operator(ABC):
    """One step's processing for one task."""

    def __init__(self, step_id: str) -> None:
        self.step_id = step_id
        self._ctx: StepContext | None = None

    @property
    def ctx(self) -> StepContext:
        if self._ctx is None:
            raise RuntimeError(f"operator {self.step_id!r} used before open()")
        return self._ctx

    def open(self, ctx: StepContext) -> None:
        """Called once before the first batch of a task."""
        self._ctx = ctx

    @abstractmethod
    def process(self, batch: Batch) -> Batch:
        """The batch this step passes on."""

    @property
    def pending(self) -> int:
        """How many results wait for time to pass (open windows); the run waits for them."""
        return 0

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        """Every input of the task has progressed to event time ``mark`` (see
        :mod:`operators._timing`); returns what that lets the step emit (windows that close,
        say), as records read from the same place as the empty ``batch``."""
        return batch

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Called once when the task ends (revocation or shutdown)."""


def _short(filename: str) -> str:
    """``filename`` relative to the working directory when it is below it."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if relative.startswith("..") else relative


def describe_function(fn: Callable[..., Any]) -> str:
    """A short name for a user function, for error messages: its name and where it is
    defined (``parse (jobs/clicks.py:12)``, ``<lambda> (jobs/clicks.py:30)``)."""
    fn = inspect.unwrap(fn)  # a function wrapped by Headwater (timeout=) or a decorator
    if isinstance(fn, functools.partial):
        return f"partial({describe_function(fn.func)})"
    name = getattr(fn, "__qualname__", None)
    if name is None:  # an object with a __call__
        return f"a {describe_function(type(fn))} object"
    code = getattr(fn, "__code__", None)
    if code is not None:
        return f"{name} ({_short(code.co_filename)}:{code.co_firstlineno})"
    module = getattr(fn, "__module__", None)
    filename = getattr(sys.modules.get(module or ""), "__file__", None)
    if module and module.startswith(USER_MODULE_PREFIX) and filename:
        return f"{name} ({_short(filename)})"  # a class of a pipeline module loaded by path
    return f"{module}.{name}" if module and module != "builtins" else name


_OURS = tuple(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + package + os.sep
    for package in ("pipelines", "operators", "connectors")
)
"""Where Headwater's own code lives: frames there are not where a user function raised."""


def _raised_at(error: BaseException) -> str:
    """`` at file:line``: the innermost frame of ``error``'s traceback outside Headwater's
    own code (a timeout is raised by a signal handler of ours, in the user's frame), or
    nothing."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not os.path.abspath(f.filename).startswith(_OURS)
    ]
    return f" at {_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""


def reject_call(
    ctx: StepContext,
    fn: Callable[..., Any],
    error: Exception,
    batch: Batch,
    index: int,
    *,
    name: str | None = None,
) -> None:
    """Reject record ``index`` of ``batch`` through ``ctx``, for the step's error policy to
    route: the user function ``fn`` (for an aggregation, its class) raised ``error`` on it.
    ``name`` is what the message calls ``fn`` (default: :func:`describe_function`)::

        try:
            result = fn(value)
        except Exception as error:  # any user error: routed by the step's policy
            reject_call(ctx, fn, error, batch, index)
            continue
    """
    rejection = StepError(
        f"{name or describe_function(fn)} raised {type(error).__name__}: {error}"
        f"{_raised_at(error)}",
        step=ctx.step_id,
        source=batch.source_of(index),
    )
    rejection.__cause__ = error
    ctx.reject(batch, index, rejection)


class CallsEach(Protocol):
    """How an operator calls its user function on a batch: :func:`call_each` for a plain
    function, :class:`~operators.concurrent.Concurrent` for an async one."""

    def __call__(
        self,
        ctx: StepContext,
        fn: Callable[[Any], Any],
        batch: Batch,
        items: Sequence[Any] | None = None,
        *,
        name: str | None = None,
    ) -> tuple[list[Any], set[int]]: ...


def call_each(
    ctx: StepContext,
    fn: Callable[[Any], Any],
    batch: Batch,
    items: Sequence[Any] | None = None,
    *,
    name: str | None = None,
) -> tuple[list[Any], set[int]]:
    """``fn`` applied to every value of ``batch`` (or to ``items``, one per record), and the
    indices where it raised, which are already rejected through ``ctx``. ``name`` is what error
    messages call ``fn`` (default: its qualified name).

    Each item is passed to ``fn`` exactly once, also when some of them fail.
    """
    results: list[Any] = []
    failed: set[int] = set()
    values = batch.values if items is None else items
    while True:
        try:
            # list.extend keeps what map produced before an exception: C speed, one call each
            results.extend(map(fn, islice(values, len(results), None)))
        except Exception as error:  # any user error: routed by the step's policy
            index = len(results)
            failed.add(index)
            results.append(None)
            reject_call(ctx, fn, error, batch, index, name=name)
        else:
            return results, failed
