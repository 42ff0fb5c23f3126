"""A sink that prints each record on a line: for development, demos and notebooks."""

from __future__ import annotations

import sys
from typing import IO, Any, Literal

import orjson
from pydantic import BaseModel

from connectors.base import Sink, SinkContext, SinkWriter
from pipelines.batch import Batch

__all__ = ["Stdout"]


_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _lenient(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return repr(value)


def _json_line(value: Any) -> bytes:
    if isinstance(value, BaseModel):
        return value.__pydantic_serializer__.to_json(value) + b"\n"
    return orjson.dumps(value, default=_lenient, option=_NEWLINE)


def _safe_repr(value: Any) -> str:
    """``repr(value)``, or a placeholder when its ``__repr__`` raises."""
    try:
        return repr(value)
    except Exception as error:
        return f"<{type(value).__name__}: repr() raised {type(error).__name__}>"


def _safe_json_line(value: Any) -> bytes:
    """:func:`_json_line`, or the value's ``repr`` as a JSON string where JSON cannot hold it
    (a dict with non-string keys, an integer past 64 bits, a model that does not dump)."""
    try:
        return _json_line(value)
    except Exception:
        return orjson.dumps(_safe_repr(value), option=_NEWLINE)


class Stdout(Sink):
    """A sink that writes one line per record to standard output (or ``stream``).

    ``format="json"`` writes each value as JSON with orjson (pydantic models as
    ``model_dump(mode="json")``, bytes decoded as UTF-8, anything else JSON cannot hold as its
    ``repr`` in a string: a debugging sink should not stop a pipeline, so no value is ever
    refused, and no error policy applies here). ``format="repr"`` writes ``repr(value)``. Only
    values are written, not keys. A batch is formatted in one go; only one holding a value that
    fails that way is formatted again value by value.

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
        values = batch.values
        if not values:
            return
        if self._sink.format == "repr":
            try:
                text = "".join(f"{value!r}\n" for value in values)
            except Exception:  # a __repr__ that raises: every value on its own
                text = "".join(f"{_safe_repr(value)}\n" for value in values)
            self._buffer.append(text)
            return
        try:
            lines = list(map(_json_line, values))
        except Exception:  # a value JSON cannot hold even leniently: every value on its own
            lines = list(map(_safe_json_line, values))
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
