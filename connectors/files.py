"""File connectors: JSON Lines and CSV sources (optionally tailing a growing file), and
append-only JSON Lines and CSV sinks that several worker processes can share.

Sources resume from a **byte offset**: the position stored after each batch is the offset just
past its last line, so a restarted source neither skips nor repeats a line (except the one
batch a crash may replay: at-least-once). They assume the file only grows while the pipeline
knows it; a file that is truncated or replaced under a stored position raises
:class:`~pipelines.errors.ConnectorError` instead of silently re-reading or skipping data.
Rotation (rename and recreate) is not followed: a following source keeps reading the file it
opened.

Sinks append whole batches with one ``write`` per flush on a file opened with ``O_APPEND``, so
the lines of concurrent writers never interleave on a local filesystem (NFS does not promise
atomic appends). They are at-least-once: records replayed after a crash are appended again.
Every append holds an exclusive ``flock`` that all the writers of a file take, so one that fails
half-way (a full disk, a file size limit) can cut the file back to its size before without
touching another writer's lines: a failed flush leaves no partial line for the next run to
append to. A value a sink cannot encode raises :class:`~connectors.base.UnwritableValue`, and the
runtime applies the sink step's error policy to its record (see :mod:`connectors.base`).
"""

from __future__ import annotations

import asyncio
import csv
import errno
import fcntl
import io
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeAlias

import orjson
from pydantic import BaseModel

from connectors._json import json_default
from connectors.base import (
    Position,
    Sink,
    SinkContext,
    SinkWriter,
    Source,
    SourceBatch,
    UnwritableValue,
    int_position,
)
from pipelines.batch import Batch
from pipelines.errors import ConnectorError

__all__ = ["Csv", "CsvSink", "JsonLines", "JsonLinesSink"]

CHUNK_SIZE = 1 << 20
"""Bytes read per system call by the file sources."""

_BOM = b"\xef\xbb\xbf"
_EXTRA = "_extra"

PathLike: TypeAlias = str | os.PathLike[str]


# -- reading -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Lines:
    """A run of lines read from a file.

    ``lines`` are the complete lines in ``[start, end)`` without their ``\\n`` (a ``\\r``
    before it is kept), except that at the end of a file that is not followed the last,
    unterminated line is returned alone with ``end`` at the end of the file. ``idle`` means
    the reader has reached the end of the file for now; ``has_cr`` that some line ends in
    ``\\r``.
    """

    lines: list[bytes]
    start: int
    end: int
    idle: bool
    has_cr: bool = False


def _open_error(path: Path, error: OSError, what: str) -> ConnectorError:
    if isinstance(error, FileNotFoundError):
        hint = (
            f"no such file {str(path)!r} (absolute: {str(path.absolute())!r}); fix the path, "
            "or pass follow=True to wait for the file to appear"
        )
    elif isinstance(error, IsADirectoryError):
        hint = f"{str(path)!r} is a directory; give the path of a file"
    elif isinstance(error, PermissionError):
        hint = f"permission denied reading {str(path)!r}; make it readable by the runner"
    else:
        hint = f"cannot read {str(path)!r}: {error.strerror or error}"
    return ConnectorError(f"{what}: {hint}")


async def _open(path: Path, *, follow: bool, poll_interval: float, what: str) -> BinaryIO:
    """The file opened for reading; when following, wait for it to exist."""
    while True:
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError as error:
            if not follow:
                raise _open_error(path, error, what) from error
        except OSError as error:
            raise _open_error(path, error, what) from error
        await asyncio.sleep(poll_interval)


