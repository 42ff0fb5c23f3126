"""ParquetSink and ParquetSource: columns from a model, a schema or the first batch; values that
do not fit refused in ``write``; files that appear whole or not at all; staging files flushed
and fsynced, rolled into Parquet files, and recovered after a crash; a source that resumes
exactly where it stopped; fsspec filesystems; a run through the ``headwater`` command."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, Field
from support.cli import headwater
from support.connectors import STAMP, read_to_end, sink_batch, started, values_of

import connectors.parquet as parquet_module
from connectors.base import SinkContext, SinkWriter, UnwritableValue
from connectors.parquet import ParquetSink, ParquetSource
from pipelines.batch import Batch
from pipelines.errors import ConnectorError

CONTEXT = SinkContext("p", "sink.parquet", 0)

ROWS = [{"i": i, "name": f"row {i}", "score": i / 4} for i in range(200)]


async def write_in_flushes(writer: SinkWriter, rows: list[Any], per_flush: int) -> None:
    """Write ``rows`` in batches of ``per_flush``, flushing after each."""
    for start in range(0, len(rows), per_flush):
        writer.write(sink_batch(rows[start : start + per_flush]))
        await writer.flush()


def parts(directory: Path) -> list[Path]:
    """The Parquet files a reader of ``directory`` sees, by name."""
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def rows_in(directory: Path) -> list[dict[str, Any]]:
    """Every row of the visible Parquet files, file by file in name order."""
    return [row for path in parts(directory) for row in pq.read_table(path).to_pylist()]


def write_each(writer: SinkWriter, batch: Batch) -> list[str]:
    """Write ``batch`` as the runtime does: whole, or record by record when the writer refuses
    it; the messages of the records refused again."""
    try:
        writer.write(batch)
    except UnwritableValue:
        pass
    else:
        return []
    refused = []
    for index in range(len(batch)):
        try:
            writer.write(batch.take([index]))
        except UnwritableValue as error:
            refused.append(error.message)
    return refused


# -- round trips and columns -------------------------------------------------------------------


async def test_round_trip_through_files_and_source(tmp_path: Path) -> None:
    """Dicts written in several flushes come back from the source equal and in order, and
    nothing is visible before the writer rolls or closes (flushes only fill the staging file)."""
    out = tmp_path / "deep" / "out"
    writer = await started(ParquetSink(out), CONTEXT)
    assert out.is_dir()  # created by start
    await write_in_flushes(writer, ROWS, 30)
    assert parts(out) == []
    assert [name.split("-")[0] for name in hidden(out)] == [".staging"]
    await writer.close()
    assert hidden(out) == []
    [file] = parts(out)
    assert file.name.startswith("part-p-sink.parquet-") and file.name.endswith(".parquet")
    assert pq.read_table(file).to_pylist() == ROWS
    batches = await read_to_end(ParquetSource(out, batch_size=64))
    assert values_of(batches) == ROWS
    assert [len(b.values) for b in batches] == [64, 64, 64, 8]
    assert batches[-1].position == {"file": file.name, "row": 200}
    assert all(b.timestamps is None and b.keys is None for b in batches)


class Inner(BaseModel):
    name: str
    tags: list[str]


class Color(StrEnum):
    RED = "red"
    BLUE = "blue"


class Everything(BaseModel):
    n: int
    x: float
    s: str
    flag: bool
    at: datetime
    day: date
    price: Annotated[Decimal, Field(max_digits=10, decimal_places=2)]
    ratio: Decimal
    color: Color
    level: Literal[1, 2, 3]
    inner: Inner
    items: list[int]
    maybe: int | None = None
    note: Annotated[str, Field(max_length=20)] | None = None


async def test_a_model_with_every_supported_type(tmp_path: Path) -> None:
    """Each annotation gets its Arrow type, optional fields are nullable, nested values are
    JSON text, and the values read back are the model's (decimals as exact text)."""
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    values = [
        Everything(
            n=1,
            x=1.5,
            s="one",
            flag=True,
            at=when,
            day=date(2024, 5, 6),
            price=Decimal("12.30"),
            ratio=Decimal("0.1234567890123456789012345678901234567890"),
            color=Color.RED,
            level=2,
            inner=Inner(name="in", tags=["a", "b"]),
            items=[1, 2],
            maybe=7,
            note="hi",
        ),
        Everything(
            n=-2,
            x=0.0,
            s="",
            flag=False,
            at=datetime(2024, 5, 6, 9, 0),  # noqa: DTZ001 (naive: taken as UTC)
            day=date(1999, 12, 31),
            price=Decimal("-0.01"),
            ratio=Decimal("3"),
            color=Color.BLUE,
            level=3,
            inner=Inner(name="x", tags=[]),
            items=[],
        ),
    ]
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, model=Everything, include_key=True), CONTEXT)
    writer.write(sink_batch(values, keys=["k1", None]))
    await writer.close()
    [file] = parts(out)
    schema = pq.read_schema(file)
    types = {f.name: (str(f.type), f.nullable) for f in schema}
    assert types == {
        "n": ("int64", False),
        "x": ("double", False),
        "s": ("string", False),
        "flag": ("bool", False),
        "at": ("timestamp[us, tz=UTC]", False),
        "day": ("date32[day]", False),
        "price": ("decimal128(10, 2)", False),
        "ratio": ("string", False),
        "color": ("string", False),
        "level": ("int64", False),
        "inner": ("string", False),
        "items": ("string", False),
        "maybe": ("int64", True),
        "note": ("string", True),
        "key": ("string", True),
    }
    first, second = pq.read_table(file).to_pylist()
    assert first == {
        "n": 1,
        "x": 1.5,
        "s": "one",
        "flag": True,
        "at": when,
        "day": date(2024, 5, 6),
        "price": Decimal("12.30"),
        "ratio": "0.1234567890123456789012345678901234567890",
        "color": "red",
        "level": 2,
        "inner": '{"name":"in","tags":["a","b"]}',
        "items": "[1,2]",
        "maybe": 7,
        "note": "hi",
        "key": "k1",
    }
    assert second["at"] == datetime(2024, 5, 6, 9, 0, tzinfo=UTC)
    assert (second["maybe"], second["note"], second["key"], second["items"]) == (
        None,
        None,
        None,
        "[]",
    )
    [read] = await read_to_end(ParquetSource(out))
    assert read.values[0]["price"] == "12.30"  # exact text: a JSON topic cannot hold a Decimal
    assert read.values[1]["ratio"] == "3"


