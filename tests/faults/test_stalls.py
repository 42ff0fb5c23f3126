"""A user function that hangs, one that runs over its ``timeout=``, a transient log error, and
being stopped twice: what the user sees, how soon the run stops, and that nothing is lost.

Real ``headwater run`` processes, real signals; outputs compared with the input alone."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support.cli import Cli, background, headwater, wait_until, write_module

from connectors.memory import Collect, Iterable
from pipelines import Pipeline, Topic
from pipelines.errors import PipelineDefinitionError
from pipelines.testing import run_pipeline

N = 300
HANGS_AT = 120

HANGING = f"""
import os
import time

import connectors
from pipelines import Pipeline, Topic


def enrich(value):
    if value["n"] == {HANGS_AT} and os.environ.get("HANG") == "sleep":
        time.sleep(3600)
    if value["n"] == {HANGS_AT} and os.environ.get("HANG") == "stubborn":
        while True:  # swallows every interruption: only killing the process stops it
            try:
                time.sleep(3600)
            except BaseException:
                pass
    return {{**value, "enriched": True}}


pipeline = (
    Pipeline("stall")
    .source(connectors.Iterable([{{"n": n}} for n in range({N})]), into=Topic("in"))
    .map("enrich", enrich)
    .sink(connectors.JsonLinesSink("out.jsonl"))
)
"""


def output_numbers(directory: Path) -> list[int]:
    lines = (directory / "out.jsonl").read_bytes().splitlines()
    return sorted(orjson.loads(line)["n"] for line in lines)


@contextlib.contextmanager
def hung_run(tmp_path: Path, hang: str, *, workers: int) -> Iterator[Cli]:
    """``headwater run`` of HANGING with ``--stall-after 1``, once it has reported the stall."""
    module = write_module(tmp_path / "stall.py", HANGING)
    with background(
        [
            "run",
            module,
            "--workers",
            str(workers),
            "--data-dir",
            tmp_path / ".headwater",
            "--stall-after",
            "1",
        ],
        cwd=module.parent,
        name=hang,
        env={"HANG": hang},
    ) as runner:
        wait_until(
            lambda: "has not returned" in runner.stderr(),
            timeout=30,
            what="the stall report",
            watch=[runner],
        )
        yield runner


def test_a_hung_step_is_reported_and_a_stop_does_not_wait_for_it(tmp_path: Path) -> None:
    with hung_run(tmp_path, "sleep", workers=1) as runner:
        os.kill(runner.pid, signal.SIGTERM)
        stopped_at = time.monotonic()
        code = runner.wait(timeout=20)
        stop_seconds = time.monotonic() - stopped_at
    stderr = runner.stderr()
    assert "Traceback" not in stderr, stderr
    # where it is: worker, step, the records in hand, and the user's file and line
    assert "worker 0: step 'enrich' has not returned for 1 s, on in[0] offsets 0-" in stderr, stderr
    assert "stall.py:" in stderr and "in enrich" in stderr, stderr
    # stopped at once, not after the 30 s grace period; the batch is abandoned, not committed
    assert stop_seconds < 5, (stop_seconds, stderr)
    assert "did not stop in time" not in stderr, stderr
    assert "worker 0 stopped in step 'enrich', on in[0] offsets 0-" in stderr, stderr
    assert "processed again when the pipeline runs" in stderr, stderr
    assert code == 128 + signal.SIGTERM, stderr

    again = headwater("run", "stall.py", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "lag: 0 records" in again.stderr, again.stderr
    # at-least-once into a file: every input record is there, the hung one included
    assert set(output_numbers(tmp_path)) == set(range(N))


def test_a_second_ctrl_c_kills_a_worker_that_will_not_stop(tmp_path: Path) -> None:
    with hung_run(tmp_path, "stubborn", workers=2) as runner:
        os.killpg(runner.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        time.sleep(2.5)
        assert runner.process.poll() is None, "the run stopped although a step swallows stops"
        os.killpg(runner.pid, signal.SIGINT)
        again_at = time.monotonic()
        code = runner.wait(timeout=20)
        assert time.monotonic() - again_at < 3
    stderr = runner.stderr()
    assert "Traceback" not in stderr, stderr
    assert "stopped at once: the workers were killed" in stderr, stderr
    assert code == 128 + signal.SIGINT, stderr

    again = headwater("run", "stall.py", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert set(output_numbers(tmp_path)) == set(range(N))


# -- timeout= ---------------------------------------------------------------------------------


def slow_at_three(value: int) -> int:
    if value == 3:
        time.sleep(30)
    return value * 10


def test_a_call_over_its_timeout_follows_the_error_policy() -> None:
    pipeline = (
        Pipeline("p")
        .source(Iterable(list(range(6))), into=Topic("in"))
        .map("slow", slow_at_three, timeout=0.3)
        .sink(Collect(), step_id="out")
    )
    started = time.monotonic()
    result = run_pipeline(pipeline)
    assert time.monotonic() - started < 10
    assert sorted(result.values("out")) == [0, 10, 20, 40, 50]
    (dead,) = result.dead_letters
    headers = {name: value.decode() for name, value in dead.headers}
    assert headers["headwater.step"] == "slow"
    assert headers["headwater.error.type"] == "StepTimeout"
    # where the function is defined, and the line it was stuck on when the time ran out
    defined = slow_at_three.__code__.co_firstlineno
    here = os.path.relpath(__file__)
    assert headers["headwater.error"] == (
        f"slow_at_three ({here}:{defined}) raised StepTimeout: did not return within 0.3 s "
        f"at {here}:{defined + 2}"
    )
    assert headers["headwater.source.offset"] == "3"


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "peek"])
def test_timeout_bounds_every_function_step(method: str) -> None:
    def slow(value: int) -> list[int]:
        if value == 1:
            time.sleep(30)
        return [value]

    pipeline = Pipeline("p").source(Iterable([0, 1, 2]), into=Topic("in"))
    pipeline = getattr(pipeline, method)("slow", slow, timeout=0.2).sink(Collect(), step_id="out")
    result = run_pipeline(pipeline)
    assert len(result.dead_letters) == 1
    assert len(result.values("out")) == 2


@pytest.mark.parametrize("timeout", [0, -1, "5", True])
def test_timeout_must_be_a_positive_number(timeout: object) -> None:
    with pytest.raises(PipelineDefinitionError, match="timeout must be a positive number"):
        Pipeline("p").source(Iterable([1]), into=Topic("in")).map("m", abs, timeout=timeout)  # type: ignore[arg-type]


TIMED = """
import time