async def _read_lines(
    path: Path,
    offset: int,
    *,
    follow: bool,
    poll_interval: float,
    what: str,
) -> AsyncGenerator[_Lines, None]:
    """The lines of ``path`` from byte ``offset`` on, in runs of about :data:`CHUNK_SIZE`.

    Without ``follow`` it ends at the end of the file, after returning a last unterminated
    line. With ``follow`` it never ends: at the end of the file it returns an idle, empty run
    and polls every ``poll_interval`` seconds, and holds back an unterminated last line until
    its newline arrives.
    """
    file = await _open(path, follow=follow, poll_interval=poll_interval, what=what)
    try:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        if offset > size:
            raise ConnectorError(
                f"{what}: the stored position {offset} is past the end of {str(path)!r} "
                f"({size} bytes): the file was truncated or replaced since; restore it, or "
                "reset the pipeline's positions to read it again from the start"
            )
        if offset == 0 and os.pread(fd, 3, 0) == _BOM:
            offset = 3  # a UTF-8 byte order mark is not part of the first line
        file.seek(offset)
        read = file.read
        partial: list[bytes] = []  # the bytes after the last newline read so far
        start = offset  # the file offset where the next run of lines starts
        pos = offset  # the file offset after everything read
        while True:
            chunk = await asyncio.to_thread(read, CHUNK_SIZE)
            if chunk:
                pos += len(chunk)
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    partial.append(chunk)
                    continue
                if partial:
                    partial.append(chunk[:cut])
                    data = b"".join(partial)
                else:
                    data = chunk[:cut]
                partial = [chunk[cut + 1 :]] if cut + 1 < len(chunk) else []
                end = pos - (len(chunk) - cut - 1)
                yield _Lines(data.split(b"\n"), start, end, False, b"\r" in data)
                start = end
                continue
            if not follow:
                if partial:
                    data = b"".join(partial)
                    yield _Lines([data], start, pos, True, data.endswith(b"\r"))
                else:
                    yield _Lines([], start, start, True)
                return
            if os.fstat(fd).st_size < pos:
                raise ConnectorError(
                    f"{what}: {str(path)!r} shrank below the {pos} bytes already read: it was "
                    "truncated (copytruncate rotation is not supported); restart the pipeline "
                    "with its positions reset to read the new content"
                )
            yield _Lines([], start, start, True)
            await asyncio.sleep(poll_interval)
    finally:
        file.close()


@dataclass(slots=True)
class _Rows:
    """Complete CSV rows in ``[start, end)``; ``idle`` as in :class:`_Lines`."""

    rows: list[bytes]
    start: int
    end: int
    idle: bool


def _strip_cr(lines: list[bytes]) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