async def test_an_explicit_schema_and_the_timestamp_column(tmp_path: Path) -> None:
    """A pyarrow schema is used as given (nested types too); include_timestamp adds each
    record's event time."""
    schema = pa.schema(
        [
            pa.field("id", pa.int32(), nullable=False),
            pa.field("point", pa.struct([("x", pa.float64()), ("y", pa.float64())])),
            pa.field("labels", pa.list_(pa.string())),
        ]
    )
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, schema=schema, include_timestamp=True), CONTEXT)
    rows: list[dict[str, Any]] = [
        {"id": 1, "point": {"x": 1.0, "y": 2.0}, "labels": ["a"]},
        {"id": 2, "point": None, "labels": []},
    ]
    writer.write(sink_batch(rows))
    [refused] = write_each(writer, sink_batch([{"id": 2**40, "point": None, "labels": None}]))
    assert "field 'id' cannot be written as int32" in refused
    await writer.close()
    table = pq.read_table(parts(out)[0])
    assert table.schema.field("point").type == schema.field("point").type
    stamp = datetime.fromtimestamp(STAMP / 1000, tz=UTC)
    assert table.to_pylist() == [{**row, "timestamp": stamp} for row in rows]


class Reading(BaseModel):
    n: int
    x: float
    s: str
    maybe: str | None = None


