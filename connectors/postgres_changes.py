"""Change data capture from PostgreSQL: every insert, update and delete committed to the tables
watched, in commit order, through a logical replication slot.

A polling source (:class:`~connectors.postgres.PostgresSource`) misses a row committed after
one with a higher id; this one reads the server's write-ahead log as decoded by the
``test_decoding`` plugin that ships with PostgreSQL, whole transactions at a time, so nothing
committed is missed, whatever the order writers commit in. The server needs ``wal_level =
logical`` and a user allowed to use replication slots (a superuser, or one with the
``REPLICATION`` attribute).

The slot (``slot``; created when missing) keeps the server's log from the position it was last
advanced to. The source advances it only once a batch is durable on the pipeline's log (when
the runtime asks for the next batch), and the runtime stores the batch's position, the log
position (LSN) of its last commit; a restarted pipeline first advances the slot to its stored
position, so no change is emitted twice even when the slot was not advanced before a crash, and
none is lost. A slot holds the server's log until it is advanced: drop one that is no longer
read (``SELECT pg_drop_replication_slot('name')``), or the server's disk fills.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from connectors.base import Position, Source, SourceBatch
from connectors.postgres import PostgresSink, Reader
from pipelines.errors import ConnectorError
from pipelines.record import to_millis

__all__ = ["PostgresChangesSource", "parse_change"]

_PLUGIN = "test_decoding"
_OPTIONS = ("include-timestamp", "1", "include-xids", "0", "skip-empty-xacts", "1")

_CHANGE = re.compile(
    r'table (?P<table>(?:"(?:[^"]|"")*"|[^."\s]+)\.(?:"(?:[^"]|"")*"|[^:\s]+)): '
    r"(?P<op>INSERT|UPDATE|DELETE|TRUNCATE): ?(?P<rest>.*)",
    re.DOTALL,
)
_COLUMN = re.compile(
    r'(?P<name>"(?:[^"]|"")*"|[^\s\[]+)\[(?P<type>[^\]]*(?:\[\])?)\]:'
    r"(?P<value>'(?:[^']|'')*'|\S+)"
)
_COMMIT = re.compile(r"COMMIT(?: \(at (?P<at>.+)\))?$")


@dataclass(slots=True)
class _Transaction:
    """The changes of one transaction, as values, until its commit."""

    values: list[dict[str, Any]] = field(default_factory=list)


def _unquote(text: str, quote: str) -> str:
    if text.startswith(quote) and text.endswith(quote) and len(text) >= 2:
        return text[1:-1].replace(quote * 2, quote)
    return text


_UNQUOTED: dict[str, Callable[[str], Any]] = {
    **dict.fromkeys(("smallint", "integer", "bigint", "oid"), int),
    **dict.fromkeys(("real", "double precision"), float),
    "boolean": lambda text: text == "true",
}


def _cell(sql_type: str, text: str) -> Any:
    """A column's value from its text in the decoded log: numbers and booleans as such, JSON
    parsed, anything else (numeric, text, dates and times) as the server's text."""
    if text == "null":
        return None
    if text.startswith("'"):
        value = _unquote(text, "'")
        return orjson.loads(value) if sql_type in ("json", "jsonb") else value
    convert = _UNQUOTED.get(sql_type)
    return text if convert is None else convert(text)


def _columns(text: str) -> dict[str, Any]:
    row = {}
    for match in _COLUMN.finditer(text):
        if match["value"] == "unchanged-toast-datum":
            continue  # a large value the update did not change: not in the log
        row[_unquote(match["name"], '"')] = _cell(match["type"], match["value"])
    return row


def parse_change(line: str) -> dict[str, Any] | None:
    """A change as a value: ``{"op", "table", "row"}``, with ``"old"`` (the old key, or the
    old row) when the log carries it; None for a line that is not a change."""
    found = _CHANGE.match(line)
    if found is None:
        return None
    op, rest = found["op"].lower(), found["rest"]
    table = ".".join(_unquote(part, '"') for part in _split_name(found["table"]))
    change: dict[str, Any] = {"op": op, "table": table}
    if op == "truncate":
        change["row"] = {}
        return change
    if rest.startswith("old-key: ") and " new-tuple: " in rest:
        old, new = rest.removeprefix("old-key: ").split(" new-tuple: ", 1)
        change["old"] = _columns(old)
        rest = new
    change["row"] = {} if rest == "(no-tuple-data)" else _columns(rest)
    return change


def _split_name(name: str) -> list[str]:
    """``schema.table``, either part quoted (``"my schema"."t.1"``)."""
    parts = re.findall(r'"(?:[^"]|"")*"|[^.]+', name)
    return parts


