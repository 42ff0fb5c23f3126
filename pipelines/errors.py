"""Every error Headwater raises, rooted at :class:`PipelineError`.

The tree::

    PipelineError                 root; ``step`` and ``source`` attributes when known
    ├── PipelineDefinitionError   the declared graph is invalid (duplicate step id, bad topic ...)
    ├── LoadError                 a pipeline module/attribute could not be loaded by the runner
    ├── ConnectorError            a source or sink failed (unreadable file, closed target ...)
    ├── LogError                  the log backend failed; ``retriable`` says if a retry may help
    │   ├── TopicError            missing topic, or one that exists with another configuration
    │   ├── CorruptLogError       a log file failed its checksum where it must not
    │   └── FencedError           a newer owner of a task's transactions took over (a zombie)
    └── RecordError               one record could not be processed; routed by the error policy
        ├── InvalidRecord         bytes that do not deserialise or validate
        └── StepError             a user function raised (``__cause__`` is the original error)

``RecordError`` subclasses never stop a worker unless the step's policy is ``FAIL``: under
``DEAD_LETTER`` (the default) they end up in the pipeline's dead-letter topic with the original
bytes and these attributes in the headers.

Outside the tree, :class:`StepTimeout` is raised *inside* a call of a user function that ran
longer than its step's ``timeout``, so that the step takes it for the function's own error (the
``__cause__`` of a ``StepError``). It lives here, with the other errors, because both the
operators (async calls) and the runtime's timer (plain calls) raise it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ConnectorError",
    "CorruptLogError",
    "ErrorPolicy",
    "FencedError",
    "InvalidRecord",
    "LoadError",
    "LogError",
    "PipelineDefinitionError",
    "PipelineError",
    "RecordError",
    "RecordSource",
    "StepError",
    "StepTimeout",
    "TopicError",
]


class ErrorPolicy(StrEnum):
    """What happens to a record whose deserialisation or user function fails."""

    FAIL = "fail"
    """Stop the worker with the error (offsets stay uncommitted, so nothing is lost)."""
    SKIP = "skip"
    """Drop the record, count it in the step's metrics."""
    DEAD_LETTER = "dead_letter"
    """Write the original bytes and the error to the pipeline's dead-letter topic."""


@dataclass(frozen=True, slots=True)
class RecordSource:
    """Where a record was read from: enough to find it again on the log."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class PipelineError(Exception):
    """Root of every Headwater error.

    ``step`` names the step the error belongs to and ``source`` the record it was processing,
    when either is known; both appear in ``str(error)``.
    """

    retriable: bool = False

    def __init__(
        self, message: str, *, step: str | None = None, source: RecordSource | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.step = step
        self.source = source

    def __str__(self) -> str:
        context = []
        if self.step is not None:
            context.append(f"step {self.step!r}")
        if self.source is not None:
            context.append(f"record {self.source}")
        return f"{self.message} ({', '.join(context)})" if context else self.message


class PipelineDefinitionError(PipelineError):
    """The pipeline graph is invalid; raised while it is declared, before anything runs."""


class LoadError(PipelineError):
    """The runner could not load a pipeline from a module path."""


class ConnectorError(PipelineError):
    """A source or sink connector failed."""


class LogError(PipelineError):
    """The log backend failed."""

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = False,
        step: str | None = None,
        source: RecordSource | None = None,
    ) -> None:
        super().__init__(message, step=step, source=source)
        self.retriable = retriable


class TopicError(LogError):
    """A topic is missing, or exists with a configuration other than the one declared."""


class CorruptLogError(LogError):
    """Stored log data failed its checksum somewhere other than a torn tail."""


class FencedError(LogError):
    """A task's transactional producer was fenced: a newer producer with its transactional id
    (the task's next owner, after a rebalance this worker had not heard of yet) took over. What
    the task did since its last commit is aborted; it must be dropped, not retried."""


class RecordError(PipelineError):
    """One record could not be processed; the step's error policy decides what happens."""


class InvalidRecord(RecordError):
    """A record's bytes do not deserialise, or do not validate against the topic's model."""


class StepError(RecordError):
    """A user function raised while processing a record; the original error is ``__cause__``."""


class StepTimeout(Exception):
    """A call of a user function ran longer than its step's ``timeout`` of ``seconds``.

    Not a :class:`PipelineError`: it is raised in the call, as the function's error (see the
    module docstring)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds

    def __str__(self) -> str:
        return f"did not return within {self.seconds:g} s"
