"""File sinks under faults, through ``headwater run`` on a real pipeline module.

- A full disk in the middle of a flush, for real: the run goes in a child process whose file
  size limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored, so ``write`` fails with ``EFBIG``) is
  reached by the sink's file half-way through an append. The run stops with one paragraph, the
  file holds only whole lines (exactly what earlier flushes wrote), and a run without the limit
  completes it: every input at least once, still no torn line.
- A value the sink cannot encode (a ``set``) follows the sink step's error policy: under
  ``DEAD_LETTER`` it lands in the dead-letter topic with headers naming the sink step and the
  rest is written; ``SKIP`` drops and counts it; ``FAIL`` stops the run with the sink's message.
- A failed flush is cut back and kept for a retry; a cut that fails too says what to do.
- The cut spares what another writer of the file appends meanwhile: every append holds the
  file's lock, so the other writer's lines follow the cut, never the partial line.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.cli import assert_user_error, headwater, write_module
from support.connectors import sink_batch

from connectors import JsonLinesSink, SinkContext
from pipelines.errors import ConnectorError
from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition

TIMEOUT = 90.0
PAD = "x" * 4000
TOTAL = 1000
LIMIT = 1_000_000
"""Bytes a file may reach in the limited run: the sink's file gets there after a few flushes of
50 lines of 4 kB; the log's files (of short records) and the SQLite files of the workers' local
state (a few pages per checkpoint) stay far below."""

PACED_MODULE = """
import asyncio
import os
import time

import connectors
from pipelines import Pipeline, Topic

OUT = {out!r}
TOTAL = {total}
STEP = 50
PACE = os.environ.get("PACE_BY_FLUSHES") == "1"


def size():
    try:
        return os.path.getsize(OUT)
    except FileNotFoundError:
        return 0


async def numbers():
    # paced: the next 50 only once the worker has flushed the last ones (or 5 s have passed),
    # so that the limited run fails in one flush after several that succeeded
    for start in range(0, TOTAL, STEP):
        before = size()
        for i in range(start, start + STEP):
            yield i
        deadline = time.monotonic() + 5
        while PACE and size() == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


pipeline = (
    Pipeline("disk")
    .source(connectors.Iterable(numbers, batch_size=STEP), into=Topic("numbers", partitions=2))
    .map("pad", lambda i: {{"id": i, "pad": {pad!r}}})
    .sink({sink}, step_id="file")
)
"""

SETS_MODULE = """
import connectors
from pipelines import Pipeline, Topic


def shape(i):
    if i % 10 == 3:
        return {{"id": i, "tags": {{1, 2}}}}  # JSON has no sets
    if i % 10 == 7 and {scalars}:
        return i  # no CSV row
    return {{"id": i}}


pipeline = (
    Pipeline("sets", error_policy={policy!r})
    .source(connectors.Iterable(range(100)), into=Topic("numbers", partitions=2))
    .map("shape", shape)
    .sink({sink}, step_id="file")
)
"""


# -- a full disk in the middle of a flush ------------------------------------------------------


def files_up_to(limit: int) -> Callable[[], None]:
    """For ``preexec_fn``: no process of the run (the runner and its workers inherit it) may
    make a file larger than ``limit`` bytes."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


SINKS = {
    "jsonlines": "connectors.JsonLinesSink(OUT)",
    "csv": 'connectors.CsvSink(OUT, fields=["id", "pad"])',
}


