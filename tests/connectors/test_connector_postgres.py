"""PostgresSink and PostgresSource against a real PostgreSQL server: upserts and appends,
values checked against the columns, exactly-once through the offsets stored with the rows (a
replay, a second owner and a zombie write nothing twice), errors at start that say what to do,
a connection lost between flushes; rows read in order, resumed after the last, followed as
they are added."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import BaseModel
from support.connectors import STAMP, sink_batch, started
from support.postgres import postgres_url, table_name

from connectors import SinkContext
from connectors.base import UnwritableValue
from connectors.postgres import OFFSETS_TABLE, PostgresSink, PostgresSource
from pipelines.batch import Batch
from pipelines.errors import ConnectorError
from pipelines.log.base import FetchedBatch, RawBatch

CONTEXT = SinkContext("pg-tests", "sink.pg", 0)

STAMP_2026 = 1_767_225_600_000
"""2026-01-01 00:00 UTC in ms."""


@pytest.fixture(autouse=True)
async def no_offsets_yet(postgres: asyncpg.Connection) -> None:
    """No offsets stored by another test's writers (they share pipeline and step names)."""
    if await postgres.fetchval("SELECT to_regclass($1)", OFFSETS_TABLE) is not None:
        await postgres.execute(f"DELETE FROM {OFFSETS_TABLE} WHERE pipeline = 'pg-tests'")


@pytest.fixture
async def scores_table(postgres: asyncpg.Connection) -> AsyncIterator[str]:
    """An empty table ``(id bigint primary key, name text, score double precision)``."""
    name = table_name()
    await postgres.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, name text, score float8)")
    yield name
    await postgres.execute(f"DROP TABLE {name}")


@pytest.fixture
async def log_table(postgres: asyncpg.Connection) -> AsyncIterator[str]:
    """An empty table without a key: ``(id bigint NOT NULL, note text)``."""
    name = table_name()
    await postgres.execute(f"CREATE TABLE {name} (id bigint NOT NULL, note text)")
    yield name
    await postgres.execute(f"DROP TABLE {name}")


async def rows(postgres: asyncpg.Connection, scores_table: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await postgres.fetch(f"SELECT * FROM {scores_table} ORDER BY 1, 2")]


# -- upserts and appends -----------------------------------------------------------------------


async def test_rows_are_upserted_on_the_key_and_the_last_of_a_flush_wins(
    postgres: asyncpg.Connection, scores_table: str
) -> None:
    writer = await started(PostgresSink(scores_table, url=postgres_url(), key=["id"]), CONTEXT)
    writer.write(
        sink_batch([{"id": 1, "name": "a", "score": 1.0}, {"id": 2, "name": "b"}], first=0)
    )
    assert await rows(postgres, scores_table) == []  # write only buffers
    await writer.flush()
    assert await rows(postgres, scores_table) == [(1, "a", 1.0), (2, "b", None)]
    writer.write(sink_batch([{"id": 1, "name": "c", "score": 2}, {"id": 1, "name": "d"}], first=2))
    await writer.flush()
    assert await rows(postgres, scores_table) == [(1, "d", None), (2, "b", None)]
    await writer.close()


async def test_without_a_key_rows_are_appended(
    postgres: asyncpg.Connection, log_table: str
) -> None:
    writer = await started(PostgresSink(log_table, url=postgres_url()), CONTEXT)
    writer.write(sink_batch([{"id": 1, "note": "x"}, {"id": 1, "note": "x"}], first=0))
    await writer.close()
    assert await rows(postgres, log_table) == [(1, "x"), (1, "x")]


class Score(BaseModel):
    id: int
    name: str
    score: float | None = None
    at: datetime


async def test_a_table_made_from_a_model_takes_the_key_value_and_event_time(
    postgres: asyncpg.Connection,
) -> None:
    name = table_name()
    sink = PostgresSink(
        name,
        url=postgres_url(),
        model=Score,
        key=["player", "id"],
        key_column="player",
        timestamp_column="seen",
        columns={"player": "text"},
        create=True,
    )
    try:
        writer = await started(sink, CONTEXT)
        at = datetime(2026, 1, 1, tzinfo=UTC)
        writer.write(sink_batch([Score(id=7, name="x", at=at)], keys=["alice"]))
        await writer.close()
        columns = await postgres.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = $1 ORDER BY ordinal_position",
            name,
        )
        assert [tuple(c) for c in columns] == [
            ("id", "bigint", "NO"),
            ("name", "text", "NO"),
            ("score", "double precision", "YES"),
            ("at", "timestamp with time zone", "NO"),
            ("seen", "timestamp with time zone", "NO"),
            ("player", "text", "NO"),
        ]
        seen = datetime.fromtimestamp(STAMP / 1000, tz=UTC)
        assert await rows(postgres, name) == [(7, "x", None, at, seen, "alice")]
    finally:
        await postgres.execute(f"DROP TABLE IF EXISTS {name}")