class JsonLines(Source):
    """A source that reads a JSON Lines file (one JSON value per line), line by line.

    Lines are passed through **raw**: each value is the line's bytes without its newline (and
    without a ``\\r`` before it), not parsed. The workers deserialise and validate them with
    the topic's serde, so a malformed line reaches them as it is and goes to the dead-letter
    topic under the default error policy. Blank lines are skipped. A UTF-8 byte order mark at
    the start of the file is dropped.

    **Position**: the byte offset just after the last line of the batch. ``read(position)``
    seeks there, so a restarted source emits every line exactly once, except that a crash
    between a batch reaching the log and its position being stored replays that batch
    (at-least-once).

    Only complete lines (ending in ``\\n``) are emitted while more may come. Without
    ``follow`` the source ends at the end of the file, emitting an unterminated last line as
    it is. With ``follow=True`` it tails the file forever, polling every ``poll_interval``
    seconds: it waits for a file that does not exist yet, and holds back an unterminated last
    line until its newline is written. Batches hold at most ``batch_size`` lines (fewer at
    the end of the data read so far, or when blank lines were skipped).

    A missing or unreadable file raises :class:`~pipelines.errors.ConnectorError` saying which
    path and what to fix (a missing file only when not following).

    ``key``, if given, is applied to each line's *parsed* value to compute the record key.
    That costs an extra orjson parse of every line in the runner, on top of the workers' own
    (about 0.3 µs for a short line: reading becomes about three times slower than raw); a
    line that is not valid JSON, or for which ``key`` raises, gets the key ``None``. The
    value stays the raw line either way.
    """

    name = "jsonlines"

    def __init__(
        self,
        path: PathLike,
        *,
        follow: bool = False,
        batch_size: int = 1000,
        poll_interval: float = 0.2,
        key: Callable[[Any], Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path = Path(path)
        self.follow = follow
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.key = key

    def __repr__(self) -> str:
        return f"JsonLines({str(self.path)!r}, follow={self.follow})"

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of raw lines after byte offset ``position`` (see the class docstring)."""
        what = f"JsonLines source {str(self.path)!r}"
        size = self.batch_size
        carry: list[bytes] = []  # lines read but not emitted yet (fewer than a batch)
        carry_start = int_position(position, what, "a byte offset")
        cr = False  # some line ended in \r\n: strip the \r from the values
        runs = _read_lines(
            self.path,
            carry_start,
            follow=self.follow,
            poll_interval=self.poll_interval,
            what=what,
        )
        async with aclosing(runs):
            async for run in runs:
                cr = cr or run.has_cr
                lines = run.lines
                if carry:
                    lines = carry + lines
                    carry = []
                else:
                    carry_start = run.start
                count = len(lines)
                full = count if run.idle else count - count % size
                pos = carry_start
                for i in range(0, full, size):
                    chunk = lines[i : i + size]
                    pos += sum(map(len, chunk)) + len(chunk)  # each line and its newline
                    values = [line for line in chunk if line and not line.isspace()]
                    if values:
                        if cr:
                            values = _strip_cr(values)
                        yield self._batch(values, min(pos, run.end))
                if full < count:
                    carry = lines[full:]
                    carry_start = pos
                else:
                    carry_start = run.end

    def _batch(self, values: list[bytes], position: int) -> SourceBatch:
        if self.key is None:
            return SourceBatch(values, position, raw=True)
        return SourceBatch(values, position, keys=_keys(values, self.key), raw=True)


def _keys(values: list[bytes], key: Callable[[Any], Any]) -> list[Any]:
    loads = orjson.loads
    keys: list[Any] = []
    for line in values:
        try:
            keys.append(key(loads(line)))
        except Exception:  # a malformed line, or a key function that does not fit it
            keys.append(None)
    return keys


class Csv(Source):
    """A source that reads a CSV file with a header row; each row becomes a dict.

    Rows are parsed with the standard :mod:`csv` module (``delimiter``, ``"`` as the quote
    character, quotes escaped by doubling, as in RFC 4180) into ``{column: text}`` dicts keyed
    by the header. ``types`` maps column names to converters applied to the text (e.g.
    ``{"n": int, "price": float}``); an empty cell in a typed column becomes ``None``, and a
    cell the converter rejects (raises) keeps its text, so the workers' validation can route
    the record to the dead-letter topic. A row shorter than the header gets ``None`` for the
    missing columns; the cells of a longer row beyond the header go to a list under
    ``"_extra"``. Blank lines are skipped. The file is decoded as UTF-8 (an invalid byte
    becomes U+FFFD; a leading byte order mark is dropped).

    Quoted fields may contain newlines, in both modes: a line that leaves a quoted field open
    is joined with the next ones until the field closes. This relies on quote characters
    appearing only in quoted fields; a stray ``"`` inside an unquoted field makes the reader
    join the following lines into that row until another stray quote (and, when following,
    wait for one).

    **Position**: the byte offset just after the last row of the batch; ``read(position)``
    reads the header again from the start of the file, then seeks there. At-least-once: a
    crash between a batch reaching the log and its position being stored replays that batch.

    ``follow`` and ``poll_interval`` work as for :class:`JsonLines`: without ``follow`` an
    unterminated last row is emitted at the end of the file; with it the source waits for
    the file, for its header, and for the end of each row. A missing or unreadable file (when
    not following), or a ``types`` column that is not in the header, raises
    :class:`~pipelines.errors.ConnectorError`.
    """

    name = "csv"

    def __init__(
        self,
        path: PathLike,
        *,
        follow: bool = False,
        batch_size: int = 1000,
        delimiter: str = ",",
        types: Mapping[str, Callable[[str], Any]] | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(delimiter) != 1 or delimiter in '"\r\n':
            raise ValueError(
                f"delimiter must be one character other than a quote or newline, got {delimiter!r}"
            )
        self.path = Path(path)
        self.follow = follow
        self.batch_size = batch_size
        self.delimiter = delimiter
        self.types = dict(types or {})
        self.poll_interval = poll_interval

    def __repr__(self) -> str:
        return f"Csv({str(self.path)!r}, follow={self.follow})"

    async def _rows(self, offset: int, what: str) -> AsyncGenerator[_Rows, None]:
        """Runs of complete rows (a row's lines joined by ``\\n``) from byte ``offset`` on."""
        open_row: list[bytes] = []  # the lines of a row whose quoted field is still open
        start: int | None = None
        async with aclosing(
            _read_lines(
                self.path, offset, follow=self.follow, poll_interval=self.poll_interval, what=what
            )
        ) as runs:
            async for run in runs:
                if start is None:
                    start = run.start
                rows: list[bytes] = []
                for line in run.lines:
                    odd = line.count(b'"') & 1
                    if open_row:
                        open_row.append(line)
                        if odd:
                            rows.append(b"\n".join(open_row))
                            open_row = []
                    elif odd:
                        open_row = [line]
                    else:
                        rows.append(line)
                if open_row and run.idle and not self.follow:
                    rows.append(b"\n".join(open_row))  # a quote left open at the end: as it is
                    open_row = []
                end = run.end - sum(len(line) + 1 for line in open_row)
                yield _Rows(rows, start, end, run.idle)
                start = end

    async def _header(self, what: str) -> tuple[list[str], int] | None:
        """The header's column names and the offset after it; ``None`` for an empty file."""
        async with aclosing(self._rows(0, what)) as runs:
            async for run in runs:
                pos = run.start
                for row in run.rows:
                    pos += len(row) + 1
                    if row and row != b"\r":
                        return self._parse([row])[0], min(pos, run.end)
                if run.idle and not self.follow:
                    return None
        return None

    def _parse(self, rows: list[bytes]) -> list[list[str]]:
        text = b"\n".join(rows).decode("utf-8", errors="replace")
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter))

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of row dicts after byte offset ``position`` (see the class docstring)."""
        what = f"Csv source {str(self.path)!r}"
        offset = int_position(position, what, "a byte offset")
        found = await self._header(what)
        if found is None:
            return
        header, header_end = found
        unknown = [name for name in self.types if name not in header]
        if unknown:
            raise ConnectorError(
                f"{what}: types= names columns {unknown} that are not in the header "
                f"{header}; fix the names or the file"
            )
        size = self.batch_size
        pending: list[bytes] = []
        async with aclosing(self._rows(max(offset, header_end), what)) as runs:
            async for run in runs:
                pos = run.start
                for row in run.rows:
                    pos += len(row) + 1
                    if row and row != b"\r":
                        pending.append(row)
                        if len(pending) == size:
                            yield SourceBatch(self._dicts(header, pending), min(pos, run.end))
                            pending = []
                if pending and run.idle:
                    yield SourceBatch(self._dicts(header, pending), run.end)
                    pending = []

    def _dicts(self, header: list[str], rows: list[bytes]) -> list[dict[str, Any]]:
        width = len(header)
        out: list[dict[str, Any]] = []
        for cells in self._parse(rows):
            if not cells:
                continue
            if len(cells) == width:
                out.append(dict(zip(header, cells, strict=True)))
            elif len(cells) < width:
                row: dict[str, Any] = dict.fromkeys(header)
                row.update(zip(header, cells, strict=False))
                out.append(row)
            else:
                row = dict(zip(header, cells[:width], strict=True))
                row[_EXTRA] = cells[width:]
                out.append(row)
        if self.types:
            for row in out:
                for name, convert in self.types.items():
                    text = row.get(name)
                    if text is None:
                        continue
                    if text == "":
                        row[name] = None
                        continue
                    try:
                        row[name] = convert(text)
                    except Exception:  # keep the text: the workers' validation decides
                        continue
        return out


# -- writing -------------------------------------------------------------------------------


def _append_hint(error: OSError) -> str:
    """What to do about an append that failed with ``error``."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its filesystem"
    if error.errno == errno.EFBIG:
        return (
            "the file reached the largest size this process may write (ulimit -f) or the "
            "filesystem allows: raise the limit, or write to another file"
        )
    return "fix the cause"


class _AppendFile:
    """A file that the writers of one sink append to, in this process and in others.

    Every writer takes an exclusive ``flock`` on the file around each append, so an append
    knows the size of the file before it and, when it fails half-way (a full disk, a file size
    limit), cuts the file back to that size: the partial line goes, and no other writer's bytes
    can have followed it. On the happy path an append is still one ``write`` (more only if the
    kernel writes less than asked), between a ``flock``, an ``fstat`` and an unlock.
    """

    __slots__ = ("fd", "fsync", "path", "what")

    def __init__(self, path: Path, *, fsync: bool, what: str, readable: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self.what = what
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | (os.O_RDWR if readable else os.O_WRONLY)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, flags, 0o666)
        except OSError as error:
            raise ConnectorError(
                f"{what}: cannot open {str(path)!r} for appending: {error.strerror or error}; "
                "check that the directory is writable"
            ) from error

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive lock every writer of the file takes to append."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at the end of the file (then fsync if asked), or leave the
        file as it was and raise :class:`~pipelines.errors.ConnectorError`."""
        try:
            with self.locked():
                self.append_locked(data)
        except OSError as error:  # locking, or finding the size: nothing was written
            raise ConnectorError(
                f"{self.what}: cannot append to {str(self.path)!r}: "
                f"{error.strerror or error}; nothing was written, {_append_hint(error)}"
            ) from error

    def append_locked(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`append`, for a caller that holds :meth:`locked`."""
        fd = self.fd
        size = os.fstat(fd).st_size
        view = memoryview(data)
        count = len(view)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        except OSError as error:
            raise self._cut_back(size, count, error) from error

    def _cut_back(self, size: int, count: int, error: OSError) -> ConnectorError:
        """Truncate the file to ``size``, its length before a failed append of ``count``
        bytes; the error that says what happened."""
        failed = (
            f"{self.what}: appending {count:,} bytes to {str(self.path)!r} failed: "
            f"{error.strerror or error}"
        )
        try:
            os.ftruncate(self.fd, size)
        except OSError as cut:
            return ConnectorError(
                f"{failed}, and cutting the file back to its {size:,} bytes from before failed "
                f"too ({cut.strerror or cut}), so it may end in a partial line: remove "
                f"everything after its first {size:,} bytes, {_append_hint(error)}, and run the "
                "pipeline again (the records were not committed: that run writes them again)"
            )
        return ConnectorError(
            f"{failed}; the file was left as it was before ({size:,} bytes, no partial line). "
            f"{_append_hint(error).capitalize()} and run the pipeline again: the records were "
            "not committed, so that run writes them again"
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _BufferedWriter(SinkWriter):
    """Buffers bytes in ``write``; ``flush`` appends them with one ``write`` call."""

    def __init__(self, file: _AppendFile, what: str) -> None:
        self._file = file
        self._what = what
        self._buffer = bytearray()
        self._flushing = asyncio.Lock()  # flushes append in the order they were called

    async def flush(self) -> None:
        """Append the buffer to the file in one ``write`` (then fsync if asked); on failure
        the file is as it was and the buffer is kept, so a retry loses nothing."""
        async with self._flushing:
            if not self._buffer:
                return
            data, self._buffer = self._buffer, bytearray()
            try:
                await asyncio.to_thread(self._file.append, data)
            except Exception:  # not a cancellation: the thread may still be writing then
                self._buffer[:0] = data  # never dropped: a later flush must not commit past it
                raise

    async def close(self) -> None:
        """Flush, then close the file."""
        try:
            await self.flush()
        finally:
            self._file.close()


def _earlier_output(path: Path) -> str | None:
    """``path`` holds N bytes, or None when it is missing or empty (unreadable: the sink's
    own open says why)."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return f"{str(path)!r} holds {size:,} bytes" if size else None


class JsonLinesSink(Sink):
    """A sink that appends each value as one JSON line to ``path``.

    Values are serialised with orjson (pydantic models with their own serializer, as
    ``model_dump(mode="json")`` would). A value JSON cannot hold (``bytes``, a ``set``, an
    object) is not written: the sink step's error policy applies to its record (by default it
    goes to the dead-letter topic, and the rest of the batch is written). Each worker opens the
    file with ``O_APPEND`` (creating it and its parent directories); ``write`` serialises the
    batch into a memory buffer, and ``flush`` appends the whole buffer with a single ``write``
    call under an exclusive ``flock``, so lines from concurrent workers, in this or other
    processes, never interleave (on a local filesystem), and a flush that fails half-way (a
    full disk) is cut back: the file never keeps a partial line. ``fsync=True`` also fsyncs
    after each flush, for durability across a power loss rather than just a process crash.

    ``shape`` (:data:`Shape`) says what a line holds: by default the value alone when it is a
    dict or a model, or when the record has no key, and else ``{"key": ..., "value": ...,
    "timestamp": ...}``, so that a keyed count says what it counts; ``"value"`` always the
    value alone, ``"record"`` always the key and time with it.

    Append-only, at-least-once: records replayed after a crash (whose input offsets were not
    committed yet) are appended again, so the file may hold duplicates; consumers that need
    exactly-once should deduplicate on a field of the value. ``headwater reset`` removes the
    file, to run a pipeline again from the start.
    """

    name = "jsonlines"

    def __init__(self, path: PathLike, *, fsync: bool = False, shape: Shape = "auto") -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.shape = _check_shape(shape, f"JsonLinesSink {str(path)!r}")

    def __repr__(self) -> str:
        return f"JsonLinesSink({str(self.path)!r})"

    async def earlier_output(self, pipeline: str, step_id: str) -> str | None:
        """The file's size, if it has anything in it (see :meth:`Sink.earlier_output`)."""
        return _earlier_output(self.path)

    def output_files(self, pipeline: str, step_id: str) -> list[Path]:
        """The file (see :meth:`Sink.output_files`)."""
        return [self.path]

    def open(self, ctx: SinkContext) -> SinkWriter:
        """Open the file for appending, for one worker."""
        what = f"JsonLinesSink {str(self.path)!r}"
        file = _AppendFile(self.path, fsync=self.fsync, what=what)
        return _JsonLinesWriter(file, what, self.shape)


class _JsonLinesWriter(_BufferedWriter):
    def __init__(self, file: _AppendFile, what: str, shape: Shape) -> None:
        super().__init__(file, what)
        self._shape = shape

    def write(self, batch: Batch) -> None:
        dumps = orjson.dumps
        newline = orjson.OPT_APPEND_NEWLINE
        lines: list[bytes] = []
        append = lines.append
        try:
            for value in _shaped(batch, self._shape):
                if isinstance(value, BaseModel):
                    append(value.__pydantic_serializer__.to_json(value) + b"\n")
                else:
                    append(dumps(value, default=json_default, option=newline))
        except (TypeError, ValueError) as error:
            raise UnwritableValue(
                f"{self._what}: a value cannot be written as JSON ({error}); map the stream to "
                "dicts, lists, strings, numbers or pydantic models before this sink"
            ) from error
        self._buffer += b"".join(lines)


_PLAIN = (str, int, float)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, _PLAIN):
        return value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.__pydantic_serializer__.to_json(value).decode()
    return orjson.dumps(value, default=json_default).decode()


