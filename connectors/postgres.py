"""PostgreSQL: a sink of batched upserts (or appends) into a table, exactly-once end to end,
and a source that polls a table for rows past the last value of an increasing column.

Each worker's writer holds one connection (asyncpg). ``write`` turns the batch into rows and
checks each value against its column's type, so a value the table cannot hold is refused there
(:class:`~connectors.base.UnwritableValue`: the sink step's error policy dead-letters it) and
never fails a flush. ``flush`` writes everything buffered in one transaction, one
``INSERT ... SELECT FROM unnest(...)`` statement with an array per column: rows with the same
``key`` in one flush keep the last, and ``ON CONFLICT (key) DO UPDATE`` replaces older ones.

**Exactly-once.** The same transaction stores, per input partition of the task the rows came
from, the offset after the last record it wrote (table ``headwater_sink_offsets``, one row per
pipeline, step, topic and partition), and first reads, locking them, the offsets an earlier
flush stored: rows of records below them are already in the table and are dropped. The runtime
flushes sinks before it commits the input offsets, so after a crash the partition's next owner
replays at most what the table already has, and writes none of it twice, also from a zombie
worker that flushes after the partition moved on. Rows a step emits because time passed (a
window closing) come from no input record; they are written again after a crash unless the
table has a ``key`` (upserts then replace them with the same row). So: a table of windowed
results has its window in its key.

A connection that drops or a server that restarts is retried with backoff, the transaction
as a whole, up to ``retry_for`` seconds; wrong credentials, a missing table or column, a
``key`` without a unique index are errors at start, with what to do.
"""

from __future__ import annotations

import asyncio
import operator
import os
import types
import typing
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from pydantic import BaseModel

from connectors._backoff import Backoff
from connectors._urls import redacted
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
from pipelines.record import to_millis

__all__ = ["OFFSETS_TABLE", "PostgresSink", "PostgresSource", "Reader"]

OFFSETS_TABLE = "headwater_sink_offsets"
"""Where exactly-once sinks keep the input offsets their rows came from."""

URL_VARIABLE = "HEADWATER_POSTGRES_URL"

_OFFSETS_DDL = f"""
CREATE TABLE IF NOT EXISTS {OFFSETS_TABLE} (
    pipeline text NOT NULL,
    step text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (pipeline, step, topic, partition)
)"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, a.attnotnull
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum"""

_UNIQUE_KEYS = """
SELECT array_agg(a.attname ORDER BY a.attname)
FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL
GROUP BY i.indexrelid"""

_TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection the server ended while it was idle
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)

# the Python values a column of each type takes (types not listed are passed to the driver)
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "int2": (int,),
    "int4": (int,),
    "int8": (int,),
    "float4": (int, float),
    "float8": (int, float),
    "numeric": (int, float, Decimal),
    "text": (str,),
    "varchar": (str,),
    "bpchar": (str,),
    "bool": (bool,),
    "timestamptz": (datetime,),
    "timestamp": (datetime,),
    "date": (date,),
    "uuid": (UUID, str),
    "bytea": (bytes,),
}
_JSON = ("json", "jsonb")
_EXACT = frozenset({int, float, str, bool, bytes, Decimal, UUID, datetime, date})

# the column types a table created from a model gets, by annotation
_DDL_TYPES: dict[type, str] = {
    bool: "boolean",
    int: "bigint",
    float: "double precision",
    Decimal: "numeric",
    str: "text",
    datetime: "timestamp with time zone",
    date: "date",
    UUID: "uuid",
    bytes: "bytea",
}


