"""The connector contracts: a :class:`Source` feeds a topic, a :class:`Sink` takes a stream.

Sources run in the runner (one task per source step) and write into the topic the pipeline
declares for them. Each :class:`SourceBatch` carries the source's *position* after it; the
runtime stores that position once the batch is durable on the log and hands it back to
:meth:`Source.read` on restart, so a restarted pipeline does not emit the same input again
(a crash between the two replays at most one batch: at-least-once).

Sinks run in the workers: :meth:`Sink.open` gives each worker its own :class:`SinkWriter`.
``write`` takes whole batches and only buffers; ``flush`` makes them durable, and the runtime
calls it before it commits the input offsets those records came from.

What a sink cannot write follows the sink step's error policy, like a record a user function
fails on. The contract is the smallest one that lets the runtime find the culprits: ``write``
takes all of a batch or none of it, and raises :class:`UnwritableValue` when some value cannot
be written (encoded). The runtime then hands the writer the same records one at a time: each one
it refuses again is dead-lettered, skipped or fails the run, by the step's policy, and the
others are written. So a writer encodes the batch in one go on the fast path, and needs no
bookkeeping of which record failed; only a batch that holds a bad value costs a call per record.
Any other exception from ``write`` or ``flush`` means the sink itself is broken (a full disk, a
closed connection) and stops the worker: no policy applies to it, and the input offsets stay
uncommitted. A ``flush`` that fails should leave its target as it was before it (no partial
record), since everything it held is written again when the pipeline runs again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.batch import Batch
from pipelines.errors import ConnectorError

__all__ = [
    "Position",
    "Sink",
    "SinkContext",
    "SinkWriter",
    "Source",
    "SourceBatch",
    "UnwritableValue",
    "int_position",
]

Position = Any
"""A JSON-serialisable value that tells a source where to resume (a byte offset, a count...)."""


@dataclass(slots=True)
class SourceBatch:
    """Values read by a source, and the position after them.

    ``raw`` means the values are already bytes in the topic's value format (a JSON Lines file
    passes its lines through untouched; the workers validate them). ``keys`` and
    ``timestamps`` (ms since the epoch) are optional; missing timestamps are the time of reading.
    """

    values: list[Any]
    position: Position
    keys: list[Any] | None = None
    timestamps: list[int] | None = None
    raw: bool = False


def int_position(position: Position | None, what: str, unit: str) -> int:
    """A stored position that counts ``unit`` (0 when there is none yet); anything else belongs
    to another kind of source and is refused with a message that says what to do."""
    if position is None:
        return 0
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ConnectorError(
            f"{what} resumes from {unit}, got position {position!r}; the stored position "
            "belongs to another kind of source: give this step another step_id or reset the "
            "pipeline's positions"
        )
    return position


class Source(ABC):
    """Where records come from."""

    name: str = "source"

    @abstractmethod
    def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches from ``position`` (``None``: the beginning) on; ends when the input does."""


@dataclass(frozen=True, slots=True)
class SinkContext:
    """Where a sink writer runs: which pipeline and step, in which worker."""

    pipeline: str
    step_id: str
    worker: int


class SinkWriter(ABC):
    """One worker's handle on a sink."""

    @abstractmethod
    def write(self, batch: Batch) -> None:
        """Take a batch (buffer it; do not block): all of it, or, raising
        :class:`UnwritableValue` because a value cannot be written, none of it."""

    @abstractmethod
    async def flush(self) -> None:
        """Make everything written so far durable; on failure, leave the target as it was."""

    async def start(self) -> None:  # noqa: B027 (optional: most writers need no start)
        """Connect to the target and check it, before the first ``write`` (a writer that
        needs no connection has nothing to do). A target that cannot be used (it refuses the
        credentials, a table is missing) raises :class:`~pipelines.errors.ConnectorError`
        saying what to do; the worker stops with it."""

    async def close(self) -> None:
        """Flush and release."""
        await self.flush()


class Sink(ABC):
    """Where records go."""

    name: str = "sink"

    @abstractmethod
    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer for one worker."""

    async def earlier_output(self, pipeline: str, step_id: str) -> str | None:
        """What the sink already holds, in words, if a run of step ``step_id`` of
        ``pipeline`` starting afresh would add to it (a file with lines in it), else None. A
        run without any stored position or committed offset refuses to start then, rather
        than write a second copy after the first."""
        return None

    def output_files(self, pipeline: str, step_id: str) -> list[Path]:
        """The local files step ``step_id`` of ``pipeline`` wrote its output into, which
        ``headwater reset`` removes (unless ``--keep-outputs``): a file sink's file. None by
        default: a database's table or a topic belongs to more than the pipeline."""
        return []

    async def remembered(self, pipeline: str, step_id: str) -> str | None:
        """What the sink keeps of the runs of step ``step_id`` of ``pipeline`` outside the
        log (a database sink's input offsets), in words, if anything: ``headwater reset``
        lists it and then calls :meth:`forget`."""
        return None

    async def forget(self, pipeline: str, step_id: str) -> None:  # noqa: B027 (optional)
        """Remove what :meth:`remembered` describes, so that the next run starts afresh."""


class UnwritableValue(ConnectorError):
    """A value of the batch given to :meth:`SinkWriter.write` cannot be written by this sink
    (JSON cannot encode a ``set``, a CSV row cannot be made of an ``int``...), and nothing of
    the batch was taken. The runtime then writes the batch a record at a time and applies the
    sink step's error policy to each record refused again (see the module docstring). The
    message says what the value is and how to fix the stream; it is the ``headwater.error``
    header of a dead-lettered record."""