Shape: TypeAlias = Literal["auto", "value", "record"]
"""What a file sink writes of a record: its value alone (``"value"``), the value with the
record's key and event time (``"record"``: ``{"key": ..., "value": ..., "timestamp": ...}``,
the time in ISO 8601, UTC), or (``"auto"``) the value alone when it names its own fields (a
dict, a pydantic model, a dataclass such as a window's result) or the record has no key, else
the record: a keyed count written as
``1``, ``2`` would not say what it counts."""

_SHAPES = ("auto", "value", "record")


def _check_shape(shape: str, sink: str) -> Shape:
    if shape not in _SHAPES:
        raise ConnectorError(f"{sink}: shape must be one of {', '.join(_SHAPES)}, not {shape!r}")
    return shape  # type: ignore[return-value]


def _as_record(key: Any, value: Any, stamp: int) -> dict[str, Any]:
    when = datetime.fromtimestamp(stamp / 1000, tz=UTC).isoformat().replace("+00:00", "Z")
    return {"key": key, "value": value, "timestamp": when}


def _shaped(batch: Batch, shape: Shape, whole: tuple[type, ...] = (dict, BaseModel)) -> list[Any]:
    """The values to write for ``batch``'s records (see :data:`Shape`); ``whole``: the types
    of values that name their own fields (for ``"auto"``)."""
    values = batch.values
    if shape == "value":
        return values
    keys, stamps = batch.keys, batch.timestamps
    if shape == "record":
        return [_as_record(k, v, t) for k, v, t in zip(keys, values, stamps, strict=True)]
    if keys.count(None) == len(keys):
        return values
    return [
        v if k is None or isinstance(v, whole) or _is_dataclass(v) else _as_record(k, v, t)
        for k, v, t in zip(keys, values, stamps, strict=True)
    ]


