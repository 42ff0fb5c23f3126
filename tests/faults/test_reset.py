"""``headwater reset``: after a reset the next run starts afresh, with one copy of its output.

Through the command line on real pipeline modules: a run, a reset, a run again that processes
everything (sources re-read, state recounted) and leaves one copy in its JSON Lines file; a
reset refused while a runner runs the pipeline, without ``--yes`` and no terminal, and asking on
a terminal; ``--keep-outputs`` and ``--dead-letters``; and the same on the Kafka test broker,
whose consumer group and internal topics go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from support.cli import assert_user_error, headwater
from support.kafka import KAFKA_BOOTSTRAP

MODULE = """
import connectors
from pipelines import Pipeline, Topic

LETTERS = [{{"c": c, "n": i}} for i, c in enumerate("abcdefghij" * 3)]

pipeline = (
    Pipeline({name!r})
    .source(connectors.Iterable(LETTERS + [b"not json"]), into=Topic({topic!r}, partitions=3))
    .key_by("by-letter", lambda v: v["c"])
    .count("count")
    .sink(connectors.JsonLinesSink("out.jsonl"), step_id="file")
)
"""

FOLLOWING = """
import connectors
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("tail")
    .source(connectors.JsonLines("in.jsonl", follow=True), into=Topic("lines"))
    .sink(connectors.JsonLinesSink("out.jsonl"), step_id="file")
)
"""


def module(tmp_path: Path, name: str = "letters", topic: str = "letters") -> Path:
    path = tmp_path / "letters.py"
    path.write_text(textwrap.dedent(MODULE.format(name=name, topic=topic)))
    return path


def ran(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stderr


def output_counts(tmp_path: Path) -> Counter[tuple[object, object]]:
    """Each (key, count) line of the output (its time is the time the run read the input)."""
    lines = map(orjson.loads, (tmp_path / "out.jsonl").read_bytes().splitlines())
    return Counter((line["key"], line["value"]) for line in lines)


def test_after_a_reset_a_run_processes_everything_again_with_one_copy_of_the_output(
    tmp_path: Path,
) -> None:
    path = module(tmp_path)
    assert "file: 30 in, 30 out" in ran(headwater("run", path, "--no-progress", cwd=tmp_path))
    first = output_counts(tmp_path)
    assert sum(first.values()) == 30
    assert "file: 0 in, 0 out" in ran(headwater("run", path, "--no-progress", cwd=tmp_path))

    reset = headwater("reset", path, "--yes", cwd=tmp_path)
    assert reset.returncode == 0, reset.stderr
    said = reset.stdout
    for removed in (
        "removed committed offsets of consumer group 'letters'",
        "removed topic 'letters.source-positions'",
        "removed topic 'letters':",
        "removed topic 'letters.by-letter'",
        "removed topic 'letters.count.changelog'",
        "removed topic 'letters.marks-0.changelog'",
        f"removed directory {Path('.headwater', 'state', 'letters')}{os.sep}",
        "removed file out.jsonl",
        "kept topic 'letters.dead-letters'",
        "the next run of 'letters' starts from the beginning",
    ):
        assert removed in said, said
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / ".headwater" / "groups" / "letters").exists()

    again = ran(headwater("run", path, "--no-progress", cwd=tmp_path))
    assert "source letters: 31 records written" in again
    assert "file: 30 in, 30 out" in again
    assert output_counts(tmp_path) == first  # one copy, counted from zero again


def test_nothing_to_reset_creates_nothing(tmp_path: Path) -> None:
    result = headwater("reset", module(tmp_path), "--yes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to reset for pipeline 'letters'" in result.stdout
    assert not (tmp_path / ".headwater").exists()


def test_keep_outputs_keeps_the_file_and_dead_letters_go_only_when_asked(tmp_path: Path) -> None:
    path = module(tmp_path)
    ran(headwater("run", path, "--no-progress", cwd=tmp_path))
    before = (tmp_path / "out.jsonl").read_bytes()
    first = output_counts(tmp_path)

    kept = headwater("reset", path, "--yes", "--keep-outputs", cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert "kept file out.jsonl" in kept.stdout
    assert "kept topic 'letters.dead-letters'" in kept.stdout
    assert (tmp_path / "out.jsonl").read_bytes() == before
    assert (tmp_path / ".headwater" / "topics" / "letters.dead-letters").is_dir()

    refused = headwater("run", path, "--no-progress", cwd=tmp_path)
    assert_user_error(refused, "its sinks already hold output: file ('out.jsonl' holds")
    (tmp_path / "out.jsonl").rename(tmp_path / "kept.jsonl")
    ran(headwater("run", path, "--no-progress", cwd=tmp_path))
    assert output_counts(tmp_path) == first

    everything = headwater("reset", path, "--yes", "--dead-letters", cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    assert "removed topic 'letters.dead-letters'" in everything.stdout
    assert not (tmp_path / ".headwater" / "topics" / "letters.dead-letters").exists()
    assert not (tmp_path / "out.jsonl").exists()


def test_reset_without_yes_and_without_a_terminal_is_refused(tmp_path: Path) -> None:
    path = module(tmp_path)
    ran(headwater("run", path, "--no-progress", cwd=tmp_path))
    result = headwater("reset", path, cwd=tmp_path)
    assert_user_error(
        result,
        "resetting pipeline 'letters' on the embedded log in .headwater removes",
        "standard input is not a terminal",
        "pass --yes",
        "Nothing was removed",
    )
    assert (tmp_path / "out.jsonl").exists()
    assert (tmp_path / ".headwater" / "groups" / "letters").is_dir()


def on_a_terminal(path: Path, cwd: Path, answer: bytes) -> subprocess.CompletedProcess[str]:
    """``headwater reset`` with a terminal as standard input, answering ``answer``."""
    main, terminal = pty.openpty()
    try:
        os.write(main, answer)
        return headwater("reset", path, cwd=cwd, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(main)


def test_reset_on_a_terminal_shows_the_list_and_asks(tmp_path: Path) -> None:
    path = module(tmp_path)
    ran(headwater("run", path, "--no-progress", cwd=tmp_path))

    declined = on_a_terminal(path, tmp_path, b"n\n")
    assert declined.returncode == 0, declined.stderr
    assert "resetting pipeline 'letters' on the embedded log in .headwater removes:" in (
        declined.stdout
    )
    assert "  file out.jsonl: output of JsonLinesSink step 'file'" in declined.stdout
    assert "Reset pipeline 'letters'? [y/N]" in declined.stdout
    assert "nothing was removed" in declined.stdout
    assert (tmp_path / "out.jsonl").exists()

    accepted = on_a_terminal(path, tmp_path, b"y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert "removed file out.jsonl" in accepted.stdout
    assert not (tmp_path / "out.jsonl").exists()


@contextlib.contextmanager
def interrupted_run(path: Path, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """``headwater run`` in the background; stopped with SIGINT (then killed) afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(path), "--no-progress"],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,  # its own group: killed with its workers if it does not stop
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def wait_while_running(
    condition: str, check: Callable[[], object], process: subprocess.Popen[str]
) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"gave up waiting for {condition}"
        time.sleep(0.05)