GOOD = {"n": 1, "x": 2.0, "s": "ok"}


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (
            {"n": 1.5, "x": 2.0, "s": "a"},
            "field 'n' is float 1.5, which does not fit column type int64",
        ),
        ({"n": "7", "x": 2.0, "s": "a"}, "field 'n' is str '7'"),
        ({"n": True, "x": 2.0, "s": "a"}, "field 'n' is bool True"),
        ({"n": 1, "x": False, "s": "a"}, "field 'x' is bool False"),
        ({"n": 1, "x": 2.0, "s": 3}, "field 's' is int 3"),
        ({"n": 1, "x": 2.0, "s": None}, "field 's' is missing or None"),
        ({"n": 1, "x": 2.0}, "a value has no field 's'"),
        ({"n": 1, "x": 2.0, "s": "a", "zzz": 0}, "field 'zzz' of a value is not a column"),
        ({"n": 2**70, "x": 2.0, "s": "a"}, "field 'n' cannot be written as int64"),
        (42, "a int value has no fields"),
    ],
)
async def test_a_value_that_does_not_fit_is_refused_and_the_rest_written(
    tmp_path: Path, bad: Any, needle: str
) -> None:
    """``write`` refuses the whole batch (buffering none of it) with a message naming the
    field; written again record by record, only the bad one is refused."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, model=Reading), CONTEXT)
    batch = sink_batch([GOOD, bad, {**GOOD, "n": 3, "maybe": "m"}])
    with pytest.raises(UnwritableValue, match="ParquetSink") as refused:
        writer.write(batch)
    assert needle in refused.value.message
    await writer.flush()
    assert hidden(out) == []  # nothing was buffered
    assert write_each(writer, batch) == [refused.value.message]
    await writer.close()
    assert rows_in(out) == [{**GOOD, "maybe": None}, {**GOOD, "n": 3, "maybe": "m"}]


async def test_columns_inferred_from_the_first_batch_are_then_fixed(tmp_path: Path) -> None:
    """Without a model or schema the first batch decides (a field None throughout is a
    string, nested values JSON); later values must fit, a missing field is null."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out), CONTEXT)
    first = [
        {"a": 1, "b": "x", "c": None, "d": {"k": [1]}, "e": datetime(2024, 1, 1, tzinfo=UTC)},
        {"a": 2, "b": "y", "c": None, "d": [], "e": None, "f": 1.5},
    ]
    writer.write(sink_batch(first))
    refused = write_each(
        writer, sink_batch([{"a": 3}, {"a": "three"}, {"a": 4, "new": 1}, {"f": 2, "c": "z"}])
    )
    assert len(refused) == 2
    assert "field 'a' is str 'three'" in refused[0]
    assert "field 'new' of a value is not a column" in refused[1]
    await writer.close()
    [file] = parts(out)
    types = {f.name: str(f.type) for f in pq.read_schema(file)}
    assert types == {
        "a": "int64",
        "b": "string",
        "c": "string",
        "d": "string",
        "e": "timestamp[us, tz=UTC]",
        "f": "double",
    }
    rows = pq.read_table(file).to_pylist()
    assert [row["a"] for row in rows] == [1, 2, 3, None]
    assert [row["d"] for row in rows] == ['{"k":[1]}', "[]", None, None]
    assert rows[3]["f"] == 2.0 and rows[3]["c"] == "z"


