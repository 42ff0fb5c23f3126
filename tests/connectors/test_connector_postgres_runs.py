"""PostgresSink in ``headwater run``, ``headwater reset`` and a run that starts afresh: a keyed
count lands in its table (equal to a count of the input), more input updates it, a reset
forgets the sink's offsets so the next run computes the table again, a run whose log was
deleted by hand is refused instead of dropping every row, and wrong credentials are one
paragraph."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import assert_user_error, headwater
from support.postgres import execute, postgres_url, query, table_name

MODULE = """
from connectors import JsonLines
from connectors.postgres import PostgresSink
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("pages", processing_guarantee="exactly_once")
    .source(JsonLines("clicks.jsonl"), into=Topic("clicks", partitions=3))
    .key_by("by-page", lambda click: click["page"])
    .count("views")
    .sink(
        PostgresSink(
            "{table}",
            key=["page"],
            key_column="page",
            value_column="views",
            columns={{"page": "text", "views": "bigint"}},
            create=True,
        ),
        step_id="to-db",
    )
)
"""


def add_clicks(directory: Path, count: int, seed: int) -> list[str]:
    """Append ``count`` clicks to ``clicks.jsonl``; their pages."""
    rng = random.Random(seed)
    pages = [f"/p/{rng.randint(1, 20)}" for _ in range(count)]
    with (directory / "clicks.jsonl").open("a") as file:
        file.writelines(json.dumps({"page": page}) + "\n" for page in pages)
    return pages


@pytest.fixture
def views_table() -> str:
    return table_name()


def forget_pages() -> None:
    """No offsets of an earlier pipeline called ``pages``."""
    if query("SELECT to_regclass('headwater_sink_offsets')")[0][0] is not None:
        execute("DELETE FROM headwater_sink_offsets WHERE pipeline = 'pages'")


@pytest.fixture
def project(tmp_path: Path, views_table: str) -> Iterator[Path]:
    (tmp_path / "pages.py").write_text(MODULE.format(table=views_table))
    forget_pages()
    yield tmp_path
    execute(f"DROP TABLE IF EXISTS {views_table}")
    forget_pages()


def run_pages(project: Path, *args: str, url: str | None = None) -> None:
    done = headwater(
        "run", "pages.py", *args, cwd=project, env={"HEADWATER_POSTGRES_URL": url or postgres_url()}
    )
    assert done.returncode == 0, done.stderr
    assert "to-db:" in done.stderr


def views(table: str) -> Counter[str]:
    return Counter(dict(query(f"SELECT page, views FROM {table}")))


def test_a_keyed_count_lands_in_its_table_and_more_input_updates_it(
    project: Path, views_table: str
) -> None:
    pages = add_clicks(project, 3000, seed=1)
    run_pages(project, "--workers", "2")
    assert views(views_table) == Counter(pages)
    pages += add_clicks(project, 500, seed=2)
    run_pages(project)
    assert views(views_table) == Counter(pages)


def test_after_a_reset_the_next_run_computes_the_table_again(
    project: Path, views_table: str
) -> None:
    pages = add_clicks(project, 2000, seed=3)
    run_pages(project)
    execute(f"UPDATE {views_table} SET views = 0")  # what the next run must write again
    env = {"HEADWATER_POSTGRES_URL": postgres_url()}
    done = headwater("reset", "pages.py", "--yes", cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    assert (
        "removed what sink step 'to-db' keeps: 3 input offsets in table headwater_sink_offsets"
        in done.stdout
    )
    run_pages(project)
    assert views(views_table) == Counter(pages)


def test_a_run_whose_log_was_deleted_by_hand_is_refused(project: Path, views_table: str) -> None:
    add_clicks(project, 1000, seed=4)
    run_pages(project)
    (project / ".headwater").rename(project / "old-log")
    env = {"HEADWATER_POSTGRES_URL": postgres_url()}
    refused = headwater("run", "pages.py", cwd=project, env=env)
    assert_user_error(
        refused,
        "its sinks already hold output: to-db (input offsets of an earlier run in "
        "headwater_sink_offsets)",
        "headwater reset pages.py",
    )


def test_wrong_credentials_are_one_paragraph_without_the_password(project: Path) -> None:
    add_clicks(project, 10, seed=5)
    url = postgres_url().replace(":headwater@", ":s3cret@")
    done = headwater("run", "pages.py", cwd=project, env={"HEADWATER_POSTGRES_URL": url})
    paragraph = assert_user_error(done, "the server refused the user name or password")
    assert "s3cret" not in paragraph and ":***@" in paragraph
