"""Parquet files: :class:`ParquetSink` writes a stream into a directory of Parquet files, and
:class:`ParquetSource` reads Parquet files (a directory of them, or a glob) into a pipeline.

**Columns.** A sink writes one row per record, from its value: a pydantic model (dumped in
Python mode) or a dict. The columns come from ``model`` (its fields' annotations), from an
explicit ``pyarrow.Schema``, or, given neither, from the first batch written (then fixed). A
value that does not fit them (a field missing that may not be null, a field the schema does not
have, a value of another type) is refused in ``write`` with a message naming the field, and the
sink step's error policy applies to its record (see :mod:`connectors.base`).

**No reader ever sees a partial file.** Parquet files are written whole under a hidden name in
the directory (starting with ``.``, which the pyarrow and pandas dataset readers skip) and
renamed into place atomically; on an object store each file is uploaded in one put.

**Durability on a local filesystem.** A Parquet file cannot be appended to, yet ``flush`` must
make every row it is given durable before the runtime commits the input offsets. So each writer
keeps a hidden *staging file* (``.staging-<...>.arrows``, in the Arrow IPC stream format) to
which every flush appends its rows and fsyncs; the writer holds an exclusive ``flock`` on it as
long as it lives. Once the staging file holds ``roll_rows`` rows or ``roll_bytes`` bytes (of
uncompressed Arrow data), or is ``roll_seconds`` old at a flush, and on ``close``, it becomes a
Parquet file (written under a temporary name, fsynced, renamed, the directory fsynced) and is
removed. Rows therefore become visible to readers of the directory when their staging file
rolls, not at each flush. A writer that starts looks for staging files no live writer holds
(the orphans of a crashed worker, whose rows were flushed and whose offsets may have been
committed) and turns them into Parquet files first; a message torn by a crash in the middle of
an append is left out (its flush never succeeded, so its offsets were never committed).

**Other filesystems** (fsspec URLs such as ``s3://bucket/out`` or ``memory://out``, or a
``filesystem`` object that is not local): no staging, each flush that has rows uploads one
complete Parquet file, so the files are as many and as small as the flushes; ``roll_*`` do not
apply there.

**At-least-once.** Records replayed after a crash (their offsets were not committed yet) are
written again, so the files may hold a row twice; consumers that need exactly-once should
deduplicate on a field of the value. Nothing else is added to a row, unless
``include_key=True`` (a ``key`` column with the record's key) or ``include_timestamp=True`` (a
``timestamp`` column with its event time, ``timestamp("ms", tz="UTC")``).

**Files.** A sink's files are named ``part-<pipeline>-<step>-<UTC time>-<worker>-<writer>-<seq>
.parquet``: unique (``writer`` is random per writer) and, for one step, sorted by the time they
were completed, so a :class:`ParquetSource` that reads the directory again later reads only the
new ones after those it has read. Staging files need ``flock`` and atomic ``rename``: a local
filesystem, not NFS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import posixpath
import re
import secrets
import threading
import time
import types
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, TypeAlias

import orjson
from pydantic import BaseModel
from pydantic.fields import FieldInfo

try:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem
except ImportError as missing:  # pragma: no cover - the [parquet] extra is not installed
    raise ImportError(
        "connectors.parquet needs pyarrow and fsspec: pip install 'headwater[parquet]'"
    ) from missing

from connectors.base import (
    Position,
    Sink,
    SinkContext,
    SinkWriter,
    Source,
    SourceBatch,
    UnwritableValue,
)
from pipelines.batch import Batch
from pipelines.errors import ConnectorError

__all__ = ["ParquetSink", "ParquetSource"]

_log = logging.getLogger(__name__)

PathLike: TypeAlias = str | os.PathLike[str]

_NONE = type(None)
_WRITER = r"\d+-[0-9a-f]{8}-\d{6}"  # worker, random writer id, sequence number
_PART = re.compile(rf"^part-(?P<prefix>.+)-\d{{8}}T\d{{12}}Z-(?P<writer>{_WRITER})\.parquet$")
_STAGING = re.compile(rf"^\.staging-(?P<prefix>.+)-(?P<writer>{_WRITER})\.arrows$")
_TEMPORARY = ".tmp-"
_STALE_TEMPORARY = 60.0
"""Seconds after which an unlocked temporary file is a crashed writer's leftover."""
_KEY = "key"
_TIMESTAMP = "timestamp"
_clock = time.monotonic
"""What a staging file's age is measured with (tests replace it)."""
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