def test_reset_is_refused_while_a_runner_runs_the_pipeline(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b'{"n": 1}\n{"n": 2}\n')
    path = tmp_path / "tail.py"
    path.write_text(textwrap.dedent(FOLLOWING))
    out = tmp_path / "out.jsonl"
    with interrupted_run(path, tmp_path) as runner:
        wait_while_running(
            "the run's first output", lambda: out.exists() and out.stat().st_size, runner
        )
        result = headwater("reset", path, "--yes", cwd=tmp_path)
        assert_user_error(
            result,
            "cannot reset pipeline 'tail': it is running on data directory .headwater",
            f"(runner pid {runner.pid})",
            "stop it first",
            "Nothing was removed",
        )
        assert out.read_bytes().count(b"\n") == 2
        assert (tmp_path / ".headwater" / "groups" / "tail").is_dir()
    assert runner.returncode == 130, runner.stderr
    done = headwater("reset", path, "--yes", cwd=tmp_path)  # once it has stopped
    assert done.returncode == 0, done.stderr
    assert not out.exists()


# -- Kafka -------------------------------------------------------------------------------------


async def _kafka_state(group: str, run: str) -> tuple[set[str], bool]:
    """The topics whose name holds ``run``, and whether ``group`` exists, on the test broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP, request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(admin.start(), 30)
        topics = {t for t in await admin.list_topics() if run in t}
        groups = {g[0] for g in await admin.list_consumer_groups()}
        return topics, group in groups
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def kafka_state(group: str, run: str) -> tuple[set[str], bool]:
    try:
        return asyncio.run(_kafka_state(group, run))
    except Exception as error:
        pytest.fail(
            f"no Kafka broker answers at {KAFKA_BOOTSTRAP} (HEADWATER_TEST_KAFKA): {error}; "
            "start one with `bash scripts/kafka.sh start`",
            pytrace=False,
        )


def test_kafka_reset_deletes_the_group_and_the_internal_topics(tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:10]
    name, topic = f"reset-{run}", f"letters-{run}"
    path = module(tmp_path, name=name, topic=topic)
    kafka = ["--backend", "kafka", "--bootstrap-servers", KAFKA_BOOTSTRAP]
    kafka_state(name, run)  # the broker answers
    ran(headwater("run", path, "--no-progress", *kafka, cwd=tmp_path))
    first = output_counts(tmp_path)
    topics, group = kafka_state(name, run)
    assert group
    assert {topic, f"{name}.source-positions", f"{name}.by-letter"} <= topics

    reset = headwater("reset", path, "--yes", *kafka, cwd=tmp_path)
    assert reset.returncode == 0, reset.stderr
    assert f"removed committed offsets of consumer group '{name}'" in reset.stdout
    assert "on the other machines that ran workers" in reset.stdout
    topics, group = kafka_state(name, run)
    assert not group
    assert topics == {f"{name}.dead-letters"}

    again = ran(headwater("run", path, "--no-progress", *kafka, cwd=tmp_path))
    assert "file: 30 in, 30 out" in again
    assert output_counts(tmp_path) == first
    cleanup = headwater("reset", path, "--yes", "--dead-letters", *kafka, cwd=tmp_path)
    assert cleanup.returncode == 0, cleanup.stderr
    assert kafka_state(name, run) == (set(), False)


@pytest.mark.parametrize("backend", ["embedded", "memory"])
def test_a_fresh_start_over_earlier_output_is_refused(tmp_path: Path, backend: str) -> None:
    """The data directory deleted by hand (or an in-memory run repeated): the log remembers
    nothing, the file sink holds the first run's output, and a second copy is refused."""
    module(tmp_path)
    ran(headwater("run", "letters.py", cwd=tmp_path))
    first = output_counts(tmp_path)
    # resumed from what the log remembers, the output already there is no reason to refuse
    ran(headwater("run", "letters.py", cwd=tmp_path))
    assert output_counts(tmp_path) == first
    subprocess.run(["rm", "-rf", str(tmp_path / ".headwater")], check=True)
    again = headwater("run", "letters.py", "--backend", backend, cwd=tmp_path)
    assert_user_error(
        again,
        "pipeline 'letters' starts afresh",
        "its sinks already hold output: file ('out.jsonl' holds",
        "Running would add a second copy after it",
        "`headwater reset letters.py`",
    )
    assert output_counts(tmp_path) == first
