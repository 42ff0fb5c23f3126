"""docs/connectors.md runs: its Python blocks, put together in the module ``shop.py``, are run
with the page's own ``headwater run`` command. The SQLite source and sink written there sum
each customer's orders equal to a sum over the input, a second run after new orders reads only
those; the PostgreSQL example counts each page's views into its table."""

from __future__ import annotations

import json
import random
import shlex
import sqlite3
from collections import Counter
from pathlib import Path

from support.cli import headwater
from support.docs import DOCS, code_blocks
from support.postgres import execute, postgres_url, query

DOC = DOCS / "connectors.md"


def write_shop_module(directory: Path) -> None:
    (directory / "shop.py").write_text("\n\n".join(code_blocks(DOC, "python")))


def add_orders(db: Path, first_id: int, count: int) -> list[tuple[int, str, int]]:
    rng = random.Random(first_id)
    orders = [
        (i, f"c{rng.randint(1, 30)}", rng.randint(1, 500))
        for i in range(first_id, first_id + count)
    ]
    with sqlite3.connect(db) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, amount INT)"
        )
        connection.executemany("INSERT INTO orders VALUES (?, ?, ?)", orders)
    return orders


def sqlite_totals(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        return dict(connection.execute("SELECT key, value FROM totals"))


def summed_amounts(orders: list[tuple[int, str, int]]) -> dict[str, int]:
    summed: Counter[str] = Counter()
    for _, customer, amount in orders:
        summed[customer] += amount
    return dict(summed)


def test_the_sqlite_source_and_sink_of_the_page_sum_the_orders(tmp_path: Path) -> None:
    write_shop_module(tmp_path)
    (command,) = (line for block in code_blocks(DOC, "bash") for line in block.splitlines())
    args = shlex.split(command, comments=True)
    assert args[:2] == ["headwater", "run"]
    orders = add_orders(tmp_path / "shop.db", 1, 1500)
    done = headwater(*args[1:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "source orders: 1,500 records written" in done.stderr
    assert sqlite_totals(tmp_path / "shop.db") == summed_amounts(orders)
    orders += add_orders(tmp_path / "shop.db", 1501, 200)
    again = headwater(*args[1:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "source orders: 200 records written" in again.stderr
    assert sqlite_totals(tmp_path / "shop.db") == summed_amounts(orders)


def test_the_postgres_example_counts_each_pages_views(tmp_path: Path) -> None:
    write_shop_module(tmp_path)
    rng = random.Random(7)
    pages = [f"/p/{rng.randint(1, 12)}" for _ in range(2000)]
    (tmp_path / "clicks.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    execute("DROP TABLE IF EXISTS page_views")
    try:
        env = {"HEADWATER_POSTGRES_URL": postgres_url()}
        done = headwater("run", "shop.py:page_views", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert dict(query("SELECT page, views FROM page_views")) == Counter(pages)
    finally:
        execute("DROP TABLE IF EXISTS page_views")
        execute("DELETE FROM headwater_sink_offsets WHERE pipeline = 'page-views'")


def test_the_postgres_source_example_sums_each_customers_orders(tmp_path: Path) -> None:
    write_shop_module(tmp_path)
    rng = random.Random(11)
    orders = [(i, f"c{rng.randint(1, 9)}", rng.randint(100, 99_999) / 100) for i in range(1, 801)]
    execute("DROP TABLE IF EXISTS shop_orders; DROP TABLE IF EXISTS customer_totals")
    execute("CREATE TABLE shop_orders (id bigint PRIMARY KEY, customer text, amount numeric(8,2))")
    values = ", ".join(f"({i}, '{c}', {a})" for i, c, a in orders)
    execute(f"INSERT INTO shop_orders VALUES {values}")
    try:
        env = {"HEADWATER_POSTGRES_URL": postgres_url()}
        done = headwater("run", "shop.py:customer_totals", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert "source shop-orders: 800 records written" in done.stderr
        found = dict(query("SELECT customer, spent FROM customer_totals"))
        expected: dict[str, float] = {}
        for _, customer, amount in orders:
            expected[customer] = expected.get(customer, 0.0) + amount
        assert found.keys() == expected.keys()
        assert all(abs(found[c] - expected[c]) < 1e-6 for c in expected)
    finally:
        execute("DROP TABLE IF EXISTS shop_orders; DROP TABLE IF EXISTS customer_totals")
        execute("DELETE FROM headwater_sink_offsets WHERE pipeline = 'customer-totals'")