# -- columns: what a value must look like ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    """A column of the files, and how a batch's cells are checked and converted into it.

    ``accepts`` are the Python types a cell may have (``None``: whatever pyarrow converts),
    ``refuses`` subclasses of them it may not (``bool`` is an ``int``, a ``datetime`` a
    ``date``: pyarrow would take them and lose what makes them one); ``encode`` turns the cells
    into what pyarrow converts (JSON text, a decimal's text).
    """

    name: str
    type: Any  # a pyarrow.DataType
    nullable: bool = True
    accepts: tuple[type, ...] | None = None
    refuses: tuple[type, ...] = ()
    encode: Callable[[list[Any]], list[Any]] | None = None

    def field(self) -> Any:
        return pa.field(self.name, self.type, nullable=self.nullable)

    def array(self, cells: list[Any], what: str, label: str) -> Any:
        """The cells as a pyarrow array, or :class:`UnwritableValue` naming ``label``."""
        kinds = set(map(type, cells))
        if _NONE in kinds:
            if not self.nullable:
                raise UnwritableValue(
                    f"{what}: {label} is missing or None, and column {self.name!r} may not be "
                    "null; give every value that field, or declare it optional in the model "
                    "(or nullable in the schema)"
                )
            kinds.discard(_NONE)
        accepts = self.accepts
        for kind in kinds:
            if (accepts is not None and not issubclass(kind, accepts)) or (
                self.refuses and issubclass(kind, self.refuses)
            ):
                cell = next(c for c in cells if type(c) is kind)
                raise UnwritableValue(
                    f"{what}: {label} is {kind.__name__} {cell!r:.60}, which does not fit "
                    f"column type {self.type}; map the stream so that it does (or change the "
                    "model or schema of the sink)"
                )
        try:
            if self.encode is not None:
                cells = self.encode(cells)
            return pa.array(cells, type=self.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as error:
            raise UnwritableValue(
                f"{what}: {label} cannot be written as {self.type}: {error}; map the stream so "
                "that it can (or change the model or schema of the sink)"
            ) from error


_RULES: list[tuple[Callable[[Any], bool], tuple[type, ...], tuple[type, ...]]] = [
    (pa.types.is_boolean, (bool,), ()),
    (pa.types.is_integer, (int,), (bool,)),
    (pa.types.is_floating, (int, float), (bool,)),
    (pa.types.is_string, (str,), ()),
    (pa.types.is_large_string, (str,), ()),
    (pa.types.is_timestamp, (datetime,), ()),
    (pa.types.is_date, (date,), (datetime,)),
    (pa.types.is_decimal, (int, Decimal), (bool,)),
    (pa.types.is_binary, (bytes,), ()),
    (pa.types.is_large_binary, (bytes,), ()),
]
"""The Python types a column of an Arrow type accepts, and the subclasses of them it refuses;
other types (nested ones...) take what pyarrow's conversion takes."""


def _rules(arrow_type: Any) -> tuple[tuple[type, ...] | None, tuple[type, ...]]:
    for test, accepts, refuses in _RULES:
        if test(arrow_type):
            return accepts, refuses
    return None, ()


def _plain(name: str, arrow_type: Any, nullable: bool = True) -> _Column:
    accepts, refuses = _rules(arrow_type)
    return _Column(name, arrow_type, nullable, accepts, refuses)


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_cells(cells: list[Any]) -> list[Any]:
    dumps = orjson.dumps
    return [
        None if cell is None else dumps(cell, default=_json_default, option=_JSON_OPTIONS).decode()
        for cell in cells
    ]


def _decimal_cells(cells: list[Any]) -> list[Any]:
    return [cell if cell is None or isinstance(cell, str) else str(cell) for cell in cells]


def _json_column(name: str, nullable: bool = True) -> _Column:
    """A string column holding each value as JSON text (nested models, lists, dicts...)."""
    return _Column(name, pa.string(), nullable, encode=_json_cells)


def _decimal_text_column(name: str, nullable: bool = True) -> _Column:
    """A string column holding decimals as text (exact, whatever their precision)."""
    return _Column(name, pa.string(), nullable, (Decimal, int, str), (bool,), _decimal_cells)


_TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
_SIMPLE: dict[Any, Any] = {
    bool: pa.bool_(),
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    datetime: _TIMESTAMP_TYPE,
    date: pa.date32(),
}


def _unwrap(annotation: Any) -> tuple[Any, bool, list[Any]]:
    """``annotation`` without ``Optional`` and ``Annotated``; whether it admits None; the
    ``Annotated`` metadata found on the way."""
    nullable = False
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *more = typing.get_args(annotation)
            metadata += more
        elif origin in (typing.Union, types.UnionType):
            args = typing.get_args(annotation)
            rest = [arg for arg in args if arg is not _NONE]
            nullable = nullable or len(rest) < len(args)
            if len(rest) != 1:
                return typing.Union[tuple(rest)], nullable, metadata  # noqa: UP007 (built)
            annotation = rest[0]
        else:
            return annotation, nullable, metadata


def _decimal_type(metadata: Sequence[Any]) -> Any | None:
    """``decimal128(max_digits, decimal_places)`` when the field constrains both (and they
    fit in 38 digits), else None."""
    digits: int | None = None
    places: int | None = None
    for item in metadata:
        if getattr(item, "max_digits", None) is not None:
            digits = item.max_digits
        if getattr(item, "decimal_places", None) is not None:
            places = item.decimal_places
    if digits is None or places is None or not 0 < digits <= 38 or not 0 <= places <= digits:
        return None
    return pa.decimal128(digits, places)


def _model_column(name: str, info: FieldInfo) -> _Column:
    """The column of a model field, from its annotation (see :class:`ParquetSink`)."""
    annotation, nullable, metadata = _unwrap(info.annotation)
    nullable = nullable or info.default is None or annotation is Any
    simple = next((arrow for kind, arrow in _SIMPLE.items() if annotation is kind), None)
    if simple is not None:
        return _plain(name, simple, nullable)
    if annotation is Decimal:
        decimal = _decimal_type([*metadata, *info.metadata])
        if decimal is None:
            return _decimal_text_column(name, nullable)
        return _plain(name, decimal, nullable)
    choices: tuple[Any, ...] = ()
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        choices = tuple(annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return _plain(name, pa.string(), nullable)
    if choices and all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
        return _plain(name, pa.int64(), nullable)
    return _json_column(name, nullable)


def _model_columns(model: type[BaseModel]) -> list[_Column]:
    return [_model_column(name, info) for name, info in model.model_fields.items()]


def _schema_columns(schema: Any) -> list[_Column]:
    return [_plain(f.name, f.type, f.nullable) for f in schema]


_INFERRED: list[tuple[type | tuple[type, ...], tuple[type, ...], Callable[[str], _Column]]] = [
    (str, (), lambda name: _plain(name, pa.string())),
    (bool, (), lambda name: _plain(name, pa.bool_())),
    (int, (bool,), lambda name: _plain(name, pa.int64())),
    ((int, float), (bool,), lambda name: _plain(name, pa.float64())),
    (datetime, (), lambda name: _plain(name, _TIMESTAMP_TYPE)),
    (date, (datetime,), lambda name: _plain(name, pa.date32())),
    (Decimal, (), _decimal_text_column),
    (bytes, (), lambda name: _plain(name, pa.binary())),
]
"""The column of a field whose first values all have one of these types (and none of the
subclasses refused); any other mix is JSON text."""


def _inferred_column(name: str, cells: list[Any]) -> _Column:
    """A column for ``cells``, the first batch's values of a field (nullable: a later value
    may lack it). A field that is None throughout is taken to be a string."""
    kinds = set(map(type, cells)) - {_NONE}
    if not kinds:
        return _plain(name, pa.string())
    for accepted, refused, column in _INFERRED:
        if all(issubclass(k, accepted) and not issubclass(k, refused) for k in kinds):
            return column(name)
    return _json_column(name)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Every column of the files: the value's fields, then the key and the event time."""

    fields: tuple[_Column, ...]
    key: _Column | None
    timestamp: bool
    schema: Any  # pyarrow.Schema
    names: frozenset[str]
    required: frozenset[str]

    @classmethod
    def of(cls, fields: Sequence[_Column], key: _Column | None, timestamp: bool) -> _Layout:
        columns = [*fields, *([key] if key is not None else [])]
        arrow_fields = [c.field() for c in columns]
        if timestamp:
            arrow_fields.append(pa.field(_TIMESTAMP, pa.timestamp("ms", tz="UTC"), False))
        return cls(
            tuple(fields),
            key,
            timestamp,
            pa.schema(arrow_fields),
            frozenset(c.name for c in fields),
            frozenset(c.name for c in fields if not c.nullable),
        )


def _check_names(rows: list[dict[Any, Any]], layout: _Layout, what: str) -> None:
    """Refuse a row with a field the layout does not have, or without one it requires."""
    names, required = layout.names, layout.required
    for row in rows:
        keys = row.keys()
        if keys == names:
            continue
        extra = keys - names
        if extra:
            name = sorted(map(str, extra))[0]
            raise UnwritableValue(
                f"{what}: field {name!r} of a value is not a column of the files (they have "
                f"{', '.join(c.name for c in layout.fields)}); drop it before this sink, or add "
                "it to the sink's model or schema"
            )
        missing = required - keys
        if missing:
            name = sorted(missing)[0]
            raise UnwritableValue(
                f"{what}: a value has no field {name!r}, and column {name!r} may not be null; "
                "give every value that field, or declare it optional in the model (or nullable "
                "in the schema)"
            )


# -- staging files -------------------------------------------------------------------------


@dataclass(slots=True)
class _Staging:
    """A live writer's staging file: open, locked, and what it holds."""

    path: Path
    fd: int
    prefix: str
    writer: str
    rows: int
    size: int
    opened: float  # _clock() when it was created
    converted: bool = False  # its Parquet file exists: only the removal is left
    broken: bool = False  # a failed append could not be cut back: append no more


_stamp_lock = threading.Lock()
_last_stamp = [""]


def _stamp() -> str:
    """The UTC time now, to the microsecond, as a file name sorts it; later than any earlier
    stamp of this process, even if the clock steps back."""
    with _stamp_lock:
        now = datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond:06d}Z"
        if stamp <= _last_stamp[0]:
            last = datetime.strptime(_last_stamp[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
            now = last + timedelta(microseconds=1)
            stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond:06d}Z"
        _last_stamp[0] = stamp
        return stamp


def _part_name(prefix: str, writer: str) -> str:
    return f"part-{prefix}-{_stamp()}-{writer}.parquet"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hint(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its filesystem"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the directory writable by the workers"
    return "fix the cause"


def _parquet_bytes(table: Any, compression: str | None) -> Any:
    """``table`` as the bytes of a Parquet file (a pyarrow Buffer)."""
    out = pa.BufferOutputStream()
    pq.write_table(table, out, compression=compression or "none")
    return out.getvalue()


def _write_part(directory: Path, name: str, table: Any, compression: str | None) -> None:
    """Write ``table`` as Parquet file ``name`` in ``directory``: under a hidden temporary
    name (locked, so no starting writer takes it for a leftover), fsynced, renamed into place,
    the directory fsynced. On failure nothing is left."""
    data = _parquet_bytes(table, compression)
    temporary = directory / f"{_TEMPORARY}{name}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    renamed = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, data)
        os.fsync(fd)
        os.rename(temporary, directory / name)
        renamed = True
    finally:
        os.close(fd)
        if not renamed:
            with contextlib.suppress(OSError):
                temporary.unlink()
    _fsync_directory(directory)


def _read_staging(path: Path, *, check: bool) -> tuple[Any, list[Any], int]:
    """The schema and the record batches of staging file ``path``, up to the first message
    that is incomplete or does not parse (a torn append: what follows it was never flushed),
    and how many bytes were left out from there on. ``check`` validates the batches' data in
    full (for the files crashed writers left)."""
    schema = None
    batches: list[Any] = []
    with pa.memory_map(str(path)) as source:  # batches keep the mapping alive after close
        end = 0
        while True:
            try:
                message = pa.ipc.read_message(source)
                if schema is None:
                    schema = pa.ipc.read_schema(message)
                else:
                    batch = pa.ipc.read_record_batch(message, schema)
                    if check:
                        batch.validate(full=True)
                    batches.append(batch)
            except (EOFError, StopIteration, OSError, pa.ArrowException):
                break
            end = source.tell()
        left_out: int = source.size() - end
    return schema, batches, left_out


def _convert(
    path: Path,
    prefix: str,
    writer: str,
    compression: str | None,
    *,
    check: bool,
    expected: int | None = None,
) -> tuple[int, int]:
    """Write the rows of staging file ``path`` as a Parquet file; how many there were, and
    how many bytes at the end of the file were left out. ``expected`` is how many rows a live
    writer put in it: reading fewer is an error, not a torn append to leave out."""
    schema, batches, left_out = _read_staging(path, check=check)
    rows: int = sum(batch.num_rows for batch in batches)
    if expected is not None and (rows != expected or left_out):
        raise ConnectorError(
            f"staging file {path.name!r} should hold {expected:,} rows, but {rows:,} could be "
            "read from it; it was changed by someone else"
        )
    if rows:
        table = pa.Table.from_batches(batches, schema=schema)
        _write_part(path.parent, _part_name(prefix, writer), table, compression)
    return rows, left_out


@contextlib.contextmanager
def _unheld(path: Path) -> Iterator[int | None]:
    """``path`` opened and exclusively locked, if no one else holds it and it is still there
    (not removed or replaced since it was listed); else None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None  # a live writer holds it
            return
        try:
            here, opened = os.stat(path), os.fstat(fd)
        except FileNotFoundError:
            yield None  # its writer finished with it between our open and our lock
            return
        same = (here.st_ino, here.st_dev) == (opened.st_ino, opened.st_dev)
        yield fd if same else None
    finally:
        os.close(fd)


def _owned(name: str) -> re.Match[str] | None:
    """The match of a name a sink's writer gives a file (a Parquet file, a staging file, or a
    temporary one of either), with its ``prefix`` (pipeline and step) and ``writer``."""
    bare = name.removeprefix(_TEMPORARY)
    if bare != name:
        return _PART.match(bare) or _STAGING.match("." + bare)
    return _PART.match(name) or _STAGING.match(name)


def _has_part(directory: Path, writer: str) -> bool:
    """Whether the Parquet file of a staging file already exists (its writer crashed between
    renaming it into place and removing the staging file)."""
    end = f"-{writer}.parquet"
    return any(name.startswith("part-") and name.endswith(end) for name in os.listdir(directory))


def _recover(directory: Path, compression: str | None) -> list[str]:
    """Turn the staging files no live writer holds into Parquet files, and remove temporary
    files crashed writers left; what was recovered, in words."""
    recovered: list[str] = []
    for name in sorted(os.listdir(directory)):
        path = directory / name
        match = _STAGING.match(name)
        if match is not None:
            with _unheld(path) as fd:
                if fd is None:
                    continue
                writer = match["writer"]
                what = f"{name}: its Parquet file existed already"
                if not _has_part(directory, writer):
                    rows, left_out = _convert(
                        path, match["prefix"], writer, compression, check=True
                    )
                    what = f"{name}: {rows:,} rows"
                    if left_out:
                        what += f", {left_out:,} bytes of an append a crash cut short left out"
                path.unlink()
                _fsync_directory(directory)
                _log.warning("a writer that did not finish left staging file %s", what)
                recovered.append(what)
        elif name.startswith(_TEMPORARY):
            _remove_stale(path)
    return recovered


def _remove_stale(path: Path) -> None:
    """Remove temporary file ``path`` if it is old and no one holds it."""
    try:
        if time.time() - path.stat().st_mtime < _STALE_TEMPORARY:
            return
    except FileNotFoundError:
        return
    with _unheld(path) as fd:
        if fd is not None:
            path.unlink(missing_ok=True)


# -- the sink ------------------------------------------------------------------------------


def _resolve(
    path: PathLike, filesystem: Any | None, storage_options: Mapping[str, Any] | None
) -> tuple[Any, str, Path | None]:
    """The fsspec filesystem, the path on it, and the local path when it is local."""
    if filesystem is None and (not isinstance(path, str) or "://" not in path):
        local = Path(path)
        return LocalFileSystem(), str(local), local
    if filesystem is None:
        filesystem, root = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    else:
        root = filesystem._strip_protocol(str(path))
    if isinstance(filesystem, LocalFileSystem):
        return filesystem, str(root), Path(root)
    return filesystem, str(root).rstrip("/"), None


class ParquetSink(Sink):
    """A sink that writes a stream into Parquet files in directory ``path``.

    ``path`` is a local directory (created if missing) or an fsspec URL (``s3://bucket/out``,
    ``memory://out``, ``file:///data/out``...); ``storage_options`` go to fsspec with the URL,
    or ``filesystem`` gives an fsspec filesystem to use. See the module docstring for how
    files are written, rolled and recovered, and for at-least-once.

    Each value becomes a row: a pydantic model (dumped in Python mode) or a dict. Columns:

    * from ``model``, a pydantic model class: ``int`` is ``int64``, ``float`` ``float64``,
      ``str`` ``string``, ``bool`` ``bool``, ``datetime`` ``timestamp("us", tz="UTC")`` (a
      naive datetime is taken as UTC), ``date`` ``date32``, ``Decimal`` ``decimal128`` when the
      field sets ``max_digits`` and ``decimal_places`` (else a string with its exact text),
      ``Literal`` choices and ``Enum`` classes of strings or ints a string or ``int64``;
      ``Optional`` fields (and those defaulting to None) are nullable, and anything else
      (nested models, lists, dicts, unions) is a string holding the value as JSON;
    * or from ``schema``, a ``pyarrow.Schema``, converted by pyarrow (nested types allowed);
    * or, given neither, from the first batch written (the first value's model class, if it
      is a model; else each field's values, all columns nullable), then fixed: pass ``model``
      or ``schema`` when the first values may not show every field and type.

    A value that does not fit (a field that is not a column, a missing or None field whose
    column may not be null, a value of another type: ``1.5`` for an ``int64``, ``True`` for a
    ``float64``) is refused in ``write``; the sink step's error policy applies to its record.

    ``include_key=True`` adds a column ``key`` with the record's key (its type taken from the
    first batch's keys, a string when they are all None), ``include_timestamp=True`` a column
    ``timestamp`` with its event time.
    ``roll_rows``, ``roll_bytes`` and ``roll_seconds`` say when a local writer's staging file
    becomes a Parquet file (a file holds the rows of whole flushes, so it may exceed
    ``roll_rows``); ``compression`` is the Parquet codec (``"zstd"``, ``"snappy"``, ``None``...).
    """

    name = "parquet"

    def __init__(
        self,
        path: PathLike,
        *,
        model: type[BaseModel] | None = None,
        schema: Any = None,
        include_key: bool = False,
        include_timestamp: bool = False,
        roll_rows: int = 1_000_000,
        roll_bytes: int = 128 << 20,
        roll_seconds: float = 300.0,
        compression: str | None = "zstd",
        filesystem: Any = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.model = model
        self.schema = schema
        self.include_key = include_key
        self.include_timestamp = include_timestamp
        self.roll_rows = roll_rows
        self.roll_bytes = roll_bytes
        self.roll_seconds = roll_seconds
        self.compression = compression
        self.filesystem, self.root, self.local_directory = _resolve(
            path, filesystem, storage_options
        )
        self._check()
        self.columns: list[_Column] | None = None
        """The value's columns, when ``model`` or ``schema`` gives them."""
        if model is not None:
            self.columns = _model_columns(model)
        elif schema is not None:
            self.columns = _schema_columns(schema)
        if self.columns is not None:
            self._check_names([c.name for c in self.columns])

    def _check(self) -> None:
        if self.model is not None and self.schema is not None:
            raise ValueError("give ParquetSink a model= or a schema=, not both")
        if self.model is not None and not (
            isinstance(self.model, type) and issubclass(self.model, BaseModel)
        ):
            raise ValueError(f"model= must be a pydantic model class, got {self.model!r}")
        if self.schema is not None and not isinstance(self.schema, pa.Schema):
            raise ValueError(f"schema= must be a pyarrow.Schema, got {type(self.schema).__name__}")
        for option in ("roll_rows", "roll_bytes"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive int, got {value!r}")
        if not self.roll_seconds > 0:
            raise ValueError(f"roll_seconds must be positive, got {self.roll_seconds!r}")
        if self.compression is not None and self.compression.lower() != "none":
            try:
                available = pa.Codec.is_available(self.compression)
            except ValueError:
                available = False
            if not available:
                raise ValueError(
                    f"compression {self.compression!r} is not a Parquet codec this pyarrow "
                    "has: use 'zstd', 'snappy', 'gzip', 'brotli', 'lz4' or None"
                )

    def _check_names(self, names: Sequence[str]) -> None:
        for flag, column in ((self.include_key, _KEY), (self.include_timestamp, _TIMESTAMP)):
            if flag and column in names:
                raise ConnectorError(
                    f"{self!r}: include_{column}=True adds a column {column!r}, but the values "
                    f"have a field {column!r} too; rename the field, or leave include_{column} "
                    "out"
                )
        if not names and not self.include_key and not self.include_timestamp:
            raise ValueError(f"{self!r}: the model or schema has no fields: no columns to write")

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.path)!r})"

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer for one worker; it prepares the directory in :meth:`SinkWriter.start`."""
        if self.local_directory is not None:
            return _LocalWriter(self, ctx, self.local_directory)
        return _RemoteWriter(self, ctx)

    def output_files(self, pipeline: str, step_id: str) -> list[Path]:
        """The files step ``step_id`` of ``pipeline`` wrote into a local directory (see
        :meth:`Sink.output_files`); those on an object store stay, as a reset says nothing of
        them: remove them there."""
        if self.local_directory is None:
            return []
        return [Path(path) for path in self.files_of(pipeline, step_id)]

    def files_of(self, pipeline: str, step_id: str) -> list[str]:
        """The paths (on :attr:`filesystem`) of the files step ``step_id`` of ``pipeline``
        wrote into the directory: its Parquet files, and the staging and temporary files of
        its writers."""
        prefix = f"{pipeline}-{step_id}"
        found = []
        for name in self._names():
            match = _owned(name)
            if match is not None and match["prefix"] == prefix:
                found.append(posixpath.join(self.root, name))
        return found

    def _names(self) -> list[str]:
        """The names in the directory (none when it is missing)."""
        if self.local_directory is not None:
            try:
                return sorted(os.listdir(self.local_directory))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            entries = self.filesystem.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(entry).rstrip("/")) for entry in entries)

    async def earlier_output(self, pipeline: str, step_id: str) -> str | None:
        """How many Parquet files (and staging files of writers that did not finish) step
        ``step_id`` of ``pipeline`` left in the directory, if any (see
        :meth:`Sink.earlier_output`). Files of other steps in the same directory do not count:
        they are not a copy of this step's output."""
        files = await asyncio.to_thread(self.files_of, pipeline, step_id)
        names = [posixpath.basename(path) for path in files]
        parts = sum(1 for name in names if _PART.match(name))
        staged = sum(1 for name in names if _STAGING.match(name))
        if not parts and not staged:
            return None
        held = f"directory {str(self.path)!r} holds {parts:,} Parquet files"
        if staged:
            held += (
                f" and {staged:,} staging files of writers that did not finish (their rows "
                "become Parquet files when a writer starts)"
            )
        return held


class _Writer(SinkWriter):
    """What both writers share: values into Arrow record batches, buffered until a flush."""

    def __init__(self, sink: ParquetSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._what = f"ParquetSink {str(sink.path)!r} (step {ctx.step_id!r})"
        self._prefix = f"{ctx.pipeline}-{ctx.step_id}"
        self._token = secrets.token_hex(4)
        self._seq = 0
        self._layout: _Layout | None = None
        self._pending: list[Any] = []  # record batches written, not flushed yet
        self._flushing = asyncio.Lock()  # flushes run one at a time, in the order called

    def _writer_id(self) -> str:
        return f"{self._ctx.worker}-{self._token}-{self._seq:06d}"

    def write(self, batch: Batch) -> None:
        """Convert ``batch`` to Arrow columns (checking every value) and buffer them; refuse
        all of it, with :class:`UnwritableValue`, when a value does not fit."""
        values = batch.values
        if not values:
            return
        rows = self._rows(values)
        layout = self._layout
        if layout is None:
            layout = self._first_layout(values, rows, batch.keys)
        _check_names(rows, layout, self._what)
        what = self._what
        arrays = [
            c.array([row.get(c.name) for row in rows], what, f"field {c.name!r}")
            for c in layout.fields
        ]
        if layout.key is not None:
            arrays.append(layout.key.array(list(batch.keys), what, "the record's key"))
        if layout.timestamp:
            arrays.append(pa.array(batch.timestamps, type=layout.schema.field(_TIMESTAMP).type))
        self._pending.append(pa.RecordBatch.from_arrays(arrays, schema=layout.schema))
        self._layout = layout  # fixed once a batch fits it

    def _rows(self, values: list[Any]) -> list[dict[Any, Any]]:
        rows: list[dict[Any, Any]] = []
        append = rows.append
        for value in values:
            if type(value) is dict:
                append(value)
            elif isinstance(value, BaseModel):
                try:
                    append(value.model_dump())
                except Exception as error:  # a serializer of the model's that raises
                    raise UnwritableValue(
                        f"{self._what}: a {type(value).__name__} value cannot be dumped: {error}"
                    ) from error
            elif isinstance(value, dict):
                append(dict(value))
            else:
                raise UnwritableValue(
                    f"{self._what}: a {type(value).__name__} value has no fields to make a row "
                    "of; map the stream to dicts or pydantic models before this sink"
                )
        return rows

    def _first_layout(
        self, values: list[Any], rows: list[dict[Any, Any]], keys: list[Any]
    ) -> _Layout:
        """The columns, from the sink's model or schema, or else from the first batch."""
        sink = self._sink
        fields = sink.columns
        if fields is None and isinstance(values[0], BaseModel):
            fields = _model_columns(type(values[0]))
        if fields is None:
            names = list(dict.fromkeys(name for row in rows for name in row))
            odd = [name for name in names if not isinstance(name, str)]
            if odd:
                raise UnwritableValue(
                    f"{self._what}: field name {odd[0]!r} is not a string; map the stream to "
                    "dicts with string keys before this sink"
                )
            fields = [_inferred_column(n, [row.get(n) for row in rows]) for n in names]
            if not fields and not sink.include_key and not sink.include_timestamp:
                raise UnwritableValue(
                    f"{self._what}: the values have no fields, so there are no columns to "
                    "write; map the stream to dicts with fields before this sink"
                )
        sink._check_names([c.name for c in fields])
        key = None
        if sink.include_key:
            key = _inferred_column(_KEY, keys)
        return _Layout.of(fields, key, sink.include_timestamp)

    def _take_pending(self) -> list[Any]:
        batches, self._pending = self._pending, []
        return batches

    def _table(self, batches: list[Any]) -> Any:
        assert self._layout is not None
        return pa.Table.from_batches(batches, schema=self._layout.schema).combine_chunks()


class _LocalWriter(_Writer):
    """A writer on a local filesystem: flushes append to its staging file, rolls turn the
    staging file into a Parquet file (see the module docstring)."""

    def __init__(self, sink: ParquetSink, ctx: SinkContext, directory: Path) -> None:
        super().__init__(sink, ctx)
        self._directory = directory
        self._staging: _Staging | None = None
        self.recovered: list[str] = []
        """The staging files of crashed writers :meth:`start` turned into Parquet files."""

    async def start(self) -> None:
        """Create the directory, then turn the staging files no live writer holds (a crashed
        writer's) into Parquet files."""
        self.recovered = await asyncio.to_thread(self._start)

    def _start(self) -> list[str]:
        directory = self._directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError as error:
            raise ConnectorError(
                f"{self._what}: {str(directory)!r} is a file; give the sink the path of a directory"
            ) from error
        except OSError as error:
            raise ConnectorError(
                f"{self._what}: cannot create directory {str(directory)!r}: "
                f"{error.strerror or error}; {_hint(error)}"
            ) from error
        try:
            return _recover(directory, self._sink.compression)
        except (OSError, pa.ArrowException) as error:
            raise ConnectorError(
                f"{self._what}: cannot turn the staging files crashed writers left in "
                f"{str(directory)!r} into Parquet files: {error}; {_error_hint(error)}, then start "
                "again (their rows stay in them until then)"
            ) from error

    async def flush(self) -> None:
        """Append the buffered rows to the staging file and fsync it (on failure the file is
        cut back to what it held and the rows stay buffered); then roll the staging file into
        a Parquet file if it is due."""
        async with self._flushing:
            if self._staging is not None and self._staging.converted:
                await asyncio.to_thread(self._roll)  # a roll that failed after its rename
            batches = self._take_pending()
            if batches:
                try:
                    await asyncio.to_thread(self._stage, batches)
                except Exception:  # not a cancellation: the thread may still be writing then
                    self._pending[:0] = batches  # never dropped: a later flush must not commit
                    raise
            staging = self._staging
            if staging is not None and self._due(staging):
                await asyncio.to_thread(self._roll)

    async def close(self) -> None:
        """Flush, turn the staging file into a Parquet file, and release it."""
        try:
            await self.flush()
            async with self._flushing:
                if self._staging is not None:
                    await asyncio.to_thread(self._roll)
        finally:
            staging, self._staging = self._staging, None
            if staging is not None:  # left for the next start to recover
                os.close(staging.fd)

    def _due(self, staging: _Staging) -> bool:
        sink = self._sink
        return (
            staging.rows >= sink.roll_rows
            or staging.size >= sink.roll_bytes
            or _clock() - staging.opened >= sink.roll_seconds
        )

    def _stage(self, batches: list[Any]) -> None:
        table = self._table(batches)
        data = b"".join([batch.serialize() for batch in table.to_batches()])
        staging = self._staging
        if staging is None:
            self._staging = self._create(table.schema.serialize().to_pybytes() + data, len(table))
        else:
            self._append(staging, data, len(table))

    def _create(self, data: bytes, rows: int) -> _Staging:
        """A new staging file holding ``data``: written and locked under a temporary name,
        fsynced, then renamed (so a starting writer never finds it unlocked or empty)."""
        directory = self._directory
        writer = self._writer_id()
        path = directory / f".staging-{self._prefix}-{writer}.arrows"
        temporary = directory / f"{_TEMPORARY}{path.name[1:]}"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        placed = temporary
        try:
            fd = os.open(temporary, flags, 0o666)
        except OSError as error:
            raise self._failed(f"creating staging file {path.name!r}", error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, data)
            os.fsync(fd)
            os.rename(temporary, path)
            placed = path
            _fsync_directory(directory)
        except OSError as error:
            os.close(fd)
            with contextlib.suppress(OSError):
                placed.unlink()
            raise self._failed(f"creating staging file {path.name!r}", error) from error
        return _Staging(path, fd, self._prefix, writer, rows, len(data), _clock())

    def _append(self, staging: _Staging, data: bytes, rows: int) -> None:
        name = staging.path.name
        if staging.broken:
            raise ConnectorError(
                f"{self._what}: staging file {name!r} ends in a failed append that could not "
                "be cut off, so this writer appends no more; restart the pipeline: the next "
                "start turns the rows before it into a Parquet file"
            )
        try:
            _write_all(staging.fd, data)
            os.fsync(staging.fd)
        except OSError as error:
            failed = (
                f"{self._what}: appending {rows:,} rows to staging file {name!r} failed: "
                f"{error.strerror or error}"
            )
            try:
                os.ftruncate(staging.fd, staging.size)
            except OSError as cut:
                staging.broken = True
                raise ConnectorError(
                    f"{failed}, and cutting it back failed too ({cut.strerror or cut}); "
                    f"{_hint(error)} and run the pipeline again: the next start leaves the torn "
                    "append out, and the records were not committed, so that run writes them "
                    "again"
                ) from error
            raise ConnectorError(
                f"{failed}; the file was left as it was. {_hint(error).capitalize()} and run "
                "the pipeline again: the records were not committed, so that run writes them "
                "again"
            ) from error
        staging.rows += rows
        staging.size += len(data)

    def _roll(self) -> None:
        """Turn the staging file into a Parquet file, remove it, and release it."""
        staging = self._staging
        assert staging is not None
        try:
            if not staging.converted:
                _convert(
                    staging.path,
                    staging.prefix,
                    staging.writer,
                    self._sink.compression,
                    check=False,
                    expected=staging.rows,
                )
                staging.converted = True
            staging.path.unlink()
            _fsync_directory(self._directory)
        except (OSError, pa.ArrowException, ConnectorError) as error:
            raise ConnectorError(
                f"{self._what}: turning staging file {staging.path.name!r} ({staging.rows:,} "
                f"rows) into a Parquet file failed: {error}; its rows are safe in it: "
                f"{_error_hint(error)}, and the next start of the pipeline writes them"
            ) from error
        os.close(staging.fd)
        self._staging = None
        self._seq += 1

    def _failed(self, doing: str, error: OSError) -> ConnectorError:
        return ConnectorError(
            f"{self._what}: {doing} in {str(self._directory)!r} failed: "
            f"{error.strerror or error}; nothing was written. {_hint(error).capitalize()} and "
            "run the pipeline again: the records were not committed, so that run writes them "
            "again"
        )


class _RemoteWriter(_Writer):
    """A writer on a filesystem that is not local (an object store): each flush that has rows
    uploads one complete Parquet file, in one put."""

    async def start(self) -> None:
        """Create the directory (a no-op on most object stores), or say why it cannot."""
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        sink = self._sink
        try:
            sink.filesystem.makedirs(sink.root, exist_ok=True)
        except Exception as error:  # each fsspec implementation raises its own errors
            raise ConnectorError(
                f"{self._what}: cannot create or reach {sink.root!r} on "
                f"{type(sink.filesystem).__name__}: {error}; check the URL, storage_options "
                "and credentials"
            ) from error

    async def flush(self) -> None:
        """Upload the buffered rows as one Parquet file; on failure none is left and the rows
        stay buffered."""
        async with self._flushing:
            batches = self._take_pending()
            if not batches:
                return
            try:
                await asyncio.to_thread(self._put, batches)
            except Exception:  # not a cancellation: the thread may still be uploading then
                self._pending[:0] = batches
                raise

    def _put(self, batches: list[Any]) -> None:
        sink = self._sink
        table = self._table(batches)
        name = _part_name(self._prefix, self._writer_id())
        self._seq += 1
        data = _parquet_bytes(table, sink.compression).to_pybytes()
        try:
            sink.filesystem.pipe_file(posixpath.join(sink.root, name), data)
        except Exception as error:  # each fsspec implementation raises its own errors
            raise ConnectorError(
                f"{self._what}: uploading {name!r} ({len(table):,} rows) failed: {error}; run "
                "the pipeline again once the store takes it: the records were not committed, "
                "so that run writes them again"
            ) from error


def _error_hint(error: Exception) -> str:
    return _hint(error) if isinstance(error, OSError) else "fix the cause"


# -- the source ----------------------------------------------------------------------------


_MAGIC = re.compile(r"[*?\[]")
_SCALE = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


@dataclass(slots=True)
class _File:
    """A Parquet file to read: its name in the position, its path on the filesystem."""

    name: str
    path: str


def _file_position(position: Position | None, what: str) -> tuple[str, int] | None:
    if position is None:
        return None
    if (
        isinstance(position, dict)
        and position.keys() == {"file", "row"}
        and isinstance(position["file"], str)
        and type(position["row"]) is int
        and position["row"] >= 0
    ):
        return position["file"], position["row"]
    raise ConnectorError(
        f"{what} resumes from {{'file': name, 'row': count}}, got position {position!r}; the "
        "stored position belongs to another kind of source: give this step another step_id "
        "or reset the pipeline's positions"
    )


class ParquetSource(Source):
    """A source that reads Parquet files: every ``*.parquet`` file of a directory, a single
    file, or the files a glob (``data/2024-*/*.parquet``) matches, in the order of their names.

    Files whose names start with ``.`` or ``_`` are skipped, as dataset readers skip them (a
    :class:`ParquetSink`'s staging and temporary files). Each file is read with pyarrow in
    record batches of at most ``batch_size`` rows, each one a :class:`SourceBatch` of dicts, one
    per row, as ``pyarrow`` gives them (``datetime``, ``date``...), except that decimals are
    their exact text (``"12.30"``: the JSON a topic holds cannot hold a ``Decimal``; a model's
    ``Decimal`` field reads it back). ``path_or_glob`` is local or an fsspec URL, with
    ``storage_options`` or a ``filesystem`` as for :class:`ParquetSink`.

    ``key``, if given, computes each record's key from its value (a key it raises on is None).
    ``timestamp_field`` names a timestamp column that gives each record's event time (a null
    one is the time of reading); without it, every record's is the time of reading.

    **Position**: ``{"file": name, "row": rows read}`` after each batch, ``name`` relative to
    the directory (or to the glob's fixed part). ``read(position)`` lists the files again and
    goes on in that file after that many rows, then with the files whose names sort after
    it: neither a row repeated nor one skipped, except the one batch a crash may replay
    (at-least-once). So files added later (a :class:`ParquetSink` names them by time) are read
    by a later run; a file added under a name that sorts before one already read is not.
    A stored position naming a file that is gone, or a row past its end (the file was replaced),
    raises :class:`~pipelines.errors.ConnectorError`. The source ends when every file is read.
    """

    name = "parquet"

    def __init__(
        self,
        path_or_glob: PathLike,
        *,
        batch_size: int = 10_000,
        key: Callable[[Any], Any] | None = None,
        timestamp_field: str | None = None,
        filesystem: Any = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.path = path_or_glob
        self.batch_size = batch_size
        self.key = key
        self.timestamp_field = timestamp_field
        self.filesystem, self._root, _ = _resolve(path_or_glob, filesystem, storage_options)
        self._what = f"ParquetSource {str(path_or_glob)!r}"

    def __repr__(self) -> str:
        return f"ParquetSource({str(self.path)!r})"

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of rows after ``position`` (see the class docstring)."""
        resume = _file_position(position, self._what)
        files = await asyncio.to_thread(self._list)
        start, skip = 0, 0
        if resume is not None:
            name, skip = resume
            names = [file.name for file in files]
            if name not in names:
                raise ConnectorError(
                    f"{self._what}: the stored position is row {skip:,} of file {name!r}, which "
                    "is not there any more; put it back to resume after it, or reset the "
                    "pipeline's positions (headwater reset) to read every file from the start"
                )
            start = names.index(name)
        for index in range(start, len(files)):
            async for batch in self._read_file(files[index], skip if index == start else 0):
                yield batch

    def _list(self) -> list[_File]:
        """The files to read, sorted by name."""
        fs = self.filesystem
        root = str(fs._strip_protocol(self._root))
        if _MAGIC.search(root):
            parts = root.split("/")
            fixed = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
            base = "/".join(parts[:fixed]) or "/"
            found = fs.glob(root, detail=True)
            paths = [str(p) for p, info in found.items() if info.get("type") == "file"]
        else:
            try:
                info = fs.info(root)
            except FileNotFoundError as error:
                raise ConnectorError(
                    f"{self._what}: no such directory or file; fix the path (or the glob)"
                ) from error
            if info.get("type") == "directory":
                base = root
                paths = [
                    str(entry["name"])
                    for entry in fs.ls(root, detail=True)
                    if entry.get("type") == "file" and str(entry["name"]).endswith(".parquet")
                ]
            else:
                base, paths = posixpath.dirname(root), [root]
        files = [
            _File(posixpath.relpath(path, base), path)
            for path in paths
            if not posixpath.basename(path).startswith((".", "_"))
        ]
        return sorted(files, key=lambda file: file.name)

    async def _read_file(self, file: _File, skip: int) -> AsyncIterator[SourceBatch]:
        """The batches of ``file`` after its first ``skip`` rows."""
        handle, parquet = await asyncio.to_thread(self._open, file)
        try:
            rows = parquet.metadata.num_rows
            if skip > rows:
                raise ConnectorError(
                    f"{self._what}: the stored position is row {skip:,} of file {file.name!r}, "
                    f"but it has {rows:,} rows: it was replaced since; restore it, or reset the "
                    "pipeline's positions (headwater reset) to read every file from the start"
                )
            if skip == rows:
                return
            convert = self._converter(file, parquet.schema_arrow)
            # start at the row group that holds row ``skip``, and drop the rows before it
            group, before = 0, 0
            metadata = parquet.metadata
            while before + metadata.row_group(group).num_rows <= skip:
                before += metadata.row_group(group).num_rows
                group += 1
            batches = parquet.iter_batches(
                batch_size=self.batch_size, row_groups=range(group, metadata.num_row_groups)
            )
            drop, done = skip - before, skip
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    return
                if drop:
                    if drop >= batch.num_rows:
                        drop -= batch.num_rows
                        continue
                    batch, drop = batch.slice(drop), 0
                done += batch.num_rows
                values, stamps = convert(batch)
                keys = None if self.key is None else _keys(values, self.key)
                yield SourceBatch(values, {"file": file.name, "row": done}, keys, stamps)
        finally:
            await asyncio.to_thread(handle.close)

    def _open(self, file: _File) -> tuple[Any, Any]:
        try:
            handle = self.filesystem.open(file.path, "rb")
        except FileNotFoundError as error:
            raise ConnectorError(
                f"{self._what}: file {file.name!r} was removed while the source read the "
                "directory; run the pipeline again"
            ) from error
        try:
            return handle, pq.ParquetFile(handle)
        except (OSError, pa.ArrowException) as error:
            handle.close()
            raise ConnectorError(
                f"{self._what}: file {file.name!r} is not a Parquet file pyarrow can read "
                f"({error}); move it out of the directory, or narrow the path to a glob that "
                "leaves it out"
            ) from error

    def _converter(
        self, file: _File, schema: Any
    ) -> Callable[[Any], tuple[list[Any], list[int] | None]]:
        """How a record batch of ``file`` becomes values and event times."""
        decimals = [f.name for f in schema if pa.types.is_decimal(f.type)]
        stamp_at = -1
        scale = (1, 1)
        if self.timestamp_field is not None:
            stamp_at = schema.get_field_index(self.timestamp_field)
            if stamp_at < 0 or not pa.types.is_timestamp(schema.field(stamp_at).type):
                kind = "no such column" if stamp_at < 0 else f"it is {schema.field(stamp_at).type}"
                raise ConnectorError(
                    f"{self._what}: timestamp_field={self.timestamp_field!r} must name a "
                    f"timestamp column of file {file.name!r} ({kind}); name one, or leave "
                    "timestamp_field out to stamp records with the time of reading"
                )
            scale = _SCALE[schema.field(stamp_at).type.unit]

        def convert(batch: Any) -> tuple[list[Any], list[int] | None]:
            values: list[dict[str, Any]] = batch.to_pylist()
            for name in decimals:
                for value in values:
                    if value[name] is not None:
                        value[name] = str(value[name])
            if stamp_at < 0:
                return values, None
            times = batch.column(stamp_at).cast(pa.int64()).to_pylist()
            now = int(time.time() * 1000)
            multiply, divide = scale
            stamps = [now if t is None else t * multiply // divide for t in times]
            return values, stamps

        return convert


def _keys(values: list[Any], key: Callable[[Any], Any]) -> list[Any]:
    keys: list[Any] = []
    for value in values:
        try:
            keys.append(key(value))
        except Exception:  # a key function that does not fit this value
            keys.append(None)
    return keys
