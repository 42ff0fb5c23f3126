"""A sink that prints each record on a line: for development, demos and notebooks."""

from __future__ import annotations

import sys
from typing import IO, Any, Literal

import orjson
from pydantic import BaseModel

from connectors.base import Sink, SinkContext, SinkWriter
from pipelines.batch import Batch

__all__ = ["Stdout"]


def _lenient(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return repr(value)


class Stdout(Sink):
    """A sink that writes one line per record to standard output (or ``stream``).

    ``format="json"`` writes each value as JSON with orjson (pydantic models as
    ``model_dump(mode="json")``, bytes decoded as UTF-8, anything else JSON cannot hold as its
    ``repr`` in a string: a debugging sink should not stop a pipeline). ``format="repr"``
    writes ``repr(value)``. Only values are written, not keys.

    ``write`` formats the batch into a buffer; ``flush`` writes it to the stream with one
    ``write`` call and flushes the stream. ``stream`` defaults to the ``sys.stdout`` of the
    moment of each flush (so redirections and captured output work); a stream object given
    here is shared by every writer of this process. Lines are at-least-once: a replay after a
    crash prints the replayed records again.
    """

    name = "stdout"

    def __init__(
        self, format: Literal["json", "repr"] = "json", stream: IO[str] | None = None
    ) -> None:
        if format not in ("json", "repr"):
            raise ValueError(f"format must be 'json' or 'repr', got {format!r}")
        self.format = format
        self.stream = stream

    def __repr__(self) -> str:
        return f"Stdout(format={self.format!r})"

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer with its own buffer."""
        return _StdoutWriter(self)


class _StdoutWriter(SinkWriter):
    __slots__ = ("_buffer", "_sink")

    def __init__(self, sink: Stdout) -> None:
        self._sink = sink
        self._buffer: list[str] = []

    def write(self, batch: Batch) -> None:
        if not batch.values:
            return
        if self._sink.format == "repr":
            self._buffer.append("".join(f"{value!r}\n" for value in batch.values))
            return
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        lines = [
            value.__pydantic_serializer__.to_json(value) + b"\n"
            if isinstance(value, BaseModel)
            else dumps(value, default=_lenient, option=newline)
            for value in batch.values
        ]
        self._buffer.append(b"".join(lines).decode())

    async def flush(self) -> None:
        """Write the buffered lines and flush the stream."""
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        stream = self._sink.stream or sys.stdout
        stream.write(text)
        stream.flush()