import connectors
from pipelines import Pipeline, Topic


def slow(value):
    if value["n"] == 7:
        time.sleep(60)
    return value


pipeline = (
    Pipeline("timed")
    .source(connectors.Iterable([{"n": n} for n in range(20)]), into=Topic("in", partitions=2))
    .map("slow", slow, timeout=0.5)
    .sink(connectors.JsonLinesSink("out.jsonl"))
)
"""


def test_timeout_in_a_worker_process(tmp_path: Path) -> None:
    write_module(tmp_path / "timed.py", TIMED)
    started = time.monotonic()
    result = headwater("run", "timed.py", "--workers", "2", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert "slow: 20 in, 19 out, 1 to dead letters" in result.stderr, result.stderr
    assert output_numbers(tmp_path) == [n for n in range(20) if n != 7]
    tail = headwater("topics", "tail", "timed.dead-letters", cwd=tmp_path)
    assert "did not return within 0.5 s" in tail.stdout, tail.stdout


# -- transient log errors ---------------------------------------------------------------------

TRANSIENT = """
from pathlib import Path

import connectors
from connectors.base import Sink, SinkWriter
from pipelines import Pipeline, Topic
from pipelines.errors import LogError


class Flaky(SinkWriter):
    broken = False

    def __init__(self):
        self.values = []

    def write(self, batch):
        self.values.extend(batch.values)

    async def flush(self):
        failures = Path("failures")
        if failures.read_text() != "":  # a connection that stays broken in this process
            failures.write_text(failures.read_text()[1:])
            Flaky.broken = True
        if Flaky.broken:
            raise LogError("the log did not answer in time", retriable=True)
        with open("out.txt", "a") as out:
            out.writelines(f"{v}\\n" for v in self.values)
        self.values.clear()


class FlakySink(Sink):
    def open(self, ctx):
        return Flaky()


pipeline = (
    Pipeline("transient")
    .source(connectors.Iterable(list(range(50))), into=Topic("in"))
    .sink(FlakySink())
)
"""


def test_a_transient_log_error_restarts_the_worker(tmp_path: Path) -> None:
    write_module(tmp_path / "transient.py", TRANSIENT)
    (tmp_path / "failures").write_text("x")  # the first flush fails
    result = headwater("run", "transient.py", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "worker 0 stopped on a transient error: the log did not answer" in result.stderr
    assert "worker 1 started in place of worker 0" in result.stderr, result.stderr
    assert "lag: 0 records" in result.stderr, result.stderr
    # at-least-once: the restarted worker processes what was not committed
    lines = (tmp_path / "out.txt").read_text().split()
    assert set(map(int, lines)) == set(range(50))


def test_a_transient_error_ends_the_run_without_restarts(tmp_path: Path) -> None:
    write_module(tmp_path / "transient.py", TRANSIENT)
    (tmp_path / "failures").write_text("x")
    result = headwater("run", "transient.py", "--restart", "never", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "worker 0 stopped: the log did not answer in time" in result.stderr, result.stderr
