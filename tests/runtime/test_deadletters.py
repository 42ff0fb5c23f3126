"""``headwater dlq list|show|replay``, end to end with real runs on the embedded log and on
Kafka: a step rejects every tenth order; once it is fixed, the replayed dead letters are
processed, and every order is in the output exactly once (the reference is the input file)."""

from __future__ import annotations

import subprocess
import textwrap
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from support.cli import assert_user_error, headwater
from support.kafka import KAFKA_BOOTSTRAP

ORDERS = 200

MODULE = """
from pathlib import Path

from connectors import JsonLines, JsonLinesSink
from pipelines import Pipeline, Topic

HERE = Path(__file__).parent


def total(order):
    if order["id"] % 10 == 0 and not (HERE / "fixed").exists():
        raise ValueError("no price list for this order")
    return {{"id": order["id"], "total": order["price"] * 2}}


pipeline = (
    Pipeline("{name}")
    .source(JsonLines(HERE / "orders.jsonl"), into=Topic("{topic}", partitions=3))
    .map("total", total)
    .sink(JsonLinesSink(HERE / "totals.jsonl"))
)
"""


def ok(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = headwater(*args, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, f"headwater {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


def total_ids(tmp_path: Path) -> Counter[int]:
    lines = (tmp_path / "totals.jsonl").read_bytes().splitlines()
    return Counter(orjson.loads(line)["id"] for line in lines)


@pytest.mark.parametrize("backend", ["embedded", "kafka"])
def test_fix_the_step_replay_its_dead_letters_and_every_record_is_processed_once(
    tmp_path: Path, backend: str
) -> None:
    run = uuid.uuid4().hex[:8]
    name, topic = f"orders-{run}", f"orders-{run}"
    (tmp_path / "orders.py").write_text(textwrap.dedent(MODULE.format(name=name, topic=topic)))
    (tmp_path / "orders.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": i, "price": i / 10}) + b"\n" for i in range(ORDERS))
    )
    log = ["--backend", backend]
    log += ["--bootstrap-servers", KAFKA_BOOTSTRAP] if backend == "kafka" else ["--data-dir", "log"]
    bad = Counter(range(0, ORDERS, 10))
    good = Counter(range(ORDERS)) - bad

    ok(tmp_path, "run", "orders.py", "--workers", "2", "--no-progress", *log)
    assert total_ids(tmp_path) == good

    listed = ok(tmp_path, "dlq", "list", "orders.py", *log).stdout
    (line,) = listed.splitlines()
    step, kind, count, replayed, example = line.split("\t")
    assert (step, kind, count, replayed) == ("total", "ValueError", "20 dead letters", "0 replayed")
    assert example.startswith("e.g. total (orders.py:10) raised ValueError: no price list")

    shown = ok(tmp_path, "dlq", "show", "orders.py", "--step", "total", "-n", "3", *log)
    letters = [orjson.loads(line) for line in shown.stdout.splitlines()]
    assert len(letters) == 3
    for letter in letters:
        assert orjson.loads(letter["value"])["id"] in bad
        assert letter["headers"]["headwater.step"] == "total"
        assert letter["headers"]["headwater.source.topic"] == topic

    (tmp_path / "fixed").touch()
    replayed_now = ok(tmp_path, "dlq", "replay", "orders.py", *log).stdout
    assert replayed_now.splitlines() == ["total: 20 dead letters replayed"]
    again = ok(tmp_path, "dlq", "replay", "orders.py", *log).stdout
    assert again.splitlines() == ["total: 0 dead letters replayed"]  # each one once

    ok(tmp_path, "run", "orders.py", "--no-progress", *log)
    assert total_ids(tmp_path) == Counter(range(ORDERS))  # every order once
    listed = ok(tmp_path, "dlq", "list", "orders.py", *log).stdout
    assert listed.split("\t")[3] == "20 replayed"


def test_replaying_a_step_without_dead_letters_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(textwrap.dedent(MODULE.format(name="o", topic="o")))
    (tmp_path / "orders.jsonl").write_bytes(b'{"id": 1, "price": 1}\n')
    ok(tmp_path, "run", "orders.py", "--no-progress")
    done = headwater("dlq", "replay", "orders.py", "--step", "totl", cwd=tmp_path)
    assert_user_error(done, "no dead letters of step 'totl'; steps with dead letters: none")