async def test_models_as_values_give_the_columns_and_key_types_are_inferred(
    tmp_path: Path,
) -> None:
    """Model values without model= give their class's columns; include_key takes the key's
    type from the first batch."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, include_key=True), CONTEXT)
    writer.write(sink_batch([Reading(n=1, x=1, s="a")], keys=[10]))
    assert write_each(writer, sink_batch([Reading(n=2, x=2, s="b")], keys=["eleven"]))
    await writer.close()
    [file] = parts(out)
    assert [(f.name, str(f.type)) for f in pq.read_schema(file)] == [
        ("n", "int64"),
        ("x", "double"),
        ("s", "string"),
        ("maybe", "string"),
        ("key", "int64"),
    ]


def test_a_sink_refuses_options_that_cannot_work(tmp_path: Path) -> None:
    """Both model and schema, an unknown codec, a clash with the key column, bad roll sizes."""
    with pytest.raises(ValueError, match="not both"):
        ParquetSink(tmp_path, model=Reading, schema=pa.schema([("a", pa.int64())]))
    with pytest.raises(ValueError, match="not a Parquet codec"):
        ParquetSink(tmp_path, compression="nope")
    with pytest.raises(ConnectorError, match="include_key=True adds a column 'key'"):
        ParquetSink(tmp_path, schema=pa.schema([("key", pa.string())]), include_key=True)
    with pytest.raises(ValueError, match="roll_rows must be a positive int"):
        ParquetSink(tmp_path, roll_rows=0)
    with pytest.raises(ValueError, match="roll_seconds must be positive"):
        ParquetSink(tmp_path, roll_seconds=0)


async def test_a_file_where_the_directory_should_be(tmp_path: Path) -> None:
    """start() says the path is a file, not a directory."""
    (tmp_path / "out").write_text("")
    writer = ParquetSink(tmp_path / "out").open(CONTEXT)
    with pytest.raises(ConnectorError, match="is a file; give the sink the path of a directory"):
        await writer.start()


# -- never a partial file -----------------------------------------------------------------------


def assert_readers_see_whole_files(directory: Path) -> int:
    """pyarrow's dataset and pandas read ``directory`` without error, see no hidden file, and
    agree; how many rows they see."""
    dataset = ds.dataset(directory, format="parquet")
    assert all(not Path(f).name.startswith(".") for f in dataset.files)
    rows: int = dataset.to_table().num_rows
    assert len(pd.read_parquet(directory)) == rows
    return rows


async def test_readers_never_see_a_partial_or_hidden_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file the sink writes (staging and Parquet) is probed half written and once
    complete but not yet renamed: readers of the directory see only whole Parquet files,
    holding exactly the rows rolled so far."""
    out = tmp_path / "out"
    rolled: list[int] = []  # rows in the Parquet files renamed into place so far
    probes: list[str] = []
    real_write_all = parquet_module._write_all
    real_rename = os.rename

    def half_then_probe(fd: int, data: bytes) -> None:
        real_write_all(fd, data[: len(data) // 2])
        probes.append("half")
        assert assert_readers_see_whole_files(out) == sum(rolled)
        real_write_all(fd, data[len(data) // 2 :])

    def probe_then_rename(source: Any, target: Any) -> None:
        probes.append(Path(target).name.split("-")[0])
        assert assert_readers_see_whole_files(out) == sum(rolled)
        real_rename(source, target)
        if Path(target).suffix == ".parquet":
            rolled.append(pq.read_metadata(target).num_rows)

    monkeypatch.setattr(parquet_module, "_write_all", half_then_probe)
    monkeypatch.setattr(os, "rename", probe_then_rename)
    writer = await started(ParquetSink(out, roll_rows=50), CONTEXT)
    await write_in_flushes(writer, ROWS[:130], 20)
    await writer.close()
    assert probes.count(".staging") == 3 and probes.count("part") == 3
    assert assert_readers_see_whole_files(out) == 130
    assert rows_in(out) == ROWS[:130]


async def test_readers_in_another_thread_while_files_roll(tmp_path: Path) -> None:
    """A thread reading the directory over and over while a writer rolls many small files
    never fails and always sees a prefix of the input."""
    out = tmp_path / "out"
    out.mkdir()
    done, reading = threading.Event(), threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not done.is_set():
            try:
                table = ds.dataset(out, format="parquet").to_table()
                values = table.column("i").to_pylist() if table.num_rows else []
                assert sorted(values) == list(range(len(values)))
                seen.append(len(values))
            except BaseException as error:
                errors.append(error)
                return
            finally:
                reading.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert await asyncio.to_thread(reading.wait, 30)
        writer = await started(ParquetSink(out, roll_rows=10), CONTEXT)
        await write_in_flushes(writer, ROWS, 5)
        await writer.close()
    finally:
        done.set()
        reader.join(30)
    assert errors == []
    assert seen and seen == sorted(seen)
    assert len(parts(out)) == 20 and rows_in(out) == ROWS


# -- rolling ------------------------------------------------------------------------------------


async def test_rolls_by_rows(tmp_path: Path) -> None:
    """A staging file becomes a Parquet file at the flush that takes it to roll_rows rows:
    files of whole flushes, whose union in name order is the input."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, roll_rows=64), CONTEXT)
    await write_in_flushes(writer, ROWS, 30)
    assert [pq.read_metadata(p).num_rows for p in parts(out)] == [90, 90]
    await writer.close()
    assert [pq.read_metadata(p).num_rows for p in parts(out)] == [90, 90, 20]
    assert rows_in(out) == ROWS
    assert [p.name.rsplit("-", 1)[1] for p in parts(out)] == [
        "000000.parquet",
        "000001.parquet",
        "000002.parquet",
    ]


async def test_rolls_by_bytes(tmp_path: Path) -> None:
    """roll_bytes counts the staged Arrow data."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, roll_bytes=4000), CONTEXT)
    await write_in_flushes(writer, ROWS, 50)
    await writer.close()
    assert len(parts(out)) > 1
    assert rows_in(out) == ROWS


async def test_rolls_by_age_even_without_new_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging file older than roll_seconds rolls at the next flush, also an empty one (the
    runtime flushes at every checkpoint, so a quiet stream's rows still become visible)."""
    now = [1000.0]
    monkeypatch.setattr(parquet_module, "_clock", lambda: now[0])
    out = tmp_path / "out"
    writer = await started(ParquetSink(out, roll_seconds=60), CONTEXT)
    writer.write(sink_batch(ROWS[:10]))
    await writer.flush()  # the staging file is created now
    now[0] += 59.9
    writer.write(sink_batch(ROWS[10:20]))
    await writer.flush()
    assert parts(out) == []
    now[0] += 0.1
    await writer.flush()  # nothing new: rolls all the same
    assert [pq.read_metadata(p).num_rows for p in parts(out)] == [20]
    writer.write(sink_batch(ROWS[20:30]))
    await writer.flush()
    now[0] += 60
    writer.write(sink_batch(ROWS[30:40]))
    await writer.flush()
    assert [pq.read_metadata(p).num_rows for p in parts(out)] == [20, 20]
    writer.write(sink_batch(ROWS[40:45]))
    await writer.close()
    assert [pq.read_metadata(p).num_rows for p in parts(out)] == [20, 20, 5]
    assert rows_in(out) == ROWS[:45]


async def test_a_failed_append_leaves_the_staging_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that fails half-way (a full disk) is cut back and its rows stay buffered: the
    flush raises, and a later one writes them once."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out), CONTEXT)
    await write_in_flushes(writer, ROWS[:10], 10)
    [staging] = [out / name for name in hidden(out)]
    size = staging.stat().st_size
    real_write_all = parquet_module._write_all

    def full_disk(fd: int, data: bytes) -> None:
        real_write_all(fd, data[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(parquet_module, "_write_all", full_disk)
    writer.write(sink_batch(ROWS[10:20]))
    with pytest.raises(ConnectorError, match=r"the file was left as it was\. Free space"):
        await writer.flush()
    assert staging.stat().st_size == size
    monkeypatch.setattr(parquet_module, "_write_all", real_write_all)
    writer.write(sink_batch(ROWS[20:30]))
    await writer.close()
    assert rows_in(out) == ROWS[:30]


# -- crashes --------------------------------------------------------------------------------------


def _flush_then_die(directory: str, worker: int, hold: Any = None, ready: Any = None) -> None:
    """Runs in a spawned process: write and flush 50 rows in two flushes, buffer 5 more
    without flushing, then die by SIGKILL (after ``ready`` and ``hold``, when given)."""

    async def run() -> None:
        writer = await started(ParquetSink(directory), SinkContext("p", "sink.parquet", worker))
        await write_in_flushes(writer, ROWS[:50], 25)
        writer.write(sink_batch(ROWS[50:55]))  # never flushed: its offsets were never committed
        if ready is not None:
            ready.set()
            hold.wait(60)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(run())


def killed(process: BaseProcess) -> None:
    """Wait for ``process`` to kill itself; fail (killing it) if it does not in time."""
    process.join(60)
    if process.exitcode is None:
        process.kill()
        process.join(10)
        raise AssertionError("the writer process did not finish in 60 s")
    assert process.exitcode == -signal.SIGKILL, f"exit code {process.exitcode}"


def crash_a_writer(directory: Path, worker: int = 3) -> None:
    """A writer in another process that flushed ROWS[:50] and was killed."""
    process = multiprocessing.get_context("spawn").Process(
        target=_flush_then_die, args=(str(directory), worker)
    )
    process.start()
    killed(process)


def torn_message(staging: Path) -> bytes:
    """The first half of a record batch message of the staging file's schema."""
    schema = pa.ipc.open_stream(staging.read_bytes()).schema
    batch = pa.RecordBatch.from_pylist([{"i": -1, "name": "torn", "score": 0.0}], schema=schema)
    message: bytes = batch.serialize().to_pybytes()
    return message[: len(message) // 2]


TAILS: dict[str, Callable[[Path], bytes]] = {
    "none": lambda staging: b"",
    "torn message": torn_message,
    "torn length": lambda staging: b"\xff\xff\xff\xff\x10",
    "garbage": lambda staging: b"\xff\xff\xff\xff\x20\x00\x00\x00" + b"\x07" * 40,
}


@pytest.mark.slow
@pytest.mark.parametrize("tail", list(TAILS))
async def test_a_crashed_writers_staging_file_becomes_a_parquet_file(
    tmp_path: Path, tail: str
) -> None:
    """A writer killed after two flushes leaves a staging file; the next writer's start turns
    it into a Parquet file with exactly the flushed rows, leaving out what a crash in the middle
    of an append left at its end."""
    out = tmp_path / "out"
    crash_a_writer(out)
    [name] = hidden(out)
    assert name.startswith(".staging-p-sink.parquet-3-") and parts(out) == []
    staging = out / name
    torn = TAILS[tail](staging)
    with staging.open("ab") as append:
        append.write(torn)
    writer = await started(ParquetSink(out), CONTEXT)
    assert hidden(out) == []
    [file] = parts(out)
    assert pq.read_table(file).to_pylist() == ROWS[:50]
    writer_id = name.removeprefix(".staging-p-sink.parquet-").removesuffix(".arrows")
    assert file.name.endswith(f"-{writer_id}.parquet")  # named after the crashed writer
    await writer.close()
    assert parts(out) == [file]


async def test_a_crash_between_renaming_and_removing_writes_no_second_copy(
    tmp_path: Path,
) -> None:
    """A staging file whose Parquet file exists already (the writer died right after the
    rename) is only removed."""
    out = tmp_path / "out"
    writer = await started(ParquetSink(out), CONTEXT)
    await write_in_flushes(writer, ROWS[:20], 10)
    [name] = hidden(out)
    copy = (out / name).read_bytes()
    await writer.close()
    (out / name).write_bytes(copy)
    await (await started(ParquetSink(out), CONTEXT)).close()
    assert hidden(out) == [] and len(parts(out)) == 1
    assert rows_in(out) == ROWS[:20]


@pytest.mark.slow
async def test_a_live_writers_staging_file_is_left_alone(tmp_path: Path) -> None:
    """Another writer's start leaves the staging file of a live writer (in this process or in
    another) alone; once that process is killed, the next start recovers it."""
    out = tmp_path / "out"
    local = await started(ParquetSink(out), SinkContext("p", "sink.parquet", 1))
    await write_in_flushes(local, ROWS[100:110], 10)
    spawn = multiprocessing.get_context("spawn")
    hold, ready = spawn.Event(), spawn.Event()
    process = spawn.Process(target=_flush_then_die, args=(str(out), 2, hold, ready))
    process.start()
    try:
        assert await asyncio.to_thread(ready.wait, 60), "the writer process did not flush"
        before = hidden(out)
        assert len(before) == 2
        other = await started(ParquetSink(out), CONTEXT)
        assert hidden(out) == before and parts(out) == []
        await other.close()
    finally:
        hold.set()
        await asyncio.to_thread(killed, process)
    after = await started(ParquetSink(out), CONTEXT)
    assert rows_in(out) == ROWS[:50]  # the dead writer's rows; the live one's stay staged
    await after.close()
    await local.close()
    assert sorted(rows_in(out), key=lambda row: row["i"]) == ROWS[:50] + ROWS[100:110]
    assert hidden(out) == []


async def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    """A temporary file no one holds is removed by a starting writer once it is a minute old
    (a crash in the middle of writing a file); a younger one is left."""
    out = tmp_path / "out"
    out.mkdir()
    old = out / ".tmp-part-p-s-20240101T000000000000Z-0-0123abcd-000000.parquet"
    young = out / ".tmp-staging-p-s-0-0123abcd-000001.arrows"
    old.write_bytes(b"PAR1 half")
    young.write_bytes(b"half")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    await (await started(ParquetSink(out), CONTEXT)).close()
    assert hidden(out) == [young.name]


async def test_earlier_output_and_output_files(tmp_path: Path) -> None:
    """earlier_output counts the step's Parquet and staging files; output_files lists them
    and not another step's."""
    out = tmp_path / "out"
    sink = ParquetSink(out)
    assert await sink.earlier_output("p", "sink.parquet") is None  # no directory yet
    writer = await started(sink, CONTEXT)
    await write_in_flushes(writer, ROWS[:10], 10)
    held = await sink.earlier_output("p", "sink.parquet")
    assert held == (
        f"directory {str(out)!r} holds 0 Parquet files and 1 staging files of writers that did "
        "not finish (their rows become Parquet files when a writer starts)"
    )
    await writer.close()
    other = sink.open(SinkContext("p", "other", 0))
    await write_in_flushes(other, ROWS[:5], 5)
    await other.close()
    assert await sink.earlier_output("p", "sink.parquet") == (
        f"directory {str(out)!r} holds 1 Parquet files"
    )
    [mine] = sink.files_of("p", "sink.parquet")
    assert Path(mine).name.startswith("part-p-sink.parquet-")
    assert len(sink.files_of("p", "other")) == 1
    assert sink.files_of("q", "sink.parquet") == []
    assert sink.output_files("p", "sink.parquet") == [Path(mine)]


# -- the source -----------------------------------------------------------------------------------


@pytest.fixture
def three_files(tmp_path: Path) -> Path:
    """A directory of three Parquet files (90, 90 and 20 rows of ROWS), a staging-like hidden
    file, a ``_SUCCESS`` marker and a text file the source skips."""
    out = tmp_path / "out"

    async def write() -> None:
        writer = await started(ParquetSink(out, roll_rows=64), CONTEXT)
        await write_in_flushes(writer, ROWS, 30)
        await writer.close()

    asyncio.run(write())
    (out / "_SUCCESS").write_text("")
    (out / ".hidden.parquet").write_bytes(b"not parquet")
    (out / "notes.txt").write_text("not parquet")
    return out


async def test_source_resumes_from_every_position_without_repeating_or_skipping(
    three_files: Path,
) -> None:
    """From the position after each batch the source reads exactly the rest, across files and
    row groups."""
    source = ParquetSource(three_files, batch_size=32)
    batches = await read_to_end(source)
    assert values_of(batches) == ROWS
    read = 0
    for batch in batches:
        read += len(batch.values)
        assert values_of(await read_to_end(source, batch.position)) == ROWS[read:]
    names = [p.name for p in parts(three_files)]
    assert batches[-1].position == {"file": names[-1], "row": 20}
    assert {"file": names[0], "row": 90} in [b.position for b in batches]


async def test_source_resumes_inside_a_row_group(tmp_path: Path) -> None:
    """A stored row in the middle of a file of several row groups resumes right after it."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), out / "a.parquet", row_group_size=30)
    source = ParquetSource(out, batch_size=7)
    for row in (0, 1, 29, 30, 31, 95, 199, 200):
        rest = values_of(await read_to_end(source, {"file": "a.parquet", "row": row}))
        assert rest == ROWS[row:]


async def test_source_reads_files_added_later_on_a_later_run(three_files: Path) -> None:
    """Files a sink adds after a run (later names) are what the next run reads."""
    source = ParquetSource(three_files)
    done = (await read_to_end(source))[-1].position
    writer = await started(ParquetSink(three_files), CONTEXT)
    more = [{"i": 1000 + n, "name": "more", "score": 0.0} for n in range(5)]
    await write_in_flushes(writer, more, 5)
    await writer.close()
    assert values_of(await read_to_end(source, done)) == more


async def test_source_refuses_a_position_it_cannot_resume_from(three_files: Path) -> None:
    """A position naming a file that is gone, a row past a file's end, or another source's
    position raises ConnectorError saying what to do."""
    source = ParquetSource(three_files)
    first = parts(three_files)[0].name
    with pytest.raises(ConnectorError, match="which is not there any more; put it back"):
        await read_to_end(source, {"file": "part-gone.parquet", "row": 3})
    with pytest.raises(ConnectorError, match="but it has 90 rows: it was replaced"):
        await read_to_end(source, {"file": first, "row": 91})
    with pytest.raises(ConnectorError, match="belongs to another kind of source"):
        await read_to_end(source, 1234)
    with pytest.raises(ConnectorError, match="no such directory or file"):
        await read_to_end(ParquetSource(three_files / "missing"))


async def test_source_keys_timestamps_and_globs(tmp_path: Path) -> None:
    """key= computes keys, timestamp_field= gives event times in ms (a null one is the time
    of reading), a glob picks files by name."""
    for day in ("2024-01-01", "2024-01-02"):
        directory = tmp_path / day
        directory.mkdir()
        rows = [
            {"id": f"{day}/{n}", "at": datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=n)}
            for n in range(3)
        ]
        rows[2]["at"] = None
        pq.write_table(
            pa.Table.from_pylist(
                rows, schema=pa.schema([("id", pa.string()), ("at", pa.timestamp("ns", tz="UTC"))])
            ),
            directory / "data.parquet",
        )
    source = ParquetSource(
        tmp_path / "2024-*" / "*.parquet", key=lambda v: v["id"][-1], timestamp_field="at"
    )
    before = int(time.time() * 1000)
    batches = await read_to_end(source)
    assert [b.position for b in batches] == [
        {"file": "2024-01-01/data.parquet", "row": 3},
        {"file": "2024-01-02/data.parquet", "row": 3},
    ]
    assert batches[1].keys == ["0", "1", "2"]
    base = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
    stamps = batches[0].timestamps
    assert stamps is not None and stamps[:2] == [base, base + 1000] and stamps[2] >= before
    with pytest.raises(ConnectorError, match="must name a timestamp column"):
        await read_to_end(ParquetSource(tmp_path / "2024-01-01", timestamp_field="id"))


# -- fsspec filesystems -------------------------------------------------------------------------


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh directory on fsspec's in-memory filesystem, removed afterwards."""
    url = f"memory://headwater-tests/{uuid.uuid4().hex}/out"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


async def test_memory_filesystem_one_file_per_flush(memory_url: str) -> None:
    """On a filesystem that is not local every flush with rows uploads one whole Parquet file
    (no staging), and the source reads them back through fsspec."""
    sink = ParquetSink(memory_url, roll_rows=10)
    assert sink.local_directory is None
    writer = await started(sink, CONTEXT)
    await write_in_flushes(writer, ROWS[:75], 25)
    await writer.flush()  # nothing buffered: no file
    fs, root = fsspec.core.url_to_fs(memory_url)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False))
    assert len(names) == 3 and all(n.startswith("part-p-sink.parquet-") for n in names)
    writer.write(sink_batch(ROWS[75:80]))
    await writer.close()
    assert len(fs.ls(root, detail=False)) == 4
    assert await sink.earlier_output("p", "sink.parquet") == (
        f"directory {memory_url!r} holds 4 Parquet files"
    )
    batches = await read_to_end(ParquetSource(memory_url, batch_size=20))
    assert values_of(batches) == ROWS[:80]
    assert [len(b.values) for b in batches[:3]] == [20, 5, 20]  # batches end with files
    resumed = await read_to_end(ParquetSource(memory_url), batches[2].position)
    assert values_of(resumed) == ROWS[45:80]


# -- through the command line ------------------------------------------------------------------

MODULE = """
import connectors
from connectors.parquet import ParquetSink
from pydantic import BaseModel
from pipelines import Pipeline, Topic


class Row(BaseModel):
    id: int
    name: str
    score: float


pipeline = (
    Pipeline("to_parquet")
    .source(connectors.JsonLines("in.jsonl"), into=Topic("rows", partitions=2))
    .sink(ParquetSink("out", model=Row, roll_rows=100))
)
"""


@pytest.mark.slow
def test_headwater_run_writes_the_input_as_parquet(tmp_path: Path) -> None:
    """``headwater run`` of a pipeline from a JSON Lines file into a ParquetSink: the
    directory, read with pandas, holds the input; a second run resumes and adds nothing."""
    rows = [{"id": n, "name": f"name {n}", "score": n * 1.5} for n in range(500)]
    expected = pd.DataFrame(rows)
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    (tmp_path / "mod.py").write_text(MODULE)
    for _ in range(2):
        result = headwater("run", "mod.py", "--no-progress", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        got = pd.read_parquet(tmp_path / "out").sort_values("id").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
        assert hidden(tmp_path / "out") == []