async def test_a_scalar_goes_into_the_value_column_beside_its_key(
    postgres: asyncpg.Connection,
) -> None:
    name = table_name()
    await postgres.execute(f"CREATE TABLE {name} (page text PRIMARY KEY, views bigint NOT NULL)")
    try:
        sink = PostgresSink(
            name, url=postgres_url(), key=["page"], key_column="page", value_column="views"
        )
        writer = await started(sink, CONTEXT)
        writer.write(sink_batch([1, 1, 2], keys=["/a", "/b", "/a"]))
        await writer.close()
        assert await rows(postgres, name) == [("/a", 2), ("/b", 1)]
    finally:
        await postgres.execute(f"DROP TABLE {name}")


# -- values the table cannot hold ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"id": "7", "name": "a"}, "column 'id': str '7' is not a bigint"),
        ({"id": True, "name": "a"}, "column 'id': bool True is not a bigint"),
        ({"id": None, "name": "a"}, "column 'id': it is null and the column is NOT NULL"),
        ({"id": 1, "nmae": "a"}, "the table has no column 'nmae' for that field"),
        (42, "a int value has no columns; pass value_column="),
    ],
)
async def test_a_value_the_table_cannot_hold_is_refused_in_write(
    postgres: asyncpg.Connection, scores_table: str, value: Any, says: str
) -> None:
    writer = await started(PostgresSink(scores_table, url=postgres_url(), key=["id"]), CONTEXT)
    with pytest.raises(UnwritableValue, match=says.replace("(", r"\(")):
        writer.write(sink_batch([{"id": 1, "name": "ok"}, value], first=0))
    writer.write(
        sink_batch([{"id": 1, "name": "ok"}], first=0)
    )  # nothing of the refused batch stays
    await writer.close()
    assert await rows(postgres, scores_table) == [(1, "ok", None)]


# -- exactly-once ------------------------------------------------------------------------------


async def test_a_replayed_batch_is_not_written_again(
    postgres: asyncpg.Connection, log_table: str
) -> None:
    """After a crash between the sink's flush and the offsets' commit, the partition's next
    owner replays the batch: its rows are in the table already, and stay there once."""
    sink = PostgresSink(log_table, url=postgres_url())
    first = await started(sink, CONTEXT)
    first.write(sink_batch([{"id": n} for n in range(10)], first=100))
    await first.flush()
    # a new owner replays offsets 100..119: only 110..119 are new
    second = await started(sink, SinkContext("pg-tests", "sink.pg", 1))
    second.write(sink_batch([{"id": n} for n in range(20)], first=100))
    await second.close()
    assert sorted(r[0] for r in await rows(postgres, log_table)) == list(range(20))
    stored = await postgres.fetch(
        f"SELECT topic, partition, next_offset FROM {OFFSETS_TABLE} WHERE pipeline = 'pg-tests'"
    )
    assert [tuple(r) for r in stored] == [("t", 0, 120)]
    await first.close()


async def test_a_zombie_that_flushes_late_writes_nothing(
    postgres: asyncpg.Connection, log_table: str
) -> None:
    sink = PostgresSink(log_table, url=postgres_url())
    zombie = await started(sink, CONTEXT)
    zombie.write(
        sink_batch([{"id": n} for n in range(5)], first=0)
    )  # not flushed before it stalled
    owner = await started(sink, SinkContext("pg-tests", "sink.pg", 1))
    owner.write(sink_batch([{"id": n} for n in range(8)], first=0))
    await owner.close()
    await zombie.close()
    assert sorted(r[0] for r in await rows(postgres, log_table)) == list(range(8))


async def test_rows_emitted_on_time_passing_are_written_each_time(
    postgres: asyncpg.Connection, log_table: str
) -> None:
    """A window closing on an idle partition comes from no input record: no offset guards it
    (a table of windowed results needs a key, see the module docstring)."""
    sink = PostgresSink(log_table, url=postgres_url())
    writer = await started(sink, CONTEXT)
    nothing = FetchedBatch("t", 0, RawBatch([], [], []), [], -1)
    for _ in range(2):
        writer.write(Batch([None], [{"id": 9}], [STAMP], [-1], nothing))
        await writer.flush()
    await writer.close()
    assert await rows(postgres, log_table) == [(9, None), (9, None)]


