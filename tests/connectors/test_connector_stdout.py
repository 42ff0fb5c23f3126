"""The Stdout sink."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel
from support.connectors import sink_batch

from connectors import SinkContext, Stdout

CTX = SinkContext("p", "sink.stdout", 0)


class NamedAt(BaseModel):
    name: str
    at: datetime


async def test_stdout_json_lines_buffered_until_flush() -> None:
    stream = io.StringIO()
    writer = Stdout(stream=stream).open(CTX)
    when = datetime(2024, 1, 1, tzinfo=UTC)
    writer.write(sink_batch([{"a": 1}, "é", NamedAt(name="x", at=when), b"raw", {1, 2}]))
    assert stream.getvalue() == ""
    await writer.flush()
    assert stream.getvalue().splitlines() == [
        '{"a":1}',
        '"é"',
        '{"name":"x","at":"2024-01-01T00:00:00Z"}',
        '"raw"',
        '"{1, 2}"',
    ]
    await writer.close()


async def test_stdout_repr_format() -> None:
    stream = io.StringIO()
    writer = Stdout("repr", stream).open(CTX)
    writer.write(sink_batch([{"a": 1}, "s"]))
    writer.write(sink_batch([]))
    await writer.close()
    assert stream.getvalue() == "{'a': 1}\n's'\n"


async def test_stdout_defaults_to_sys_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    writer = Stdout().open(CTX)
    writer.write(sink_batch([1, 2]))
    await writer.flush()
    assert capsys.readouterr().out == "1\n2\n"


def test_stdout_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        Stdout("yaml")  # type: ignore[arg-type]
