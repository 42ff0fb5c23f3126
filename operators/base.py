"""The operator contract: ``open(ctx)`` / ``process(batch)`` / ``close()``, and the ports.

``process`` is synchronous and works on a whole :class:`~pipelines.batch.Batch`: the task that
calls it never awaits. An async step function does not change that: its operator runs the
batch's calls concurrently on a loop of their own and waits for them all
(:mod:`operators.concurrent`).

**Ports.** An operator declares its named inputs and outputs in the class attribute
:attr:`Operator.ports` (a :class:`Ports`); the runtime wires the step's upstream streams to the
inputs and the downstream steps to the outputs by those declarations, and never looks at the
operator's class. Most operators keep the default, one input ``"in"`` and one output ``"out"``,
and implement ``process(batch) -> Batch``: the hot path is one call per batch, nothing
allocated around it. An operator with another number of inputs or outputs implements the
general form, ``process_ports(input, batch)``: ``input`` is the index (in ``ports.inputs``) of
the input the batch arrived on, and it returns one batch per output, in ``ports.outputs``
order. Several streams may feed one input (``merge`` has one input fed by every chain it
merges); with several inputs, each is fed by one stream, in the order the pipeline declares
them. Whatever an operator has to emit as event time passes (``on_watermark``) leaves by its
first output. State that the runtime prepares for a step comes through its context, not the
operator's class: the step's keyed state, one :class:`~pipelines.state.api.State` per namespace
(``ctx.state()`` for the default one, ``ctx.state("windows")`` for another: see
:mod:`pipelines.state.api`), and, for a ``join_table``, the table (``ctx.table``). How state is
restored, written to its changelog and copied to disk is the runtime's, not the operator's.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar, Protocol

from pipelines.batch import Batch
from pipelines.errors import RecordError, StepError
from pipelines.state.api import DEFAULT_NAMESPACE, State
from pipelines.state.table import TableStore

__all__ = [
    "IN",
    "OUT",
    "USER_MODULE_PREFIX",
    "CallsEach",
    "Operator",
    "Ports",
    "StepContext",
    "call_each",
    "describe_function",
    "reject_call",
]

USER_MODULE_PREFIX = "headwater_user_"
"""The name of a pipeline module loaded from its path starts with this."""

IN, OUT = "in", "out"
"""The names of the default input and output of an operator."""


@dataclass(frozen=True, slots=True)
class Ports:
    """The named inputs and outputs of an operator (see the module docstring): a step's
    output is the pair (step id, output name), as downstream steps name it."""

    inputs: tuple[str, ...] = (IN,)
    outputs: tuple[str, ...] = (OUT,)

    def __post_init__(self) -> None:
        for what, names in (("inputs", self.inputs), ("outputs", self.outputs)):
            if (
                not isinstance(names, tuple)
                or not names
                or not all(isinstance(name, str) and name for name in names)
                or len(set(names)) != len(names)
            ):
                raise ValueError(
                    f"Ports {what} must be a tuple of one or more distinct non-empty names, "
                    f"not {names!r}"
                )

    @property
    def single(self) -> bool:
        """One input and one output: the operator implements ``process``."""
        return len(self.inputs) == 1 and len(self.outputs) == 1


class StepContext(Protocol):
    """What the runtime gives an operator for one task (one sub-topology on one partition)."""

    @property
    def step_id(self) -> str: ...

    @property
    def partition(self) -> int: ...

    def state(self, name: str = DEFAULT_NAMESPACE) -> State:
        """Namespace ``name`` of the step's keyed state on this partition (stateful steps
        only); each name is a keyspace of its own, and the same name gives the same view."""
        ...

    @property
    def store(self) -> State:
        """The default namespace of the step's keyed state, as ``state()`` (the name operators
        written before namespaces use)."""
        ...

    @property
    def table(self) -> TableStore:
        """The partition of the table the step looks keys up in (``join_table`` steps only),
        read from the table topic before the step's first batch."""
        ...

    def reject(self, batch: Batch, index: int, error: RecordError) -> None:
        """Apply the step's error policy to record ``index`` of ``batch`` (may raise)."""

    def late(self, batch: Batch, index: int) -> None:
        """Send record ``index`` of ``batch`` to the step's late-data topic, and count it."""

    def observe(self, batch: Batch) -> None:
        """The records of ``batch`` now carry their event times (the step set them): they are
        what moves the mark of the input partition they were read from."""


class Operator:
    """One step's processing for one task: ``process`` (one input, one output) or
    ``process_ports`` (other :attr:`ports`), see the module docstring."""

    ports: ClassVar[Ports] = Ports()
    """The operator's inputs and outputs; a subclass with others declares them here."""

    def __init__(self, step_id: str) -> None:
        self.step_id = step_id
        self._ctx: StepContext | None = None
        cls = type(self)
        needed = "process" if cls.ports.single else "process_ports"
        if getattr(cls, needed) is getattr(Operator, needed):
            raise TypeError(
                f"operator {step_id!r}: {cls.__name__} has inputs {list(cls.ports.inputs)} "
                f"and outputs {list(cls.ports.outputs)}, so it must define {needed}"
            )

    @property
    def ctx(self) -> StepContext:
        if self._ctx is None:
            raise RuntimeError(f"operator {self.step_id!r} used before open()")
        return self._ctx

    def open(self, ctx: StepContext) -> None:
        """Called once before the first batch of a task."""
        self._ctx = ctx

    def process(self, batch: Batch) -> Batch:
        """The batch this step passes on (an operator with one input and one output)."""
        raise NotImplementedError(
            f"operator {self.step_id!r}: {type(self).__name__} has inputs "
            f"{list(self.ports.inputs)} and outputs {list(self.ports.outputs)}: "
            "call process_ports(input, batch)"
        )

    def process_ports(self, input: int, batch: Batch) -> Sequence[Batch]:
        """What this step passes on for ``batch``, arrived on input number ``input`` (an
        index in ``ports.inputs``): one batch per output, in ``ports.outputs`` order. An
        operator with one input and one output need not define it: it is ``process``."""
        return (self.process(batch),)

    @property
    def pending(self) -> int:
        """How many results wait for time to pass (open windows); the run waits for them."""
        return 0

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        """Every input of the task has progressed to event time ``mark`` (see
        :mod:`operators._timing`); returns what that lets the step emit (windows that close,
        say), as records read from the same place as the empty ``batch``, on its first
        output."""
        return batch

    def close(self) -> None:
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
