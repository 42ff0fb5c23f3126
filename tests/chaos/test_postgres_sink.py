"""Exactly-once into PostgreSQL under kill -9: ``headwater run --workers 3`` on the embedded
log writes every input record once into an append-only table and a keyed running sum into an
upserted one, while workers are killed mid-stream (the runner restarts them). Both tables are
compared with a reference computed from the input alone.

Kills from outside land between checkpoints, where the rows since the last one are still in the
writer's buffer: they cost a replay and nothing else. The dangerous moment is the gap between
the sink's database commit and the commit of the input offsets on the log, a few milliseconds;
so the pipeline's own sink also kills its worker there, twice (a kill -9 of itself right after
a flush that wrote rows), and the rows the replay brings again must not be written twice."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections import Counter
from pathlib import Path

from support.cli import background, wait_until
from support.postgres import execute, postgres_url, query, table_name
from support.processes import worker_pids

from connectors.postgres import OFFSETS_TABLE

N = 40_000
USERS = 97
KILLS = 3
"""Kills from outside."""
CRASHES = 2
"""Kills of a worker by itself, between the database commit and the log commit."""

MODULE = """
import os
import signal
import time
from pathlib import Path

from connectors.memory import Iterable
from connectors.postgres import PostgresSink
from pipelines import Pipeline, Topic

URL = os.environ["HEADWATER_TEST_POSTGRES"]
CRASHES = Path(os.environ["PG_CHAOS_CRASHES"])


# kills its worker right after a flush that wrote rows, while a crash token is left
class CrashingAfterCommit(PostgresSink):
    def open(self, ctx):
        writer = super().open(ctx)
        write, flush = writer.write, writer.flush
        wrote = []

        def write_noting(batch):
            write(batch)
            wrote.append(len(batch))

        async def flush_then_crash():
            await flush()
            if sum(wrote) and time.monotonic() - STARTED > 1:
                for token in sorted(CRASHES.glob("token-*")):
                    try:
                        token.rename(CRASHES / ("used" + token.name.removeprefix("token")))
                    except FileNotFoundError:
                        continue  # another worker took it
                    os.kill(os.getpid(), signal.SIGKILL)
            wrote.clear()

        writer.write, writer.flush = write_noting, flush_then_crash
        return writer


STARTED = time.monotonic()


def events():
    for i in range({n}):
        yield {{"id": i, "user": f"u{{i % {users}}}", "amount": i % 13}}


def slow(value):
    if value["id"] % 2 == 0:
        time.sleep(0.001)  # keeps the workers busy long enough to be killed mid-stream
    return value


pipeline = (
    Pipeline("pgchaos", processing_guarantee="exactly_once")
    .source(
        Iterable(events, batch_size=500, key=lambda v: str(v["id"])),
        into=Topic("events", partitions=6),
    )
    .map("slow", slow)
    .sink(CrashingAfterCommit("{events}", url=URL), step_id="rows")
    .key_by("by-user", lambda v: v["user"])
    .sum("total", of=lambda v: v["amount"])
    .sink(
        PostgresSink("{totals}", url=URL, key=["user"], key_column="user", value_column="total"),
        step_id="totals",
    )
)
"""


def reference_totals() -> dict[str, int]:
    """Each user's sum of amounts, from the input alone."""
    totals: Counter[str] = Counter()
    for i in range(N):
        totals[f"u{i % USERS}"] += i % 13
    return dict(totals)


def test_exactly_once_into_postgres_under_kill_9(tmp_path: Path) -> None:
    events, totals = table_name(), table_name()
    execute(
        f'CREATE TABLE {events} (id bigint NOT NULL, "user" text NOT NULL, amount int);'
        f'CREATE TABLE {totals} ("user" text PRIMARY KEY, total bigint NOT NULL)'
    )
    module = tmp_path / "pgchaos.py"
    module.write_text(
        textwrap.dedent(MODULE.format(n=N, users=USERS, events=events, totals=totals))
    )
    count = f"SELECT count(*) FROM {events}"
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    for n in range(CRASHES):
        (crashes / f"token-{n}").touch()
    try:
        kills: list[int] = []  # rows in the events table at each kill
        env = {"HEADWATER_TEST_POSTGRES": postgres_url(), "PG_CHAOS_CRASHES": str(crashes)}
        with background(
            ["run", module, "--workers", "3", "--data-dir", tmp_path / "data"],
            cwd=module.parent,
            name="run",
            env=env,
        ) as runner:
            for _ in range(KILLS):
                before = kills[-1] if kills else 0
                wait_until(
                    lambda before=before: (
                        query(count)[0][0] > before and len(worker_pids(runner.pid)) == 3
                    ),
                    timeout=60,
                    what="new rows and three workers",
                    watch=[runner],
                )
                kills.append(query(count)[0][0])
                assert kills[-1] < N, f"the run was over after {len(kills) - 1} kills: slow it"
                os.kill(worker_pids(runner.pid)[len(kills) % 3], signal.SIGKILL)
                time.sleep(0.5)
            code = runner.wait(timeout=240)
        stderr = runner.stderr()
        assert code == 0, stderr
        assert not list(crashes.glob("token-*")), "the sink did not crash after its commits"
        assert stderr.count("killed by signal 9") == KILLS + CRASHES, stderr
        assert kills == sorted(kills) and kills[-1] < N

        ids = Counter(row[0] for row in query(f"SELECT id FROM {events}"))
        twice = [i for i, n in ids.items() if n > 1]
        assert not twice, f"{len(twice)} records written more than once, e.g. {twice[:5]}"
        assert sorted(ids) == list(range(N))
        assert dict(query(f'SELECT "user", total FROM {totals}')) == reference_totals()
        stored = query(
            f"SELECT step, count(*) FROM {OFFSETS_TABLE} WHERE pipeline = 'pgchaos' GROUP BY step"
        )
        assert dict(stored) == {"rows": 6, "totals": 6}
    finally:
        execute(f"DROP TABLE IF EXISTS {events}; DROP TABLE IF EXISTS {totals}")
        if query("SELECT to_regclass($1)", OFFSETS_TABLE)[0][0] is not None:
            execute(f"DELETE FROM {OFFSETS_TABLE} WHERE pipeline = 'pgchaos'")
