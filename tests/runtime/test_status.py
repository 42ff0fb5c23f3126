"""``headwater status``: from another shell, a running pipeline's workers, partitions, step
counts and lag; a runner killed with kill -9 is reported as not running; a finished run as
finished. Real runs, on the embedded log and on Kafka."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import orjson
import pytest
from support.cli import clean_env, headwater
from support.kafka import KAFKA_BOOTSTRAP

ORDERS = 1000

MODULE = """
import asyncio
from pathlib import Path

import connectors
from pipelines import Pipeline, Topic

GATE = Path(__file__).parent / "gate"


async def orders():
    for i in range({orders}):
        yield {{"id": i}}
    while not GATE.exists():  # the run stays up until the test opens the gate
        await asyncio.sleep(0.05)


pipeline = (
    Pipeline("{name}")
    .source(connectors.Iterable(orders), into=Topic("{name}", partitions=4))
    .filter("odd", lambda order: order["id"] % 2)
    .sink(connectors.LogTopic(Topic("{name}-odd", partitions=2)))
)
"""


def status(tmp_path: Path, log: list[str]) -> dict[str, object]:
    done = headwater("status", "shop.py", "--json", *log, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = orjson.loads(done.stdout)
    assert isinstance(found, dict)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["embedded", "kafka"])
def test_status_of_a_running_a_killed_and_a_finished_run(tmp_path: Path, backend: str) -> None:
    name = f"shop-{uuid.uuid4().hex[:8]}"
    (tmp_path / "shop.py").write_text(textwrap.dedent(MODULE.format(orders=ORDERS, name=name)))
    log = ["--backend", backend]
    log += ["--bootstrap-servers", KAFKA_BOOTSTRAP] if backend == "kafka" else []
    assert status(tmp_path, log)["outcome"] == "never run here"

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "run",
                "shop.py",
                "--workers",
                "2",
                "--no-progress",
                *log,
            ],
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    runner = start()
    try:
        deadline = time.monotonic() + 60
        while True:
            now = status(tmp_path, log)
            steps = now.get("steps", {})
            assert isinstance(steps, dict)
            workers = now.get("workers", {})
            assert isinstance(workers, dict)
            # each worker reports twice a second: right after a rebalance one may still list
            # partitions it has since handed over
            owned = [p for w in workers.values() if not w["done"] for p in w["partitions"]]
            settled = sorted(owned) == sorted(f"{name}[{p}]" for p in range(4))
            if (
                steps.get("odd", {}).get("in") == ORDERS
                and not sum(now["lag"].values())
                and settled
            ):
                break
            assert runner.poll() is None, runner.communicate()[1]
            assert time.monotonic() < deadline, f"status never showed the whole input: {now}"
            time.sleep(0.3)
        assert now["outcome"] == "running" and now["runner_alive"] is True
        assert now["runner_pid"] == runner.pid
        assert steps["odd"] == {
            "in": ORDERS,
            "out": ORDERS // 2,
            "skipped": 0,
            "dead_lettered": 0,
            "late": 0,
        }
        owned = [p for w in now["workers"].values() if not w["done"] for p in w["partitions"]]
        assert sorted(owned) == sorted(f"{name}[{p}]" for p in range(4)), now["workers"]
        assert now["sources"] == {name: ORDERS}
    finally:
        os.killpg(runner.pid, signal.SIGKILL)  # the runner and its workers, without a word
        runner.wait(timeout=30)
    killed = status(tmp_path, log)
    assert killed["runner_alive"] is False
    assert str(killed["outcome"]).startswith("not running (its runner died")

    (tmp_path / "gate").touch()
    again = start()
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    finished = status(tmp_path, log)
    assert finished["outcome"] == "finished" and finished["runner_alive"] is False
    assert sum(finished["lag"].values()) == 0


def test_status_reads_as_lines_for_a_person(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(textwrap.dedent(MODULE.format(orders=10, name="shop")))
    (tmp_path / "gate").touch()
    run = headwater("run", "shop.py", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    done = headwater("status", "shop.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("shop: finished (runner pid ")
    assert "  odd: 10 in, 5 out" in lines
    assert lines[-1] == "  lag: 0 records"