def _is_dataclass(value: Any) -> bool:
    return hasattr(type(value), "__dataclass_fields__")


class CsvSink(Sink):
    """A sink that appends each value as one CSV row to ``path``.

    Values are dicts or pydantic models (dumped with ``model_dump(mode="json")``), written in
    the column order ``fields``; keys not in ``fields`` are left out and missing ones are
    empty. Lists and tuples are written as rows as they are. Nested dicts and lists are
    written as JSON text, dates and times in ISO 8601, ``None`` as an empty cell. Rows end in
    ``\\n``.

    The header row is written once, by whichever writer first finds the file empty: each
    writer, on its first batch, takes an exclusive ``flock`` on the file, writes the header if
    the file is empty and otherwise reads the header already there. When ``fields`` is
    ``None`` the columns come from that header, or from the keys of the first value when the
    file is empty; when ``fields`` is given and the file's header differs,
    :class:`~pipelines.errors.ConnectorError` is raised.

    ``shape`` is as for :class:`JsonLinesSink`: by default a number or a string of a keyed
    record is written as the row ``key, value, timestamp``; ``"record"`` writes every record
    so (a dict or a model as JSON in the ``value`` column).

    A value that makes no row (a number, a string, a cell JSON cannot hold such as a ``set``)
    is not written: the sink step's error policy applies to its record, as in
    :class:`JsonLinesSink`. Like it too: ``O_APPEND``, parent directories created, ``write``
    buffers and ``flush`` appends with one ``write`` call under an exclusive ``flock`` (so rows
    from concurrent writers never interleave, and a failed flush leaves no partial row),
    ``fsync=True`` fsyncs after each flush. Append-only, at-least-once: records replayed after a
    crash are appended again.
    """

    name = "csv"

    def __init__(
        self,
        path: PathLike,
        fields: Sequence[str] | None = None,
        *,
        fsync: bool = False,
        shape: Shape = "auto",
    ) -> None:
        self.path = Path(path)
        self.fields = None if fields is None else list(fields)
        self.shape = _check_shape(shape, f"CsvSink {str(path)!r}")
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"CsvSink({str(self.path)!r}, fields={self.fields!r})"

    async def earlier_output(self, pipeline: str, step_id: str) -> str | None:
        """The file's size, if it has anything in it (see :meth:`Sink.earlier_output`)."""
        return _earlier_output(self.path)

    def output_files(self, pipeline: str, step_id: str) -> list[Path]:
        """The file (see :meth:`Sink.output_files`)."""
        return [self.path]

    def open(self, ctx: SinkContext) -> SinkWriter:
        """Open the file for appending, for one worker."""
        what = f"CsvSink {str(self.path)!r}"
        file = _AppendFile(self.path, fsync=self.fsync, what=what, readable=True)
        return _CsvWriter(file, what, self.fields, self.shape)