async def test_without_exactly_once_a_replay_appends_again(
    postgres: asyncpg.Connection, log_table: str
) -> None:
    sink = PostgresSink(log_table, url=postgres_url(), exactly_once=False)
    writer = await started(sink, CONTEXT)
    for _ in range(2):
        writer.write(sink_batch([{"id": 1}], first=0))
        await writer.flush()
    await writer.close()
    assert await rows(postgres, log_table) == [(1, None), (1, None)]


async def test_offsets_are_remembered_and_forgotten_per_step(
    postgres: asyncpg.Connection, log_table: str
) -> None:
    sink = PostgresSink(log_table, url=postgres_url())
    writer = await started(sink, CONTEXT)
    writer.write(sink_batch([{"id": 1}], first=0))
    await writer.close()
    remembered = await sink.remembered("pg-tests", "sink.pg")
    assert remembered == f"1 input offsets in table {OFFSETS_TABLE}"
    assert await sink.remembered("pg-tests", "other") is None
    held = await sink.earlier_output("pg-tests", "sink.pg")
    assert held is not None and "input offsets of an earlier run" in held
    assert f"rows in table {log_table!r}, which it appends to" in held
    await sink.forget("pg-tests", "sink.pg")
    assert await sink.remembered("pg-tests", "sink.pg") is None


# -- errors at start and on the way --------------------------------------------------------------


async def test_a_wrong_password_is_an_error_that_says_so(scores_table: str) -> None:
    url = postgres_url().replace(":headwater@", ":wrong@")
    with pytest.raises(ConnectorError, match="refused the user name or password") as caught:
        await started(PostgresSink(scores_table, url=url), CONTEXT)
    assert "wrong" not in str(caught.value)  # the password is not printed


async def test_a_server_that_is_down_is_retried_then_named(scores_table: str) -> None:
    url = "postgresql://headwater:headwater@127.0.0.1:9/headwater"
    with pytest.raises(ConnectorError, match=r"retried for 0.5 s\); is the server up") as caught:
        await started(PostgresSink(scores_table, url=url, retry_for=0.5), CONTEXT)
    assert "127.0.0.1:9" in str(caught.value) and "headwater:headwater" not in str(caught.value)


async def test_a_missing_table_or_column_or_key_index_is_an_error_at_start(
    scores_table: str,
) -> None:
    url = postgres_url()
    with pytest.raises(ConnectorError, match="table 'nope' does not exist"):
        await started(PostgresSink("nope", url=url), CONTEXT)
    with pytest.raises(ConnectorError, match="has no column 'page'"):
        await started(PostgresSink(scores_table, url=url, key_column="page"), CONTEXT)
    with pytest.raises(ConnectorError, match=r"key=\['name'\] needs a primary key or unique"):
        await started(PostgresSink(scores_table, url=url, key=["name"]), CONTEXT)


def test_create_without_a_model_or_a_column_type_is_refused_at_once() -> None:
    with pytest.raises(ConnectorError, match="create=True needs model="):
        PostgresSink("x", create=True)
    with pytest.raises(ConnectorError, match=re.escape("columns={'user': 'text'}")):
        PostgresSink("x", model=Score, key_column="user", create=True)