def quote(name: str) -> str:
    """``name`` as an SQL identifier; a dotted name is a schema and a table."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


@dataclass(frozen=True, slots=True)
class Column:
    """A column of the target table, as the catalog describes it."""

    name: str
    sql_type: str  # as format_type gives it: "bigint", "character varying(20)"...
    type_name: str  # pg_type.typname: "int8", "varchar"...
    not_null: bool

    @property
    def checked(self) -> bool:
        """Whether a value may be refused: the column is NOT NULL, or of a type checked."""
        return self.not_null or self.type_name in _ACCEPTS

    def passing(self) -> frozenset[type]:
        """Types whose values this column takes without a closer look (no subclasses)."""
        accepts = _ACCEPTS.get(self.type_name, ())
        fast = {t for t in accepts if t in _EXACT}
        if not self.not_null:
            fast.add(type(None))
        return frozenset(fast)

    def refusal(self, value: Any) -> str | None:
        """Why ``value`` cannot go into this column, or None when it can."""
        if value is None:
            return "it is null and the column is NOT NULL" if self.not_null else None
        accepts = _ACCEPTS.get(self.type_name)
        if accepts is None or (
            isinstance(value, accepts) and not (isinstance(value, bool) and bool not in accepts)
        ):
            return None
        return f"{type(value).__name__} {value!r:.60} is not a {self.sql_type}"


def _ddl_type(annotation: Any) -> tuple[str, bool]:
    """The column type for a model field's annotation, and whether it may be null."""
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else dict
    for python_type, sql_type in _DDL_TYPES.items():
        if annotation is python_type:
            return sql_type, nullable
    return "jsonb", nullable


