"""PostgresChangesSource against a real PostgreSQL server (wal_level = logical): it reads
every committed change in commit order, also the row a polling source misses when a lower id
commits last; updates and deletes come with what the log holds of them; a restart from the
stored position repeats nothing; and through ``headwater run`` the changes of a table are
counted per operation, equal to the statements run."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.cli import headwater
from support.postgres import postgres_url, table_name

from connectors.base import SourceBatch
from connectors.postgres import PostgresSource
from connectors.postgres_changes import PostgresChangesSource
from pipelines.errors import ConnectorError


@pytest.fixture
async def slot(postgres: asyncpg.Connection) -> AsyncIterator[str]:
    """A slot name no other test uses; the slot is dropped afterwards (it holds the log)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    await postgres.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        name,
    )


@pytest.fixture
async def items_table(postgres: asyncpg.Connection) -> AsyncIterator[str]:
    name = table_name()
    await postgres.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, item text, qty int)")
    yield name
    await postgres.execute(f"DROP TABLE {name}")


async def everything(source: PostgresChangesSource, position: Any = None) -> list[SourceBatch]:
    return [batch async for batch in source.read(position)]


def changes(batches: list[SourceBatch]) -> list[dict[str, Any]]:
    return [value for batch in batches for value in batch.values]


async def test_a_row_committed_after_a_higher_id_is_read_though_polling_misses_it(
    postgres: asyncpg.Connection, slot: str, items_table: str
) -> None:
    source = PostgresChangesSource(slot, tables=[items_table], url=postgres_url(), follow=False)
    assert await everything(source) == []  # the slot starts here
    late = await asyncpg.connect(postgres_url())
    try:
        slow = late.transaction()
        await slow.start()
        await late.execute(f"INSERT INTO {items_table} (item, qty) VALUES ('slow', 1)")  # id 1
        await postgres.execute(f"INSERT INTO {items_table} (item, qty) VALUES ('fast', 2)")  # id 2
        polling = PostgresSource(items_table, url=postgres_url())
        polled = [b async for b in polling.read(None)]
        assert [v["id"] for b in polled for v in b.values] == [2]
        first = await everything(source)
        await slow.commit()
    finally:
        await late.close()
    assert [c["row"]["item"] for c in changes(first)] == ["fast"]
    second = await everything(source, first[-1].position)
    assert [c["row"] for c in changes(second)] == [{"id": 1, "item": "slow", "qty": 1}]
    # the poller goes on after id 2: the row of id 1 is never read
    assert [v["id"] async for b in polling.read(polled[-1].position) for v in b.values] == []


async def test_inserts_updates_deletes_and_truncates_in_commit_order(
    postgres: asyncpg.Connection, slot: str, items_table: str
) -> None:
    source = PostgresChangesSource(
        slot, url=postgres_url(), follow=False, key=lambda change: str(change["row"].get("id"))
    )
    await everything(source)
    await postgres.execute(f"INSERT INTO {items_table} (item, qty) VALUES ('a', 1), ('b', 2)")
    await postgres.execute(f"UPDATE {items_table} SET qty = 5, id = 10 WHERE id = 1")
    await postgres.execute(f"DELETE FROM {items_table} WHERE id = 2")
    await postgres.execute(f"TRUNCATE {items_table}")
    batches = await everything(source)
    found = [(c["op"], c["table"], c["row"], c.get("old")) for c in changes(batches)]
    table = f"public.{items_table}"
    assert found == [
        ("insert", table, {"id": 1, "item": "a", "qty": 1}, None),
        ("insert", table, {"id": 2, "item": "b", "qty": 2}, None),
        ("update", table, {"id": 10, "item": "a", "qty": 5}, {"id": 1}),  # the key changed
        ("delete", table, {"id": 2}, None),
        ("truncate", table, {}, None),
    ]
    (batch,) = batches
    assert batch.keys == ["1", "2", "10", "2", "None"]
    # the commit times: the two inserts share one, and they follow each other
    stamps = batch.timestamps
    assert stamps is not None and stamps[0] == stamps[1] and stamps == sorted(stamps)
    assert abs(stamps[0] / 1000 - time.time()) < 60


async def test_a_restart_from_the_stored_position_repeats_nothing(
    postgres: asyncpg.Connection, slot: str, items_table: str
) -> None:
    source = PostgresChangesSource(
        slot, tables=[items_table], url=postgres_url(), follow=False, batch_size=3
    )
    await everything(source)
    for n in range(5):  # five transactions of one row
        await postgres.execute(f"INSERT INTO {items_table} (item, qty) VALUES ('x', {n})")
    reading = aiter(source.read(None))
    first = await anext(reading)  # crash: the slot was not advanced past it
    await reading.aclose()
    rest = await everything(source, first.position)
    qty = [c["row"]["qty"] for c in first.values + changes(rest)]
    assert qty == [0, 1, 2, 3, 4]


async def test_a_slot_of_another_plugin_is_refused(postgres: asyncpg.Connection, slot: str) -> None:
    await postgres.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    with pytest.raises(ConnectorError, match="give this source a slot of its own"):
        await everything(PostgresChangesSource(slot, url=postgres_url(), follow=False))


def test_a_slot_name_postgres_would_refuse_is_refused_at_once() -> None:
    with pytest.raises(ConnectorError, match="must be 1 to 63 lower-case letters"):
        PostgresChangesSource("My-Slot")


MODULE = """
from connectors import JsonLinesSink
from connectors.postgres_changes import PostgresChangesSource
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("changes")
    .source(
        PostgresChangesSource("{slot}", tables=["{table}"], follow=False),
        into=Topic("changes", partitions=2),
    )
    .key_by("by-op", lambda change: change["op"])
    .count("per-op")
    .sink(JsonLinesSink("counts.jsonl"))
)
"""


async def test_a_run_counts_the_changes_of_a_table_per_operation(
    postgres: asyncpg.Connection, slot: str, items_table: str, tmp_path: Path
) -> None:
    await postgres.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", slot)
    for n in range(30):
        await postgres.execute(f"INSERT INTO {items_table} (item, qty) VALUES ('x', {n})")
    await postgres.execute(f"UPDATE {items_table} SET qty = qty + 1 WHERE id % 3 = 0")  # 10 rows
    await postgres.execute(f"DELETE FROM {items_table} WHERE id % 5 = 0")  # 6 rows
    (tmp_path / "changes.py").write_text(MODULE.format(slot=slot, table=items_table))
    env = {"HEADWATER_POSTGRES_URL": postgres_url()}
    done = headwater("run", "changes.py", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    final: dict[str, int] = {}
    for line in (tmp_path / "counts.jsonl").read_text().splitlines():
        row = json.loads(line)
        final[row["key"]] = row["value"]
    assert Counter(final) == Counter({"insert": 30, "update": 10, "delete": 6})
    again = headwater("run", "changes.py", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "source changes: 0 records written" in again.stderr or "nothing new" in again.stderr