async def test_no_url_anywhere_says_where_to_put_one(
    scores_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HEADWATER_POSTGRES_URL", raising=False)
    with pytest.raises(ConnectorError, match="pass url= or set HEADWATER_POSTGRES_URL"):
        await started(PostgresSink(scores_table), CONTEXT)
    monkeypatch.setenv("HEADWATER_POSTGRES_URL", postgres_url())
    await (await started(PostgresSink(scores_table), CONTEXT)).close()


async def test_a_connection_lost_between_flushes_is_opened_again(
    postgres: asyncpg.Connection, scores_table: str
) -> None:
    writer = await started(PostgresSink(scores_table, url=postgres_url(), key=["id"]), CONTEXT)
    writer.write(sink_batch([{"id": 1}], first=0))
    await writer.flush()
    await postgres.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    writer.write(sink_batch([{"id": 2}], first=1))
    await writer.close()
    assert await rows(postgres, scores_table) == [(1, None, None), (2, None, None)]


async def test_a_batch_the_database_refuses_stops_the_sink_and_keeps_the_rows(
    postgres: asyncpg.Connection, scores_table: str
) -> None:
    await postgres.execute(f"ALTER TABLE {scores_table} ADD CHECK (score >= 0)")
    writer = await started(PostgresSink(scores_table, url=postgres_url(), key=["id"]), CONTEXT)
    writer.write(sink_batch([{"id": 1, "score": -1.0}], first=0))
    with pytest.raises(ConnectorError, match="refused a batch of 1 rows: CheckViolationError"):
        await writer.flush()
    assert await rows(postgres, scores_table) == []
    await postgres.execute(f"ALTER TABLE {scores_table} DROP CONSTRAINT {scores_table}_score_check")
    await writer.close()  # the rows were kept for the next flush
    assert await rows(postgres, scores_table) == [(1, None, -1.0)]


# -- PostgresSource ----------------------------------------------------------------------------


@pytest.fixture
async def orders_table(postgres: asyncpg.Connection) -> AsyncIterator[str]:
    """A table of 25 orders, ids 1..25, one a minute from 2026-01-01 00:00 UTC."""
    name = table_name()
    await postgres.execute(
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, customer text, amount numeric(8, 2), "
        "at timestamptz NOT NULL)"
    )
    await insert_orders(postgres, name, 1, 25)
    yield name
    await postgres.execute(f"DROP TABLE {name}")


async def insert_orders(
    postgres: asyncpg.Connection, scores_table: str, first: int, count: int
) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    await postgres.executemany(
        f"INSERT INTO {scores_table} VALUES ($1, $2, $3, $4)",
        [
            (i, f"c{i % 3}", Decimal(i) / 4, start + timedelta(minutes=i - 1))
            for i in range(first, first + count)
        ],
    )


async def test_the_source_reads_rows_in_order_and_resumes_after_the_last(orders_table: str) -> None:
    source = PostgresSource(orders_table, url=postgres_url(), batch_size=10, key="customer")
    batches = [batch async for batch in source.read(None)]
    assert [len(b.values) for b in batches] == [10, 10, 5]
    assert [b.position for b in batches] == [10, 20, 25]
    first = batches[0]
    assert first.values[0] == {
        "id": 1,
        "customer": "c1",
        "amount": "0.25",  # numeric: exact, as text
        "at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    assert first.keys is not None and first.keys[:3] == ["c1", "c2", "c0"]
    resumed = [v["id"] async for b in source.read(20) for v in b.values]
    assert resumed == [21, 22, 23, 24, 25]


async def test_the_source_follows_new_rows_and_resumes_on_a_timestamp(
    postgres: asyncpg.Connection, orders_table: str
) -> None:
    source = PostgresSource(
        orders_table,
        url=postgres_url(),
        column="at",
        timestamp="at",
        follow=True,
        poll_interval=0.05,
    )
    reading = aiter(source.read("2026-01-01 00:19:00+00"))
    batch = await anext(reading)
    assert [v["id"] for v in batch.values] == [21, 22, 23, 24, 25]
    assert batch.timestamps == [STAMP_2026 + (i - 1) * 60_000 for i in range(21, 26)]
    assert batch.position == "2026-01-01 00:24:00+00:00"
    await insert_orders(postgres, orders_table, 26, 2)
    later = await asyncio.wait_for(anext(reading), timeout=5)
    assert [v["id"] for v in later.values] == [26, 27]
    await reading.aclose()


async def test_the_source_names_a_missing_table_or_column(orders_table: str) -> None:
    with pytest.raises(ConnectorError, match="table 'nope' does not exist"):
        await anext(aiter(PostgresSource("nope", url=postgres_url()).read(None)))
    with pytest.raises(ConnectorError, match="has no column 'seq'"):
        await anext(
            aiter(PostgresSource(orders_table, url=postgres_url(), column="seq").read(None))
        )


async def test_json_columns_take_nested_values_and_uuid_columns_take_text(
    postgres: asyncpg.Connection,
) -> None:
    name = table_name()
    await postgres.execute(f"CREATE TABLE {name} (id uuid PRIMARY KEY, doc jsonb, tags json)")
    try:
        writer = await started(PostgresSink(name, url=postgres_url(), key=["id"]), CONTEXT)
        doc = {"a": [1, {"b": None}], "when": "2026-01-01"}
        writer.write(sink_batch([{"id": "7b4f8c1e-1f7e-4d55-9c4b-4a1d3c2e5f60", "doc": doc}]))
        with pytest.raises(UnwritableValue, match="column 'tags'"):
            writer.write(sink_batch([{"id": "7b4f8c1e-1f7e-4d55-9c4b-4a1d3c2e5f61", "tags": {1j}}]))
        await writer.close()
        (row,) = await postgres.fetch(f"SELECT id::text, doc::text, tags FROM {name}")
        assert row[0] == "7b4f8c1e-1f7e-4d55-9c4b-4a1d3c2e5f60"
        assert orjson.loads(row[1]) == doc and row[2] is None
    finally:
        await postgres.execute(f"DROP TABLE {name}")
