"""JsonLinesSink and CsvSink: append-only, one write per flush, header once, no interleaving."""

from __future__ import annotations

import asyncio
import csv
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel
from support.connectors import STAMP, sink_batch

from connectors import CsvSink, JsonLinesSink, SinkContext
from pipelines.errors import ConnectorError

CONTEXT = SinkContext("p", "sink.file", 0)


class TimedClick(BaseModel):
    user: str
    at: datetime
    n: int = 0


# -- JsonLinesSink ---------------------------------------------------------------------------


async def test_jsonlines_sink_buffers_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    writer = JsonLinesSink(path).open(CONTEXT)
    assert path.exists() and path.read_bytes() == b""  # created with its parents
    writer.write(sink_batch([{"a": 1}, [1, 2], "text", None]))
    writer.write(sink_batch([3.5]))
    assert path.read_bytes() == b""  # write only buffers
    await writer.flush()
    assert path.read_bytes() == b'{"a":1}\n[1,2]\n"text"\nnull\n3.5\n'
    await writer.flush()  # nothing new: nothing written
    assert path.read_bytes().count(b"\n") == 5
    await writer.close()


async def test_jsonlines_sink_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"old":true}\n')
    for _ in range(2):  # a replay after a crash appends the same records again
        writer = JsonLinesSink(path, fsync=True).open(CONTEXT)
        writer.write(sink_batch([{"new": 1}]))
        await writer.close()
    assert path.read_bytes() == b'{"old":true}\n{"new":1}\n{"new":1}\n'


async def test_jsonlines_sink_writes_pydantic_models(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    writer = JsonLinesSink(path).open(CONTEXT)
    writer.write(
        sink_batch([TimedClick(user="ann", at=when), {"nested": TimedClick(user="b", at=when)}])
    )
    await writer.close()
    lines = path.read_bytes().splitlines()
    expected = TimedClick(user="ann", at=when).model_dump(mode="json")
    assert orjson.loads(lines[0]) == expected
    assert orjson.loads(lines[1]) == {"nested": {**expected, "user": "b"}}


async def test_jsonlines_sink_rejects_unserialisable_values(tmp_path: Path) -> None:
    writer = JsonLinesSink(tmp_path / "out.jsonl").open(CONTEXT)
    with pytest.raises(ConnectorError, match="cannot be written as JSON"):
        writer.write(sink_batch([object()]))
    await writer.close()


async def test_jsonlines_sink_unwritable_directory_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConnectorError, match="cannot open"):
        JsonLinesSink(blocker / "out.jsonl").open(CONTEXT)


async def test_jsonlines_sink_two_writers_same_process(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonLinesSink(path)
    first, second = sink.open(CONTEXT), sink.open(SinkContext("p", "sink.file", 1))
    first.write(sink_batch([{"w": 0, "i": i} for i in range(100)]))
    second.write(sink_batch([{"w": 1, "i": i} for i in range(100)]))
    await asyncio.gather(second.flush(), first.flush())
    await first.close()
    await second.close()
    values = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert len(values) == 200
    for w in (0, 1):
        assert [v["i"] for v in values if v["w"] == w] == list(range(100))
    # each flush is one contiguous block
    assert [v["w"] for v in values] in ([0] * 100 + [1] * 100, [1] * 100 + [0] * 100)


def _append_lines(path: str, worker: int, batches: int, per_batch: int) -> None:
    """Runs in a spawned process: many flushes of long lines into the shared file."""

    async def run() -> None:
        writer = JsonLinesSink(path).open(SinkContext("p", "sink.file", worker))
        pad = "x" * 3000  # lines longer than a pipe buffer's atomic size
        for b in range(batches):
            writer.write(
                sink_batch([{"w": worker, "b": b, "i": i, "pad": pad} for i in range(per_batch)])
            )
            await writer.flush()
        await writer.close()

    asyncio.run(run())


def test_jsonlines_sink_concurrent_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    spawn = multiprocessing.get_context("spawn")
    batches, per_batch, workers = 40, 50, 3
    processes = [
        spawn.Process(target=_append_lines, args=(str(path), w, batches, per_batch))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    values = [orjson.loads(line) for line in lines[:-1]]  # every line parses: none interleaved
    assert len(values) == workers * batches * per_batch
    for w in range(workers):
        mine = [(v["b"], v["i"]) for v in values if v["w"] == w]
        assert mine == [(b, i) for b in range(batches) for i in range(per_batch)]


# -- CsvSink -----------------------------------------------------------------------------------


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))


async def test_csv_sink_header_from_first_value_then_rows(tmp_path: Path) -> None:
    path = tmp_path / "out" / "rows.csv"
    writer = CsvSink(path).open(CONTEXT)
    writer.write(sink_batch([{"a": 1, "b": "x,y"}, {"b": 'say "hi"', "a": None, "extra": 1}]))
    await writer.flush()
    writer.write(sink_batch([{"a": 2, "b": "multi\nline"}]))
    await writer.close()
    assert read_csv(path) == [
        ["a", "b"],
        ["1", "x,y"],
        ["", 'say "hi"'],
        ["2", "multi\nline"],
    ]