@dataclass(slots=True)
class _Pending:
    """Rows buffered for the next flush, with the input partition and offset of each."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    # (topic, partition) -> [(offset, row index)...] of rows that came from an input record
    origins: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    # (topic, partition) -> offset after the last input record written
    ends: dict[tuple[str, int], int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.rows or self.ends)


class PostgresSink(Sink):
    """Rows into the PostgreSQL table ``table``: upserted on ``key`` (its columns), or
    appended when ``key`` is empty; exactly-once unless ``exactly_once=False`` (see the module
    docstring for how).

    A record becomes one row. Its value gives the columns: a pydantic model its fields, a
    dict its items; ``value_column`` names the column a value that is neither (a count, say)
    goes into. ``key_column`` writes the record's key and ``timestamp_column`` its event time
    (a ``datetime`` in UTC). Columns the value does not name are null; a field the table has
    no column for, or a value its column's type cannot hold, is refused (the step's error
    policy applies to the record).

    ``url`` is a ``postgresql://user:password@host:port/database`` URL (by default the
    ``HEADWATER_POSTGRES_URL`` environment variable). ``create=True`` creates the table when it
    does not exist, from ``model``'s fields (plus ``columns``: extra or overriding column
    types, which the key, value and timestamp columns need when the model has no such field),
    with ``key`` as its primary key.
    """

    name = "postgres"

    def __init__(
        self,
        table: str,
        *,
        url: str | None = None,
        key: Sequence[str] = (),
        key_column: str | None = None,
        value_column: str | None = None,
        timestamp_column: str | None = None,
        model: type[BaseModel] | None = None,
        columns: Mapping[str, str] | None = None,
        create: bool = False,
        exactly_once: bool = True,
        retry_for: float = 30.0,
    ) -> None:
        self.table = table
        self.url = url
        self.key = tuple(key)
        self.key_column = key_column
        self.value_column = value_column
        self.timestamp_column = timestamp_column
        self.model = model
        self.columns = dict(columns or {})
        self.create = create
        self.exactly_once = exactly_once
        self.retry_for = retry_for
        if create:
            self._check_creatable()

    def __repr__(self) -> str:
        return f"PostgresSink({self.table!r})"

    def _check_creatable(self) -> None:
        if self.model is None and not self.columns:
            raise ConnectorError(
                f"PostgresSink {self.table!r}: create=True needs model= (or columns=) to know "
                "the table's columns"
            )
        fields = set(self.model.model_fields) if self.model is not None else set()
        named = [self.key_column, self.value_column, self.timestamp_column, *self.key]
        missing = [c for c in named if c is not None and c not in fields | self.columns.keys()]
        missing = [c for c in missing if c != self.timestamp_column]
        if missing:
            raise ConnectorError(
                f"PostgresSink {self.table!r}: create=True cannot tell the type of column "
                f"{missing[0]!r}: give it in columns=, e.g. columns={{{missing[0]!r}: 'text'}}"
            )

    def create_table_sql(self) -> str:
        """The ``CREATE TABLE IF NOT EXISTS`` statement ``create=True`` runs."""
        definitions: dict[str, str] = {}
        if self.model is not None:
            for name, info in self.model.model_fields.items():
                sql_type, nullable = _ddl_type(info.annotation)
                definitions[name] = sql_type + ("" if nullable else " NOT NULL")
        if self.timestamp_column is not None:
            definitions.setdefault(self.timestamp_column, "timestamp with time zone NOT NULL")
        definitions.update(self.columns)
        lines = [f"{quote(name)} {sql_type}" for name, sql_type in definitions.items()]
        if self.key:
            lines.append(f"PRIMARY KEY ({', '.join(map(quote, self.key))})")
        return f"CREATE TABLE IF NOT EXISTS {quote(self.table)} ({', '.join(lines)})"

    def resolved_url(self) -> str:
        """The URL to connect to: ``url``, else the environment's."""
        url = self.url or os.environ.get(URL_VARIABLE)
        if not url:
            raise ConnectorError(
                f"PostgresSink {self.table!r} has no database to write to: pass url= or set "
                f"{URL_VARIABLE}=postgresql://user:password@host:port/database"
            )
        return url

    async def connect(self) -> asyncpg.Connection:
        """A connection, retrying a server that is not up yet for ``retry_for`` seconds."""
        url = self.resolved_url()
        what = f"PostgresSink {self.table!r} at {redacted(url)}"
        try:
            connection: asyncpg.Connection = await _retrying(
                lambda: asyncpg.connect(url, timeout=10), what, self.retry_for
            )
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
            raise ConnectorError(
                f"{what}: the server refused the user name or password in the URL"
            ) from None
        except asyncpg.InvalidCatalogNameError as error:
            raise ConnectorError(f"{what}: {error}; create the database first") from None
        return connection

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer for one worker; it connects in :meth:`SinkWriter.start`."""
        return _PostgresWriter(self, ctx)

    async def earlier_output(self, pipeline: str, step_id: str) -> str | None:
        """Offsets stored by an earlier run of this step (a run starting afresh would drop
        every row below them), or rows in an append-only table."""
        connection = await self.connect()
        try:
            held = []
            if await self._stored_offsets(connection, pipeline, step_id):
                held.append(f"input offsets of an earlier run in {OFFSETS_TABLE}")
            if not self.key and await _table_has_rows(connection, self.table):
                held.append(
                    f"rows in table {self.table!r}, which it appends to (a reset keeps them: "
                    f"empty the table yourself, TRUNCATE {self.table})"
                )
            return " and ".join(held) or None
        finally:
            await connection.close()

    async def remembered(self, pipeline: str, step_id: str) -> str | None:
        """The input offsets this step stored, in words, if it stored any."""
        connection = await self.connect()
        try:
            count = await self._stored_offsets(connection, pipeline, step_id)
        finally:
            await connection.close()
        return f"{count} input offsets in table {OFFSETS_TABLE}" if count else None

    async def forget(self, pipeline: str, step_id: str) -> None:
        """Remove the input offsets this step stored (its rows stay in the table)."""
        connection = await self.connect()
        try:
            if await connection.fetchval("SELECT to_regclass($1)", OFFSETS_TABLE) is not None:
                await connection.execute(
                    f"DELETE FROM {OFFSETS_TABLE} WHERE pipeline = $1 AND step = $2",
                    pipeline,
                    step_id,
                )
        finally:
            await connection.close()

    async def _stored_offsets(
        self, connection: asyncpg.Connection, pipeline: str, step_id: str
    ) -> int:
        if not self.exactly_once:
            return 0
        if await connection.fetchval("SELECT to_regclass($1)", OFFSETS_TABLE) is None:
            return 0
        count: int = await connection.fetchval(
            f"SELECT count(*) FROM {OFFSETS_TABLE} WHERE pipeline = $1 AND step = $2",
            pipeline,
            step_id,
        )
        return count


async def _table_has_rows(connection: asyncpg.Connection, table: str) -> bool:
    if await connection.fetchval("SELECT to_regclass($1)", quote(table)) is None:
        return False
    return bool(await connection.fetchval(f"SELECT EXISTS (SELECT 1 FROM {quote(table)})"))


async def _retrying(attempt: Any, what: str, retry_for: float) -> Any:
    """``await attempt()``, again after a :class:`~connectors._backoff.Backoff` wait while it
    fails on a transient error (a refused or dropped connection, a server starting or shutting
    down), for up to ``retry_for`` seconds; then :class:`ConnectorError`."""
    backoff = Backoff(retry_for)
    while True:
        try:
            return await attempt()
        except _TRANSIENT as error:
            if not await backoff.wait():
                raise ConnectorError(
                    f"{what}: {type(error).__name__}: {error or 'no answer'} (retried for "
                    f"{retry_for:g} s); is the server up and the URL right?"
                ) from error


class _PostgresWriter(SinkWriter):
    """One worker's connection to the table and the rows it has not flushed yet."""

    def __init__(self, sink: PostgresSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._what = f"PostgresSink {sink.table!r} (step {ctx.step_id!r})"
        self._connection: asyncpg.Connection | None = None
        self._columns: list[Column] = []
        self._index: dict[str, int] = {}
        self._json: list[int] = []
        self._checks: list[tuple[int, frozenset[type], Column]] = []
        self._insert = ""
        self._pending = _Pending()
        self._flushing = asyncio.Lock()

    async def start(self) -> None:
        """Connect, create the table if asked, and learn its columns."""
        sink = self._sink
        self._connection = connection = await sink.connect()
        if sink.create:
            await connection.execute(sink.create_table_sql())
        if sink.exactly_once:
            await connection.execute(_OFFSETS_DDL)
        rows = await connection.fetch(_COLUMNS, quote(sink.table))
        if not rows:
            raise ConnectorError(
                f"{self._what}: table {sink.table!r} does not exist in the database; create "
                "it, or pass create=True with model= to let the sink create it"
            )
        self._columns = [Column(*row) for row in rows]
        self._index = {c.name: i for i, c in enumerate(self._columns)}
        self._json = [i for i, c in enumerate(self._columns) if c.type_name in _JSON]
        self._checks = [(i, c.passing(), c) for i, c in enumerate(self._columns) if c.checked]
        await self._check_named_columns(connection)
        self._insert = self._insert_sql()

    async def _check_named_columns(self, connection: asyncpg.Connection) -> None:
        sink = self._sink
        named = [sink.key_column, sink.value_column, sink.timestamp_column, *sink.key]
        for name in named:
            if name is not None and name not in self._index:
                raise ConnectorError(
                    f"{self._what}: table {sink.table!r} has no column {name!r} (it has "
                    f"{', '.join(self._index)})"
                )
        if sink.key:
            indexes = await connection.fetch(_UNIQUE_KEYS, quote(sink.table))
            unique = [set(row[0]) for row in indexes]
            if set(sink.key) not in unique:
                raise ConnectorError(
                    f"{self._what}: key={list(sink.key)} needs a primary key or unique index "
                    f"on exactly those columns of {sink.table!r} for upserts; add one (ALTER "
                    f"TABLE {sink.table} ADD PRIMARY KEY ({', '.join(sink.key)})) or pass no "
                    "key= to append"
                )

    def _insert_sql(self) -> str:
        sink = self._sink
        names = [quote(c.name) for c in self._columns]
        arrays = ", ".join(f"${i + 1}::{c.sql_type}[]" for i, c in enumerate(self._columns))
        sql = f"INSERT INTO {quote(sink.table)} ({', '.join(names)}) SELECT * FROM unnest({arrays})"
        if sink.key:
            others = [quote(c.name) for c in self._columns if c.name not in sink.key]
            target = ", ".join(map(quote, sink.key))
            if others:
                updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in others)
                sql += f" ON CONFLICT ({target}) DO UPDATE SET {updates}"
            else:
                sql += f" ON CONFLICT ({target}) DO NOTHING"
        return sql

    # -- write: rows out of records, checked ---------------------------------------------

    def write(self, batch: Batch) -> None:
        rows = [self._row(batch, i) for i in range(len(batch))]
        pending = self._pending
        start = len(pending.rows)
        pending.rows += rows
        fetched = batch.fetched
        if fetched.offsets:
            tp = (fetched.topic, fetched.partition)
            origins = pending.origins.setdefault(tp, [])
            for i in range(len(rows)):
                offset = batch.offset_at(i)
                if offset >= 0:
                    origins.append((offset, start + i))
            pending.ends[tp] = max(pending.ends.get(tp, 0), fetched.next_offset)

    def _row(self, batch: Batch, i: int) -> tuple[Any, ...]:
        sink, index = self._sink, self._index
        row: list[Any] = [None] * len(self._columns)
        value = batch.values[i]
        fields = value if type(value) is dict else self._fields(value)
        for name, cell in fields.items():
            at = index.get(name)
            if at is None:
                raise UnwritableValue(
                    f"{self._what}: the table has no column {name!r} for that field (it has "
                    f"{', '.join(index)}); add the column or drop the field before this sink"
                )
            row[at] = cell
        if sink.key_column is not None:
            row[index[sink.key_column]] = batch.keys[i]
        if sink.timestamp_column is not None:
            stamp = datetime.fromtimestamp(batch.timestamps[i] / 1000, tz=UTC)
            row[index[sink.timestamp_column]] = stamp
        for at, fast, column in self._checks:
            cell = row[at]
            if type(cell) not in fast and (why := column.refusal(cell)) is not None:
                raise UnwritableValue(f"{self._what}: column {column.name!r}: {why}")
        for at in self._json:
            if row[at] is not None:
                try:
                    row[at] = orjson.dumps(row[at]).decode()
                except TypeError as error:
                    raise UnwritableValue(
                        f"{self._what}: column {self._columns[at].name!r}: {error}"
                    ) from error
        return tuple(row)

    def _fields(self, value: Any) -> dict[str, Any]:
        """The columns ``value`` names, with their values."""
        if isinstance(value, BaseModel):
            return value.model_dump()
        if isinstance(value, dict):
            return value
        if self._sink.value_column is not None:
            return {self._sink.value_column: value}
        raise UnwritableValue(
            f"{self._what}: a {type(value).__name__} value has no columns; pass value_column= "
            "to write it into one, or map the stream to dicts or models"
        )

    # -- flush: one transaction --------------------------------------------------------------

    async def flush(self) -> None:
        """Write the buffered rows (and their input offsets) in one transaction, retried as a
        whole when the connection drops; on failure the buffer is kept."""
        async with self._flushing:
            if not self._pending:
                return
            pending = self._pending
            await _retrying(lambda: self._commit(pending), self._what, self._sink.retry_for)
            self._pending = _Pending()

    async def _commit(self, pending: _Pending) -> None:
        connection = self._connection
        if connection is None or connection.is_closed():
            self._connection = connection = await self._sink.connect()
        try:
            async with connection.transaction():
                rows = pending.rows
                if self._sink.exactly_once and pending.ends:
                    rows = await self._unwritten(connection, pending)
                if self._sink.key:
                    rows = self._last_per_key(rows)
                if rows:
                    await connection.execute(self._insert, *map(list, zip(*rows, strict=True)))
                if self._sink.exactly_once and pending.ends:
                    await self._store_offsets(connection, pending.ends)
        except _TRANSIENT:
            connection.terminate()  # the next attempt starts on a new connection
            self._connection = None
            raise
        except asyncpg.PostgresError as error:
            raise ConnectorError(
                f"{self._what}: the database refused a batch of {len(pending.rows):,} rows: "
                f"{type(error).__name__}: {error}"
            ) from error

    async def _unwritten(
        self, connection: asyncpg.Connection, pending: _Pending
    ) -> list[tuple[Any, ...]]:
        """The rows not written by an earlier flush (of this or another worker), with the
        offsets of their partitions locked until the transaction ends."""
        topics, partitions = zip(*pending.ends, strict=True)
        args = (self._ctx.pipeline, self._ctx.step_id, list(topics), list(partitions))
        await connection.execute(
            f"INSERT INTO {OFFSETS_TABLE} SELECT $1, $2, t, p, 0 FROM unnest($3::text[], "
            "$4::integer[]) AS u(t, p) ON CONFLICT DO NOTHING",
            *args,
        )
        stored = await connection.fetch(
            f"SELECT topic, partition, next_offset FROM {OFFSETS_TABLE} WHERE pipeline = $1 "
            "AND step = $2 AND (topic, partition) IN (SELECT * FROM unnest($3::text[], "
            "$4::integer[])) FOR UPDATE",
            *args,
        )
        below = {(row[0], row[1]): row[2] for row in stored}
        dropped: set[int] = set()
        for tp, origins in pending.origins.items():
            written = below.get(tp, 0)
            dropped.update(at for offset, at in origins if offset < written)
        if not dropped:
            return pending.rows
        return [row for at, row in enumerate(pending.rows) if at not in dropped]

    async def _store_offsets(
        self, connection: asyncpg.Connection, ends: dict[tuple[str, int], int]
    ) -> None:
        topics, partitions = zip(*ends, strict=True)
        await connection.execute(
            f"UPDATE {OFFSETS_TABLE} AS o SET next_offset = u.n FROM unnest($3::text[], "
            "$4::integer[], $5::bigint[]) AS u(t, p, n) WHERE o.pipeline = $1 AND o.step = $2 "
            "AND o.topic = u.t AND o.partition = u.p AND o.next_offset < u.n",
            self._ctx.pipeline,
            self._ctx.step_id,
            list(topics),
            list(partitions),
            list(ends.values()),
        )

    def _last_per_key(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        key_of = operator.itemgetter(*(self._index[name] for name in self._sink.key))
        last = {key_of(row): row for row in rows}
        return rows if len(last) == len(rows) else list(last.values())

    async def close(self) -> None:
        """Flush, then close the connection."""
        try:
            await self.flush()
        finally:
            if self._connection is not None:
                await self._connection.close()


# -- the source --------------------------------------------------------------------------------


class PostgresSource(Source):
    """The rows of ``table`` in the order of ``column``, read in batches of ``batch_size``;
    with ``follow=True`` it polls every ``poll_interval`` seconds for rows past the last one
    and never ends, else it ends at the last row there is.

    Each row becomes a dict value. ``key`` names the column that gives the record's key (as
    text), ``timestamp`` the ``timestamptz`` column that gives its event time (else the time of
    reading). ``where`` adds a condition (SQL, on the table's columns). ``url`` is as for
    :class:`PostgresSink`. Values keep their Python types (``datetime``, ``int``...), except
    ``numeric`` and ``uuid`` values, which become strings: exact, and JSON can hold them.

    **Position** is the value of ``column`` in the last row read (a number or a string): a
    restarted pipeline goes on after it. So ``column`` must grow with every row committed:
    an identity or serial column when one writer inserts, or a column the writers stamp in
    commit order. Rows committed later with a lower value (two transactions that took ids 5
    and 6, 6 committing first) are not read, and an updated row is not read again.
    """

    name = "postgres"

    def __init__(
        self,
        table: str,
        *,
        column: str = "id",
        url: str | None = None,
        key: str | None = None,
        timestamp: str | None = None,
        where: str | None = None,
        batch_size: int = 10_000,
        follow: bool = False,
        poll_interval: float = 1.0,
        retry_for: float = 30.0,
    ) -> None:
        self.table = table
        self.column = column
        self.key = key
        self.timestamp = timestamp
        self.where = where
        self.batch_size = batch_size
        self.follow = follow
        self.poll_interval = poll_interval
        self._connector = PostgresSink(table, url=url, retry_for=retry_for)

    def __repr__(self) -> str:
        return f"PostgresSource({self.table!r}, column={self.column!r})"

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of rows past ``position`` (the last ``column`` value read)."""
        reader = Reader(self._connector, f"PostgresSource {self.table!r}")
        try:
            sql_type = await self._check(await reader.connection())
            last = position
            while True:
                if last is None:
                    rows = await reader.fetch(self._query(None), self.batch_size)
                else:
                    query = self._query(sql_type)
                    rows = await reader.fetch(query, str(last), self.batch_size)
                if rows:
                    last = _position(rows[-1][self.column], self.column)
                    yield self._batch(rows, last)
                if len(rows) < self.batch_size:
                    if not self.follow:
                        return
                    await asyncio.sleep(self.poll_interval)
        finally:
            await reader.close()

    def _query(self, sql_type: str | None) -> str:
        """The next rows: after the last value read (given as text, cast to ``sql_type``), or
        from the first when there is none (``sql_type`` None)."""
        conditions = [] if sql_type is None else [f"{quote(self.column)} > $1::text::{sql_type}"]
        if self.where:
            conditions.append(f"({self.where})")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        limit = "$1" if sql_type is None else "$2"
        return (
            f"SELECT * FROM {quote(self.table)}{where} ORDER BY {quote(self.column)} LIMIT {limit}"
        )

    async def _check(self, connection: asyncpg.Connection) -> str:
        """The SQL type of ``column``, once the table and the columns named are there."""
        types = {row[0]: row[1] for row in await connection.fetch(_COLUMNS, quote(self.table))}
        columns = types.keys()
        what = f"PostgresSource {self.table!r}"
        if not columns:
            raise ConnectorError(f"{what}: table {self.table!r} does not exist in the database")
        for name in (self.column, self.key, self.timestamp):
            if name is not None and name not in columns:
                raise ConnectorError(
                    f"{what}: table {self.table!r} has no column {name!r} (it has "
                    f"{', '.join(sorted(columns))})"
                )
        sql_type: str = types[self.column]
        return sql_type

    def _batch(self, rows: list[Any], last: Position) -> SourceBatch:
        values = [dict(row) for row in rows]
        for value in values:
            for name, cell in value.items():
                if isinstance(cell, Decimal | UUID):
                    value[name] = str(cell)
        keys = None if self.key is None else [_key(v[self.key]) for v in values]
        stamps = None
        if self.timestamp is not None:
            stamps = [to_millis(v[self.timestamp]) for v in values]
        return SourceBatch(values, position=last, keys=keys, timestamps=stamps)


class Reader:
    """A source's connection, opened again after a transient failure (``what`` names the
    source in errors)."""

    def __init__(self, connector: PostgresSink, what: str) -> None:
        self._connector = connector
        self._what = what
        self._connection: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await self._connector.connect()
        return self._connection

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """The rows of ``query``, retried on a new connection after a transient failure."""

        async def attempt() -> list[Any]:
            connection = await self.connection()
            try:
                rows: list[Any] = await connection.fetch(query, *args)
            except _TRANSIENT:
                connection.terminate()
                self._connection = None
                raise
            except asyncpg.PostgresError as error:
                raise ConnectorError(
                    f"{self._what}: the database refused a query: {type(error).__name__}: {error}"
                ) from error
            return rows

        rows: list[Any] = await _retrying(attempt, self._what, self._connector.retry_for)
        return rows

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def _key(value: Any) -> str | None:
    return None if value is None else str(value)


def _position(value: Any, column: str) -> Position:
    """A ``column`` value as a position: a number, or the text of anything else."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return value
    if isinstance(value, datetime | date | Decimal | UUID):
        return str(value)
    raise ConnectorError(f"PostgresSource: column {column!r} holds {value!r}, not a position")
