"""The PostgreSQL server the connector tests run against, and a fresh table per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

URL_VARIABLE = "HEADWATER_TEST_POSTGRES"


def postgres_url() -> str:
    """The test server's URL; a test that needs it fails (never skips) without one."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        pytest.fail(
            f"{URL_VARIABLE} is not set: run `bash scripts/postgres.sh start` and export the URL "
            f"it prints as {URL_VARIABLE} (bash scripts/test.sh does both)"
        )
    return url


def query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of one query on the test server, from synchronous code."""

    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(postgres_url())
        try:
            return [tuple(row) for row in await connection.fetch(sql, *args)]
        finally:
            await connection.close()

    return asyncio.run(run())


def execute(sql: str) -> None:
    """Run statements on the test server, from synchronous code."""

    async def run() -> None:
        connection = await asyncpg.connect(postgres_url())
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


def table_name() -> str:
    """A table name no other test uses."""
    return f"t_{uuid.uuid4().hex[:12]}"


def fresh_table(ddl: str) -> Iterator[str]:
    """Create a table from ``ddl`` (``{table}`` is its name); drop it afterwards."""
    name = table_name()
    execute(ddl.format(table=name))
    try:
        yield name
    finally:
        execute(f"DROP TABLE IF EXISTS {name}")