async def test_csv_sink_declared_fields_models_and_cells(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    when = datetime(2024, 1, 2, tzinfo=UTC)
    writer = CsvSink(path, fields=["user", "n", "at"]).open(CONTEXT)
    writer.write(sink_batch([TimedClick(user="ann", at=when, n=3), {"user": "bob", "n": [1, 2]}]))
    writer.write(sink_batch([("tuple", 1, "row")]))
    await writer.close()
    assert read_csv(path) == [
        ["user", "n", "at"],
        ["ann", "3", "2024-01-02T00:00:00Z"],
        ["bob", "[1,2]", ""],
        ["tuple", "1", "row"],
    ]


async def test_csv_sink_header_written_once_by_two_writers(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    sink = CsvSink(path)
    first, second = sink.open(CONTEXT), sink.open(SinkContext("p", "sink.file", 1))
    second.write(sink_batch([{"k": "s1", "v": 1}]))
    first.write(sink_batch([{"v": 2, "k": "f1"}]))  # another key order: the file's wins
    await asyncio.gather(first.flush(), second.flush())
    first.write(sink_batch([{"k": "f2", "v": 3}]))
    await first.close()
    await second.close()
    rows = read_csv(path)
    assert rows[0] == ["k", "v"]
    assert sorted(rows[1:]) == [["f1", "2"], ["f2", "3"], ["s1", "1"]]
    assert rows.count(["k", "v"]) == 1


async def test_csv_sink_reuses_existing_header_and_rejects_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("b,a\n1,2\n")
    writer = CsvSink(path).open(CONTEXT)
    writer.write(sink_batch([{"a": "A", "b": "B"}]))
    await writer.close()
    assert read_csv(path) == [["b", "a"], ["1", "2"], ["B", "A"]]
    mismatched = CsvSink(path, fields=["a", "b"]).open(CONTEXT)
    with pytest.raises(ConnectorError, match="differs"):
        mismatched.write(sink_batch([{"a": 1, "b": 2}]))
    await mismatched.close()


async def test_csv_sink_rejects_scalars(tmp_path: Path) -> None:
    writer = CsvSink(tmp_path / "rows.csv", fields=["a"]).open(CONTEXT)
    with pytest.raises(ConnectorError, match="as a CSV row"):
        writer.write(sink_batch([42]))
    await writer.close()


def _append_csv(path: str, worker: int, rows: int) -> None:
    """Runs in a spawned process: a CSV writer that starts at the same time as the others."""

    async def run() -> None:
        writer = CsvSink(path).open(SinkContext("p", "sink.file", worker))
        for i in range(rows):
            writer.write(sink_batch([{"w": worker, "i": i, "text": "a,b\nc"}]))
            if i % 10 == 0:
                await writer.flush()
        await writer.close()

    asyncio.run(run())


def test_csv_sink_header_once_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.csv"
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_append_csv, args=(str(path), w, 100)) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    rows = read_csv(path)
    assert rows[0] == ["w", "i", "text"]
    assert rows.count(["w", "i", "text"]) == 1
    body = rows[1:]
    assert len(body) == 400
    for w in range(4):
        assert [int(r[1]) for r in body if r[0] == str(w)] == list(range(100))
    assert all(r[2] == "a,b\nc" for r in body)


# -- what a line holds of a record ---------------------------------------------------------------


async def test_a_keyed_count_is_written_with_its_key_and_time(tmp_path: Path) -> None:
    """By default a value that does not name its fields comes with its record's key; a dict, a
    model or a record without a key is written alone."""
    path = tmp_path / "counts.jsonl"
    writer = JsonLinesSink(path).open(CONTEXT)
    writer.write(sink_batch([1, 2, [3]], keys=["/a", "/b", "/c"]))
    writer.write(sink_batch([{"page": "/a", "views": 1}, 7], keys=["/a", None]))
    await writer.close()
    when = datetime.fromtimestamp(STAMP / 1000, tz=UTC).isoformat().replace("+00:00", "Z")
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == [
        {"key": "/a", "value": 1, "timestamp": when},
        {"key": "/b", "value": 2, "timestamp": when},
        {"key": "/c", "value": [3], "timestamp": when},
        {"page": "/a", "views": 1},
        7,
    ]


async def test_shape_value_and_record_write_the_value_alone_or_always_the_record(
    tmp_path: Path,
) -> None:
    for shape, expected in [
        ("value", [b"1", b'{"a":1}']),
        ("record", [b'{"key":"k","value":1,', b'{"key":"k","value":{"a":1},']),
    ]:
        path = tmp_path / f"{shape}.jsonl"
        writer = JsonLinesSink(path, shape=shape).open(CONTEXT)
        writer.write(sink_batch([1, {"a": 1}], keys=["k", "k"]))
        await writer.close()
        lines = path.read_bytes().splitlines()
        assert [line[: len(start)] for line, start in zip(lines, expected, strict=True)] == expected


def test_an_unknown_shape_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match="shape must be one of auto, value, record"):
        JsonLinesSink(tmp_path / "x.jsonl", shape="keyed")
    with pytest.raises(ConnectorError, match="shape must be one of"):
        CsvSink(tmp_path / "x.csv", shape="row")


async def test_a_csv_of_a_keyed_count_has_key_value_and_time_columns(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    writer = CsvSink(path).open(CONTEXT)
    writer.write(sink_batch([1, 2], keys=["/a", "/b"]))
    await writer.close()
    rows = list(csv.reader(path.read_text().splitlines()))
    when = datetime.fromtimestamp(STAMP / 1000, tz=UTC).isoformat().replace("+00:00", "Z")
    assert rows == [["key", "value", "timestamp"], ["/a", "1", when], ["/b", "2", when]]