def whole_records(kind: str, data: bytes) -> list[dict[str, Any]]:
    """The records of a sink's file, checking that each is whole: the file ends with a newline,
    every line parses, and every padding is complete."""
    assert data.endswith(b"\n"), data[-200:]
    if kind == "jsonlines":
        records = [orjson.loads(line) for line in data.splitlines()]
    else:
        rows = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
        assert all(len(row) == 2 and None not in row.values() for row in rows), rows[-3:]
        records = [{"id": int(row["id"]), "pad": row["pad"]} for row in rows]
    assert all(r["pad"] == PAD for r in records), [r for r in records if r["pad"] != PAD][:3]
    return records


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_disk_full_mid_flush_leaves_whole_lines_and_a_rerun_completes(
    tmp_path: Path, kind: str
) -> None:
    out = tmp_path / f"out.{kind}"
    module = write_module(
        tmp_path / "disk.py",
        PACED_MODULE.format(out=str(out), total=TOTAL, pad=PAD, sink=SINKS[kind]),
    )

    full = headwater(
        "run",
        module,
        "--no-progress",
        cwd=tmp_path,
        env={"PACE_BY_FLUSHES": "1"},
        preexec_fn=files_up_to(LIMIT),
        timeout=TIMEOUT,
    )
    assert_user_error(
        full,
        f"{str(out)!r} failed: File too large",
        "the file was left as it was before",
        "no partial line",
        "run the pipeline again",
    )
    data = out.read_bytes()
    assert len(data) <= LIMIT
    written = whole_records(kind, data)
    assert written, "no flush succeeded before the limit: the test proves less than it should"
    assert len({r["id"] for r in written}) < TOTAL

    again = headwater("run", module, "--no-progress", cwd=tmp_path, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
    records = whole_records(kind, out.read_bytes())
    assert {r["id"] for r in records} == set(range(TOTAL))  # at least once each


# -- values a sink cannot encode ---------------------------------------------------------------


def dead_letters(data_dir: Path, pipeline: str) -> list[tuple[bytes | None, dict[str, str]]]:
    """The value and headers of every record in the pipeline's dead-letter topic."""

    async def read() -> list[tuple[bytes | None, dict[str, str]]]:
        log = EmbeddedLog(data_dir)
        try:
            name = f"{pipeline}.dead-letters"
            found = []
            for partition in range((await log.describe_topics())[name].partitions):
                fetched = await log.read(TopicPartition(name, partition), 0, 10_000)
                records = fetched.records
                for i in range(len(records)):
                    headers = {k: v.decode() for k, v in records.header_at(i)}
                    found.append((records.values[i], headers))
            return found
        finally:
            await log.close()

    return asyncio.run(read())


def sets_module(tmp_path: Path, policy: str, sink: str = "jsonlines") -> Path:
    scalars = sink == "csv"
    expression = (
        'connectors.CsvSink("out.csv", fields=["id", "tags"])'
        if sink == "csv"
        else 'connectors.JsonLinesSink("out.jsonl")'
    )
    source = SETS_MODULE.format(policy=policy, sink=expression, scalars=scalars)
    return write_module(tmp_path / "sets.py", source)


def test_a_set_is_dead_lettered_naming_the_sink_step_and_the_rest_is_written(
    tmp_path: Path,
) -> None:
    result = headwater(
        "run", sets_module(tmp_path, "dead_letter"), "--no-progress", cwd=tmp_path, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "file: 100 in, 90 out, 10 to dead letters" in result.stderr
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert sorted(orjson.loads(line)["id"] for line in lines) == [
        i for i in range(100) if i % 10 != 3
    ]
    letters = dead_letters(tmp_path / ".headwater", "sets")
    assert sorted(int(value or b"") for value, _ in letters) == list(range(3, 100, 10))
    for value, headers in letters:
        assert headers["headwater.step"] == "file"
        assert headers["headwater.error.type"] == "UnwritableValue"
        assert "cannot be written as JSON" in headers["headwater.error"]
        assert "set" in headers["headwater.error"]
        assert headers["headwater.source.topic"] == "numbers"
        assert value is not None


def test_csv_cells_and_rows_it_cannot_write_are_dead_lettered(tmp_path: Path) -> None:
    result = headwater(
        "run",
        sets_module(tmp_path, "dead_letter", sink="csv"),
        "--no-progress",
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "file: 100 in, 80 out, 20 to dead letters" in result.stderr
    with (tmp_path / "out.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["id", "tags"]
    assert sorted(int(row[0]) for row in rows[1:]) == [
        i for i in range(100) if i % 10 not in (3, 7)
    ]
    errors = {
        h["headwater.error"].split(";")[0] for _, h in dead_letters(tmp_path / ".headwater", "sets")
    }
    assert errors == {
        "CsvSink 'out.csv': a value cannot be written as a CSV row "
        "(Type is not JSON serializable: set)",
        "CsvSink 'out.csv': cannot write a int as a CSV row",
    }


def test_skip_drops_values_the_sink_cannot_write_and_counts_them(tmp_path: Path) -> None:
    result = headwater(
        "run", sets_module(tmp_path, "skip"), "--no-progress", cwd=tmp_path, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "file: 100 in, 90 out, 10 skipped" in result.stderr
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == 90
    assert dead_letters(tmp_path / ".headwater", "sets") == []


def test_fail_stops_the_run_with_the_sinks_message(tmp_path: Path) -> None:
    result = headwater(
        "run", sets_module(tmp_path, "fail"), "--no-progress", cwd=tmp_path, timeout=TIMEOUT
    )
    assert_user_error(
        result,
        "JsonLinesSink 'out.jsonl': a value cannot be written as JSON",
        "Type is not JSON serializable: set",
        "map the stream to dicts",
        "(step 'file', record numbers[",
    )


# -- the flush itself ----------------------------------------------------------------------------


def fail_writes_to(
    monkeypatch: pytest.MonkeyPatch, path: Path, after: int, code: int = errno.ENOSPC
) -> None:
    """Make ``os.write`` to ``path`` write ``after`` bytes at most, then fail with ``code``."""
    real_write = os.write
    target = os.stat(path).st_ino
    full = os.stat(path).st_size + after

    def write(fd: int, data: Any) -> int:
        if os.fstat(fd).st_ino != target:
            return real_write(fd, data)
        room = full - os.fstat(fd).st_size
        if room <= 0:
            raise OSError(code, os.strerror(code))
        return real_write(fd, bytes(data)[:room])

    monkeypatch.setattr(os, "write", write)


async def test_a_failed_flush_is_cut_back_and_kept_for_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":0}\n')
    writer = JsonLinesSink(path).open(SinkContext("p", "file", 0))
    writer.write(sink_batch([{"id": i} for i in range(1, 100)], first=0))
    with monkeypatch.context() as patch:
        fail_writes_to(patch, path, after=50)
        with pytest.raises(ConnectorError, match="No space left on device") as caught:
            await writer.flush()
    assert path.read_bytes() == b'{"id":0}\n'
    assert "left as it was before (9 bytes, no partial line)" in str(caught.value)
    assert "Free space on its filesystem" in str(caught.value)
    await writer.close()  # space is back: the kept buffer goes, once
    ids = [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert ids == list(range(100))


async def test_a_cut_that_fails_too_says_what_to_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":0}\n')
    writer = JsonLinesSink(path).open(SinkContext("p", "file", 0))
    writer.write(sink_batch([{"id": i} for i in range(1, 100)], first=0))

    def refuse(fd: int, size: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        fail_writes_to(patch, path, after=50)
        patch.setattr(os, "ftruncate", refuse)
        with pytest.raises(ConnectorError) as caught:
            await writer.flush()
    message = str(caught.value)
    assert "cutting the file back to its 9 bytes from before failed too" in message
    assert "remove everything after its first 9 bytes" in message
    assert len(path.read_bytes()) == 9 + 50  # the partial line the cut could not remove
    await writer.close()


def lock_waiters(path: Path) -> int:
    """How many ``flock`` requests on ``path`` wait for its holder (the kernel's lock table)."""
    stat = path.stat()
    file = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino} "
    with open("/proc/locks") as table:
        return sum(1 for line in table if " -> " in line and file in line)


async def test_a_cut_back_spares_the_lines_another_writer_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"w":"before"}\n')
    sink = JsonLinesSink(path)
    failing = sink.open(SinkContext("p", "file", 0))
    other = sink.open(SinkContext("p", "file", 1))
    mine = [{"w": "a", "i": i} for i in range(100)]
    theirs = [{"w": "b", "i": i} for i in range(100)]
    failing.write(sink_batch(mine, first=0))
    other.write(sink_batch(theirs, first=0))

    torn = threading.Event()  # the failing append's first bytes are in the file
    other_wrote = threading.Event()
    failing_fd: list[int] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        data = bytes(data)
        if not failing_fd and b'"w":"a"' in data:  # the failing append: 50 bytes go
            failing_fd.append(fd)
            written = real_write(fd, data[:50])
            torn.set()
            return written
        if failing_fd and fd == failing_fd[0]:
            # the disk is full when the other writer has either appended after the partial
            # line or is waiting for the lock (an event each, polled with a deadline)
            deadline = time.monotonic() + TIMEOUT
            while not (other_wrote.is_set() or lock_waiters(path)):
                assert time.monotonic() < deadline, "the other writer neither wrote nor waited"
                time.sleep(0.001)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, data)
        if b'"w":"b"' in data:
            other_wrote.set()
        return written

    async def flush_the_other() -> None:
        assert await asyncio.to_thread(torn.wait, TIMEOUT)
        await other.flush()

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write)
        failed, flushed = await asyncio.gather(
            failing.flush(), flush_the_other(), return_exceptions=True
        )
    assert isinstance(failed, ConnectorError), failed
    assert "no partial line" in str(failed)
    assert flushed is None, flushed
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"w":"before"}'
    assert [orjson.loads(line) for line in lines[1:]] == theirs
    await failing.close()  # the kept buffer goes after them, once
    await other.close()
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()[1:]] == theirs + mine