class _CsvWriter(_BufferedWriter):
    def __init__(
        self, file: _AppendFile, what: str, fields: list[str] | None, shape: Shape
    ) -> None:
        super().__init__(file, what)
        self._declared = fields
        self._fields: list[str] | None = None
        self._shape = shape

    def write(self, batch: Batch) -> None:
        values = _shaped(batch, self._shape, (dict, BaseModel, list, tuple))
        if not values:
            return
        fields = self._fields if self._fields is not None else self._header(values)
        try:
            text = _format_rows([self._row(fields, value) for value in values]).encode()
        except (TypeError, ValueError) as error:  # a cell JSON cannot hold, a bad model...
            raise UnwritableValue(
                f"{self._what}: a value cannot be written as a CSV row ({error}); map the "
                "stream to dicts of strings, numbers, dates or JSON values before this sink"
            ) from error
        self._buffer += text

    def _row(self, fields: list[str], item: Any) -> list[Any]:
        value = item.model_dump(mode="json") if isinstance(item, BaseModel) else item
        if isinstance(value, dict):
            return [_cell(value.get(name)) for name in fields]
        if isinstance(value, list | tuple):
            return [_cell(cell) for cell in value]
        raise UnwritableValue(
            f"{self._what}: cannot write a {type(value).__name__} as a CSV row; map the stream "
            "to dicts or pydantic models before this sink"
        )

    def _header(self, values: list[Any]) -> list[str]:
        """The columns, agreed with the file on the first batch that gives any."""
        try:
            fields = self._resolve_header(values)
        except OSError as error:
            raise ConnectorError(
                f"{self._what}: cannot write the header: {error.strerror or error}"
            ) from error
        if fields is None:
            raise UnwritableValue(
                f"{self._what}: cannot take column names from a {type(values[0]).__name__} "
                "value; map the stream to dicts or pydantic models before this sink, or pass "
                "fields=[...] to it"
            )
        self._fields = fields
        return fields

    def _resolve_header(self, values: list[Any]) -> list[str] | None:
        """Write the header if the file is empty, else read it; ``None`` if the file is empty,
        no ``fields`` were declared and no value of ``values`` has column names."""
        fd = self._file.fd
        with self._file.locked():
            if os.fstat(fd).st_size == 0:
                fields = self._declared if self._declared is not None else _first_fields(values)
                if fields is not None:
                    self._file.append_locked(_format_rows([fields]).encode())
                return fields
            existing = _read_header(fd)
        if self._declared is not None and existing != self._declared:
            raise ConnectorError(
                f"{self._what}: the file's header {existing} differs from the sink's fields "
                f"{self._declared}; write to another file, or remove this one"
            )
        return existing


def _first_fields(values: list[Any]) -> list[str] | None:
    """The column names of the first value that has some (a dict's keys, a model's fields)."""
    for value in values:
        try:
            fields = _fields_of(value)
        except (TypeError, ValueError):  # a model that does not dump: its row is refused
            continue
        if fields is not None:
            return fields
    return None


def _fields_of(value: Any) -> list[str] | None:
    if isinstance(value, BaseModel):
        return list(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return [str(name) for name in value]
    return None


def _format_rows(rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _read_header(fd: int) -> list[str]:
    data = b""
    while b"\n" not in data:
        more = os.pread(fd, 1 << 16, len(data))
        if not more:
            break
        data += more
    line = data.split(b"\n", 1)[0].removeprefix(_BOM).decode("utf-8", errors="replace")
    return next(csv.reader([line]), [])
