"""The PostgreSQL server the tests run against: its URL, queries from synchronous code, fresh
table names, and the ``postgres`` fixture (a connection of the test's own; tests/conftest.py
registers this module as a plugin)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

__all__ = ["execute", "postgres", "postgres_url", "query", "table_name"]

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


@pytest.fixture
async def postgres() -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test server, for the test's own statements."""
    connection = await asyncpg.connect(postgres_url())
    yield connection
    await connection.close()


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