class PostgresChangesSource(Source):
    """Every change committed to ``tables`` (all tables when empty: ``schema.table`` or
    ``table`` for the ``public`` schema), as ``{"op": "insert" | "update" | "delete" |
    "truncate", "table": "public.orders", "row": {...}}`` values (``"old"`` too when the
    server logs the old key or row: a changed key, or ``REPLICA IDENTITY FULL``), read through
    the logical replication slot ``slot`` (see the module docstring).

    Event times are the commit times. ``key`` maps a change to the record's key (for example
    ``lambda change: change["row"]["id"]``; default: none). Values keep integers, floats,
    booleans and JSON as such; numeric, text, dates and times are the server's text. A
    delete's row holds the key columns only, unless the table's replica identity is full.
    ``follow=False`` ends the source once it has read what was committed when it started.
    """

    name = "postgres-changes"

    def __init__(
        self,
        slot: str,
        *,
        tables: Sequence[str] = (),
        url: str | None = None,
        key: Callable[[dict[str, Any]], Any] | None = None,
        batch_size: int = 10_000,
        follow: bool = True,
        poll_interval: float = 1.0,
        retry_for: float = 30.0,
    ) -> None:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ConnectorError(
                f"PostgresChangesSource: slot {slot!r} must be 1 to 63 lower-case letters, "
                "digits or underscores (a replication slot's name)"
            )
        self.slot = slot
        self.tables = {t if "." in t else f"public.{t}" for t in tables}
        self.key = key
        self.batch_size = batch_size
        self.follow = follow
        self.poll_interval = poll_interval
        self._connector = PostgresSink(f"slot {slot}", url=url, retry_for=retry_for)
        self._what = f"PostgresChangesSource (slot {slot!r})"

    def __repr__(self) -> str:
        return f"PostgresChangesSource({self.slot!r})"

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of whole transactions after ``position`` (the LSN of the last commit
        emitted), the slot advanced past each once it is on the log."""
        reader = Reader(self._connector, self._what)
        try:
            await self._prepare(reader, position)
            while True:
                rows = await reader.fetch(
                    "SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, $2, "
                    + ", ".join(f"'{option}'" for option in _OPTIONS)
                    + ")",
                    self.slot,
                    self.batch_size,
                )
                if rows:
                    batch, end = self._batch(rows)
                    if batch is not None:
                        yield batch  # resumed: the batch and its position are on the log
                    await self._advance(reader, end)
                if len(rows) < self.batch_size:
                    if not self.follow:
                        return
                    await asyncio.sleep(self.poll_interval)
        finally:
            await reader.close()

    async def _prepare(self, reader: Reader, position: Position | None) -> None:
        """Check the server, create the slot if missing, and advance it to ``position``."""
        level = await reader.fetch("SHOW wal_level")
        if level[0][0] != "logical":
            raise ConnectorError(
                f"{self._what}: the server's wal_level is {level[0][0]!r}; change data "
                "capture needs wal_level = logical in postgresql.conf (and a restart)"
            )
        found = await reader.fetch(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1", self.slot
        )
        if not found:
            await reader.fetch(
                "SELECT pg_create_logical_replication_slot($1, $2)", self.slot, _PLUGIN
            )
        elif found[0][0] != _PLUGIN:
            raise ConnectorError(
                f"{self._what}: the slot decodes with {found[0][0]!r}, not {_PLUGIN!r}; "
                "give this source a slot of its own"
            )
        if position is not None:
            await self._advance(reader, str(position))

    async def _advance(self, reader: Reader, lsn: str) -> None:
        await reader.fetch(
            "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) FROM "
            "pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
            self.slot,
            lsn,
        )

    def _watched(self, change: dict[str, Any]) -> bool:
        return not self.tables or change["table"] in self.tables

    def _key_of(self, change: dict[str, Any]) -> Any:
        assert self.key is not None
        try:
            return self.key(change)
        except Exception as error:
            raise ConnectorError(
                f"{self._what}: key= failed on the change {change!r:.200}: "
                f"{type(error).__name__}: {error}"
            ) from error

    def _batch(self, rows: list[Any]) -> tuple[SourceBatch | None, str]:
        """The changes of the tables watched in ``rows`` (whole transactions), and the LSN
        after the last commit."""
        values: list[dict[str, Any]] = []
        stamps: list[int] = []
        pending = _Transaction()
        end = rows[-1][0]
        for lsn, data in rows:
            if data.startswith("BEGIN"):
                pending = _Transaction()
            elif (commit := _COMMIT.match(data)) is not None:
                at = _commit_time(commit["at"])
                values += pending.values
                stamps += [at] * len(pending.values)
                end = lsn
            elif (change := parse_change(data)) is not None and self._watched(change):
                pending.values.append(change)
        if not values:
            return None, end
        keys = None if self.key is None else [self._key_of(v) for v in values]
        return SourceBatch(values, position=end, keys=keys, timestamps=stamps), end


def _commit_time(text: str | None) -> int:
    if text is None:
        return to_millis(datetime.now().astimezone())
    return to_millis(datetime.fromisoformat(text))
