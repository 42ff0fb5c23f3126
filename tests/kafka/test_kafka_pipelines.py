"""Headwater pipelines on a real Kafka broker, end to end through the ``background`` command line.

Every test starts ``python -m pipelines.cli run|worker|topics ... --backend kafka`` as a
subprocess (in its own session, so its worker processes can be killed with it), and checks the
outcome with plain aiokafka clients, as any other Kafka user would: record by record against a
reference computed here in plain Python.

- the clickstream example gives the same output on ``kafka`` as on ``embedded``;
- ``kill -9`` of one of three workers mid-stream, then a ``headwater worker`` joining the group:
  partitions move, and every input record reaches the output;
- a broker restart mid-run: the pipeline reconnects and loses nothing;
- records written by another client: bad ones go to ``<pipeline>.dead-letters`` with headers
  saying why, keys and headers are read, and a topic sink is readable by another client;
- an unreachable broker, a topic with another partition count: one clear paragraph, status 2;
- the SASL password never shows.

Topic, pipeline and group names are unique per test (:func:`conftest.kafka_names`): the broker
is shared and keeps what earlier runs wrote.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord, RecordMetadata
from support.cli import background, clean_env, summary_counts, tail, wait_until
from support.kafka import admin, committed_offsets, consumer, create_topic, end_offsets
from support.processes import worker_pids
from test_example import (
    check_report,
    clickstream_reference,
    page_minute_counts,
    parse_report,
    sink_rows,
)

from pipelines.runtime.watermarks import END_OF_TIME, MARKER_PREFIX, is_marker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "clickstream"

RUN_TIMEOUT = 90.0
"""Seconds one ``background`` command may take before the test gives up on it (and kills it)."""

Names = Callable[[str], str]


# -- running headwater -------------------------------------------------------------------------


def kafka_flags(bootstrap: str, *more: str) -> list[str]:
    return ["--backend", "kafka", "--bootstrap-servers", bootstrap, *more]


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_headwater(
    args: Sequence[str],
    *,
    cwd: Path,
    name: str,
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT,
) -> Finished:
    """``headwater ARGS`` to the end."""
    started = time.monotonic()
    with background(args, cwd=cwd, name=name, env=env) as cli:
        code = cli.wait(timeout)
    return Finished(code, cli.stdout(), cli.stderr(), time.monotonic() - started)


def paragraph(text: str) -> str:
    """A message wrapped for the terminal, as one line again."""
    return " ".join(re.sub(r"-\n", "-", text).split())


# -- talking to Kafka as another client ----------------------------------------------------------


def topic_partitions(bootstrap: str, name: str) -> int | None:
    """The partition count of topic ``name``, or None if it does not exist."""

    async def describe() -> int | None:
        async with admin(bootstrap) as client:
            if name not in await client.list_topics():
                return None
            [found] = await client.describe_topics([name])
            return len(found["partitions"])

    return asyncio.run(describe())


@dataclass(frozen=True)
class Sent:
    key: str | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def produce_records(bootstrap: str, topic: str, records: Sequence[Sent]) -> list[RecordMetadata]:
    """Write ``records`` in order with a plain aiokafka producer (partitioned by key, as Kafka's
    default partitioner does); return where each landed."""

    async def send() -> list[RecordMetadata]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            futures = [
                await producer.send(
                    topic,
                    value=r.value,
                    key=None if r.key is None else r.key.encode(),
                    headers=list(r.headers),
                )
                for r in records
            ]
            return [await future for future in futures]
        finally:
            await producer.stop()

    return asyncio.run(send())


def end_of_time_key(source: str) -> bytes:
    """The key of the marker source step ``source`` writes to each partition of its topic when
    it reaches the end of its input."""
    return MARKER_PREFIX + f"{source}|{END_OF_TIME}".encode()


@dataclass
class KafkaContents:
    """What a topic holds: its data records, and apart from them its watermark markers."""

    records: list[ConsumerRecord[Any, Any]]
    markers: list[ConsumerRecord[Any, Any]]
    ends: dict[int, int]
    """Partition -> its end offset (records and markers)."""


def read_kafka_topic(bootstrap: str, name: str, partitions: int) -> KafkaContents:
    """Every record on topic ``name``, partition by partition, with a plain aiokafka consumer;
    the markers apart."""

    async def read() -> KafkaContents:
        async with consumer(bootstrap) as client:
            tps = [TopicPartition(name, p) for p in range(partitions)]
            client.assign(tps)
            ends = await client.end_offsets(tps)
            await client.seek_to_beginning(*tps)
            contents = KafkaContents([], [], {tp.partition: ends[tp] for tp in tps})
            deadline = time.monotonic() + 60
            todo = [tp for tp in tps if ends[tp] > 0]
            while todo:
                fetched = await client.getmany(*todo, timeout_ms=500, max_records=20_000)
                for tp, messages in fetched.items():
                    for message in messages:
                        if message.offset < ends[tp]:
                            found = (
                                contents.markers
                                if is_marker(message.key, message.value)
                                else contents.records
                            )
                            found.append(message)
                todo = [tp for tp in todo if await client.position(tp) < ends[tp]]
                assert time.monotonic() < deadline, f"reading {name} took over 60s"
            return contents

    return asyncio.run(read())


def read_records(bootstrap: str, name: str, partitions: int) -> list[ConsumerRecord[Any, Any]]:
    """Every record on topic ``name``, which no marker goes to (only a source's topic and a
    ``key_by`` topic hold markers): one there fails the test."""
    contents = read_kafka_topic(bootstrap, name, partitions)
    assert not contents.markers, f"markers on {name}: {contents.markers[:3]}"
    return contents.records


@dataclass(frozen=True)
class GroupMember:
    client_id: str
    partitions: frozenset[int]


def describe_group(bootstrap: str, group: str, topic: str) -> tuple[str, list[GroupMember]]:
    """The group's state and its members, each with the partitions of ``topic`` it owns."""

    async def describe() -> tuple[str, list[GroupMember]]:
        async with admin(bootstrap) as client:
            [response] = await client.describe_consumer_groups([group])
        group_info = response.to_object()["groups"][0]
        members = []
        for member in group_info["members"]:
            owned: frozenset[int] = frozenset()
            if member["member_assignment"]:
                assignment = ConsumerProtocolMemberAssignment.decode(member["member_assignment"])
                owned = frozenset(p for t, ps in assignment.assignment if t == topic for p in ps)
            members.append(GroupMember(member["client_id"], owned))
        return group_info["state"], members

    return asyncio.run(describe())


def splits_partitions(members: Sequence[GroupMember], partitions: int) -> bool:
    """Whether the members own every partition, each exactly once."""
    owned = [p for m in members for p in m.partitions]
    return sorted(owned) == list(range(partitions))


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in the Java client) picks."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(key, every, every))


# -- 1. the clickstream example: kafka == embedded ------------------------------------------------

CLICK_EVENTS = 100_000
"""As many as the example's generator writes by default (test_example's reference expects it)."""


def _renamed_copy(source: Path, directory: Path, renames: dict[str, str]) -> Path:
    """A copy of ``source`` in ``directory`` with each of ``renames`` made once, nothing else."""
    text = source.read_text()
    for old, new in renames.items():
        assert text.count(old) == 1, f"{source.name} no longer contains {old} exactly once"
        text = text.replace(old, new)
    path = directory / f"{source.stem}_kafka.py"
    path.write_text(text)
    return path


def _summary(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(" finished"))
    return lines[start:]


def _late(stderr: str) -> int:
    """The records the windowed step found late, from the run's summary."""
    found = re.search(r"^  views-per-minute: .* out(?:, (\S+) late)?$", stderr, re.MULTILINE)
    assert found, stderr
    return int((found[1] or "0").replace(",", ""))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_clickstream_example_gives_the_same_result_on_kafka_as_embedded(
    kafka: str, kafka_names: Names, tmp_path: Path
) -> None:
    clicks = tmp_path / "clicks.jsonl"
    generated = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "generate.py"),
            "--events",
            str(CLICK_EVENTS),
            "--out",
            str(clicks),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert generated.returncode == 0, generated.stderr
    ref = clickstream_reference(clicks)
    assert ref.bad, "the generated input has no bad line to dead-letter"
    assert ref.beyond, "the generated input has no click beyond the window's lateness"

    embedded = run_headwater(
        [
            "run",
            str(EXAMPLE / "pipeline.py"),
            "--workers",
            "2",
            "--no-progress",
            "--data-dir",
            str(tmp_path / "embedded-log"),
        ],
        cwd=tmp_path,
        name="embedded",
        env={"CLICKS_INPUT": str(clicks), "CLICKS_OUTPUT": str(tmp_path / "embedded")},
    )
    assert embedded.code == 0, embedded.stderr

    # The example's pipeline and topic names are fixed and the broker keeps earlier runs'
    # topics and offsets: run a copy with unique names, in a fresh consumer group.
    pipeline_name, topic_name = kafka_names("clickstream"), kafka_names("clicks")
    group = kafka_names("clickstream-group")
    module = _renamed_copy(
        EXAMPLE / "pipeline.py",
        tmp_path,
        {
            'Pipeline("clickstream")': f'Pipeline("{pipeline_name}")',
            'Topic("clicks",': f'Topic("{topic_name}",',
        },
    )
    on_kafka = run_headwater(
        [
            "run",
            str(module),
            "--workers",
            "2",
            "--no-progress",
            *kafka_flags(kafka, "--group-id", group),
        ],
        cwd=tmp_path,
        name="kafka",
        env={"CLICKS_INPUT": str(clicks), "CLICKS_OUTPUT": str(tmp_path / "kafka")},
    )
    assert on_kafka.code == 0, on_kafka.stderr
    assert "Traceback" not in on_kafka.stderr

    # Both count what the example means (each page-minute once, within the reference's bounds:
    # a click beyond the lateness is late or counted, depending on timing) ...
    outputs = {}
    for run, name in ((embedded, "embedded"), (on_kafka, "kafka")):
        minutes = page_minute_counts(sink_rows(tmp_path / name / "page-minutes.jsonl"))
        ref.check_counts(minutes, _late(run.stderr))
        outputs[name] = minutes
    # ... and the same wherever no such click is
    assert {k: v for k, v in outputs["kafka"].items() if k not in ref.beyond} == {
        k: v for k, v in outputs["embedded"].items() if k not in ref.beyond
    }

    # The same summary, step by step (names aside) up to the windowed step, and nothing left
    # behind. Which rejected record a run saw first depends on its partitions and workers.
    def counts(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.startswith("    first rejected:")]

    renamed = counts(
        [
            line.replace(pipeline_name, "clickstream").replace(topic_name, "clicks")
            for line in _summary(on_kafka.stderr)
        ]
    )
    window = next(i for i, line in enumerate(renamed) if line.startswith("  views-per-minute:"))
    assert renamed[:window] == counts(_summary(embedded.stderr))[:window]
    assert "lag: 0 records" in on_kafka.stderr
    # The group committed every partition of the input topic to its end, which is past the
    # CLICK_EVENTS records by the one end-of-time marker the source wrote to each partition.
    ends = end_offsets(kafka, topic_name, 6)
    assert committed_offsets(kafka, group, topic_name, 6) == ends
    assert sum(ends.values()) == CLICK_EVENTS + 6

    # The bad lines are in the dead-letter topic on Kafka, as they are on the embedded log, and
    # the late-data topic holds clicks beyond the lateness only.
    dead = read_records(kafka, f"{pipeline_name}.dead-letters", 1)
    assert Counter(r.value for r in dead) == ref.bad
    for record in dead:
        headers = dict(record.headers)
        assert headers["headwater.step"] == topic_name.encode()
        assert headers["headwater.source.topic"] == topic_name.encode()
    late = read_records(kafka, f"{pipeline_name}.views-per-minute.late", 1)
    assert len(late) == _late(on_kafka.stderr)
    assert not Counter(r.value for r in late) - ref.beyond_lines

    # The report reads the same tables and counts from Kafka (as in docker/docker-compose.yml).
    report = _renamed_copy(
        EXAMPLE / "report.py",
        tmp_path,
        {
            '"clickstream.dead-letters"': f'"{pipeline_name}.dead-letters"',
            '"clickstream.views-per-minute.late"': f'"{pipeline_name}.views-per-minute.late"',
        },
    )
    printed = subprocess.run(
        [sys.executable, str(report), str(tmp_path / "kafka"), "--backend", "kafka"],
        cwd=tmp_path,
        env=clean_env({"HEADWATER_BOOTSTRAP_SERVERS": kafka}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr
    check_report(parse_report(printed.stdout), ref)


# -- 2. kill -9 of a worker, then a new worker joins ----------------------------------------------

GATED_N = 120_000
"""Input records of the gated pipeline."""

GATED_MODULE = '''
"""Numbers through a 6-partition topic, squared into a 3-partition one. The source trickles
(BATCH records every PAUSE seconds) until a file called `gate` appears next to this module,
then writes the rest at once: the test decides when the input ends."""

import asyncio
import os
from pathlib import Path

from connectors.memory import Iterable
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

N = {n}
BATCH = 200
PAUSE = 0.1
GATE = Path(__file__).with_name("gate")


async def numbers():
    for n in range(N):
        if n % BATCH == 0 and not GATE.exists():
            await asyncio.sleep(PAUSE)
        yield {{"n": n}}


def keep(value):
    return value["n"] % 3 != 0


def square(value):
    # the pid says which worker process mapped the record
    return {{"n": value["n"], "square": value["n"] * value["n"], "pid": os.getpid()}}


pipeline = (
    Pipeline("{name}")
    .source(
        Iterable(numbers, batch_size=BATCH, key=lambda value: str(value["n"])),
        into=Topic("{input_topic}", partitions=6),
    )
    .filter("keep", keep)
    .map("square", square)
    .sink(LogTopic(Topic("{output_topic}", partitions=3)))
)
'''


@dataclass(frozen=True)
class Gated:
    module: Path
    gate: Path
    name: str
    input_topic: str
    output_topic: str

    def open_gate(self) -> None:
        self.gate.touch()


def write_gated(directory: Path, names: Names) -> Gated:
    gated = Gated(
        directory / "numbers_pipeline.py",
        directory / "gate",
        names("numbers"),
        names("numbers-in"),
        names("numbers-out"),
    )
    gated.module.write_text(
        textwrap.dedent(
            GATED_MODULE.format(
                n=GATED_N,
                name=gated.name,
                input_topic=gated.input_topic,
                output_topic=gated.output_topic,
            )
        )
    )
    return gated


@functools.cache
def expected_squares() -> frozenset[tuple[int, int]]:
    return frozenset((n, n * n) for n in range(GATED_N) if n % 3 != 0)


def check_gated_output(kafka: str, gated: Gated) -> Counter[int]:
    """Every input record is in the input topic once, followed in each partition by the
    source's one end-of-time marker, every expected output is in the output topic at least once,
    and nothing else is; returns how many outputs each pid wrote."""
    input_topic = read_kafka_topic(kafka, gated.input_topic, 6)
    inputs = input_topic.records
    assert Counter(r.value for r in inputs) == Counter(
        orjson.dumps({"n": n}) for n in range(GATED_N)
    )
    assert {r.key for r in inputs} == {str(n).encode() for n in range(GATED_N)}
    end = end_of_time_key(gated.input_topic)
    assert sorted((m.partition, m.offset, m.key) for m in input_topic.markers) == [
        (p, input_topic.ends[p] - 1, end) for p in range(6)
    ]

    outputs = [orjson.loads(r.value) for r in read_records(kafka, gated.output_topic, 3)]
    assert all(set(v) == {"n", "square", "pid"} for v in outputs)
    found = Counter((v["n"], v["square"]) for v in outputs)
    expected = expected_squares()
    missing = expected - found.keys()
    unexpected = found.keys() - expected
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"
    assert not unexpected, f"{len(unexpected)} unexpected outputs, e.g. {sorted(unexpected)[:5]}"
    return Counter(v["pid"] for v in outputs)


@dataclass(frozen=True)
class Group:
    """The pipeline's consumer group on its 6-partition input topic, as the broker sees it."""

    kafka: str
    name: str
    topic: str

    def members(self) -> list[GroupMember]:
        return describe_group(self.kafka, self.name, self.topic)[1]

    def committed(self) -> dict[int, int]:
        return committed_offsets(self.kafka, self.name, self.topic, 6)

    def stable_with(self, count: int) -> Callable[[], bool]:
        """A condition: ``count`` members that own the 6 partitions between them."""

        def check() -> bool:
            state, members = describe_group(self.kafka, self.name, self.topic)
            return state == "Stable" and len(members) == count and splits_partitions(members, 6)

        return check

    def progress_on(self, partitions: frozenset[int]) -> Callable[[], bool]:
        """A condition: the group has committed more of each of ``partitions`` than now."""
        since = self.committed()

        def check() -> bool:
            now = self.committed()
            return all(now[p] > since[p] for p in partitions)

        return check


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_of_a_worker_then_a_new_worker_joins_and_nothing_is_lost(
    kafka: str, kafka_names: Names, tmp_path: Path
) -> None:
    gated = write_gated(tmp_path, kafka_names)
    group = Group(kafka, gated.name, gated.input_topic)
    late_client = kafka_names("late-worker")
    run_args = ["run", str(gated.module), "--workers", "3", "--no-progress", "--restart", "never"]
    with background(run_args + kafka_flags(kafka), cwd=tmp_path, name="run") as runner:
        wait_until(
            lambda: len(worker_pids(runner.pid)) == 3, timeout=30, what="3 workers", watch=[runner]
        )
        wait_until(group.stable_with(3), timeout=45, what="a group of 3", watch=[runner])
        # Some output since the group of 3 formed: the first worker in the group may have
        # written 3,000 outputs before the others had their partitions.
        before = sum(end_offsets(kafka, gated.output_topic, 3).values())
        wait_until(
            lambda: sum(end_offsets(kafka, gated.output_topic, 3).values()) >= before + 3000,
            timeout=30,
            what="some output from the group of 3",
            watch=[runner],
        )
        victims = worker_pids(runner.pid)
        os.kill(victims[0], signal.SIGKILL)
        assert not gated.gate.exists()  # mid-stream: the source is still reading
        wait_until(
            lambda: victims[0] not in worker_pids(runner.pid),
            timeout=10,
            what="the killed worker to go",
            watch=[runner],
        )
        assert worker_pids(runner.pid) == victims[1:]

        # The group notices the dead member (session timeout) and the two survivors take over
        # all six partitions; then every partition, the dead worker's too, makes progress.
        wait_until(group.stable_with(2), timeout=45, what="2 survivors own all 6", watch=[runner])
        wait_until(
            group.progress_on(frozenset(range(6))),
            timeout=30,
            what="progress on every partition after the rebalance",
            watch=[runner],
        )

        # A new worker joins the group from another process; partitions move to it, and they
        # make progress while it owns them.
        worker_args = ["worker", str(gated.module), "--no-progress", "--client-id", late_client]
        with background(worker_args + kafka_flags(kafka), cwd=tmp_path, name="worker") as late:
            watch = [runner, late]
            wait_until(group.stable_with(3), timeout=45, what="the new worker in", watch=watch)
            [joined] = [m for m in group.members() if m.client_id == late_client]
            assert joined.partitions, "the new worker joined but owns no partition"
            late_pids = worker_pids(late.pid)
            assert len(late_pids) == 1
            wait_until(
                group.progress_on(joined.partitions),
                timeout=30,
                what="progress on the new worker's partitions",
                watch=watch,
            )
            assert [m for m in group.members() if m.client_id == late_client] == [joined]

            gated.open_gate()
            code = runner.wait(RUN_TIMEOUT)
            assert code == 0, tail(runner.stderr())
            assert late.process.poll() is None, "the new worker stopped with the run"
            late_code = late.terminate(45)

    stderr, late_stderr = runner.stderr(), late.stderr()
    assert "Traceback" not in stderr
    assert "killed by signal 9" in stderr
    assert "its partitions move to the other workers" in stderr
    assert "lag: 0 records" in stderr
    # SIGTERM is how a `headwater worker` ends: cleanly, with 0 or (like an interrupted run)
    # 128 + SIGTERM
    assert late_code in (0, 128 + signal.SIGTERM), tail(late_stderr)
    assert "Traceback" not in late_stderr
    # every partition committed to its end: the records and the source's end-of-time marker
    assert group.committed() == end_offsets(kafka, gated.input_topic, 6)

    by_pid = check_gated_output(kafka, gated)
    # The new worker did real work: its summary counts it, and its outputs are on the topic.
    late_counts = summary_counts(late_stderr)
    assert late_counts.get("square", (0, 0))[0] > 0, late_stderr
    sunk = late_counts.get(f"to.{gated.output_topic}", (0, 0))[1]
    assert sunk > 0, late_stderr
    assert by_pid[late_pids[0]] == sunk
    assert by_pid[victims[0]] > 0  # the killed worker had processed records before it died


# -- 3. broker restart mid-run --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pipeline_survives_a_broker_restart(
    kafka: str,
    kafka_names: Names,
    tmp_path: Path,
    restart_broker: Callable[[], subprocess.CompletedProcess[str]],
) -> None:
    gated = write_gated(tmp_path, kafka_names)
    run_args = ["run", str(gated.module), "--workers", "2", "--no-progress"]
    with background(run_args + kafka_flags(kafka), cwd=tmp_path, name="run") as runner:
        wait_until(
            lambda: sum(end_offsets(kafka, gated.output_topic, 3).values()) >= 3000,
            timeout=45,
            what="some output",
            watch=[runner],
        )
        restarted = restart_broker()
        assert restarted.returncode == 0, restarted.stderr
        assert runner.process.poll() is None, tail(runner.stderr())
        assert not gated.gate.exists()  # mid-stream: the source is still reading
        # reconnected: the output grows again
        mark = sum(end_offsets(kafka, gated.output_topic, 3).values())
        wait_until(
            lambda: sum(end_offsets(kafka, gated.output_topic, 3).values()) >= mark + 3000,
            timeout=60,
            what="output after the restart",
            watch=[runner],
        )
        gated.open_gate()
        code = runner.wait(RUN_TIMEOUT)
    stderr = runner.stderr()
    assert code == 0, tail(stderr)
    assert "Traceback" not in stderr
    assert "lag: 0 records" in stderr
    # every partition committed to its end: the records and the source's end-of-time marker
    assert committed_offsets(kafka, gated.name, gated.input_topic, 6) == end_offsets(
        kafka, gated.input_topic, 6
    )
    check_gated_output(kafka, gated)
    # A broker restart is routine operations: what the user sees stays readable, not a flood
    # of the Kafka client's connection errors.
    noise = [line for line in stderr.splitlines() if not line.startswith(("headwater", "  "))]
    assert len(noise) < 100, (
        f"{len(noise):,} lines of client log on stderr during a broker restart, e.g.:\n"
        + "\n".join(f"{n:>7,} x {line}" for line, n in Counter(noise).most_common(4))
    )


# -- 4. records written by other clients --------------------------------------------------------

ORDERS_MODULE = """
from pydantic import BaseModel

from connectors.topic import LogTopic
from pipelines import Pipeline, Topic


class Order(BaseModel):
    id: int
    amount: float
    customer: str | None = None


orders = Topic("{input_topic}", partitions=3, value=Order)

pipeline = (
    Pipeline("{name}")
    .source(LogTopic(orders))
    .map("to-dict", lambda order: order.model_dump(exclude_none=True))
    .key_by("by-customer", lambda order: order["customer"])  # no customer: KeyError
    .sink(LogTopic(Topic("{output_topic}", partitions=3)))
)
"""


def _order(i: int) -> dict[str, Any]:
    return {"id": i, "amount": i * 1.25, "customer": f"c-{i % 7}"}


@pytest.mark.timeout(120)
def test_bad_records_from_another_producer_go_to_dead_letters(
    kafka: str, kafka_names: Names, tmp_path: Path
) -> None:
    name = kafka_names("orders")
    input_topic, output_topic = kafka_names("orders-in"), kafka_names("orders-by-customer")
    module = tmp_path / "orders_pipeline.py"
    module.write_text(
        ORDERS_MODULE.format(name=name, input_topic=input_topic, output_topic=output_topic)
    )

    good = [
        Sent(
            f"order-{i}",
            orjson.dumps(_order(i)),
            (("trace", f"trace-{i}".encode()), ("producer", b"external")),
        )
        for i in range(600)
    ]
    bad = {
        "malformed": Sent(
            "bad-1", b'{"id": 9001, "amount": 12.5, "customer": "c-1"', (("trace", b"bad-1"),)
        ),
        "not-an-order": Sent(
            "bad-2",
            b'{"id": "nine thousand", "amount": 3.5, "customer": "c-2"}',
            (("trace", b"bad-2"),),
        ),
        "no-customer": Sent("bad-3", b'{"id": 9003, "amount": 7.0}', (("trace", b"bad-3"),)),
    }
    records = [*good[:150], bad["malformed"], *good[150:300], bad["not-an-order"]]
    records += [*good[300:450], bad["no-customer"], *good[450:]]
    create_topic(kafka, input_topic, 3)
    landed = dict(zip(records, produce_records(kafka, input_topic, records), strict=True))

    result = run_headwater(
        ["run", str(module), "--workers", "2", "--no-progress", *kafka_flags(kafka)],
        cwd=tmp_path,
        name="run",
    )
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert summary_counts(result.stderr) == {
        input_topic: (603, 601),
        "to-dict": (601, 601),
        "by-customer": (601, 600),
        f"to.{output_topic}": (600, 600),
    }
    assert f"{input_topic}: 603 in, 601 out, 2 to dead letters" in result.stderr
    assert "by-customer: 601 in, 600 out, 1 to dead letters" in result.stderr
    assert "lag: 0 records" in result.stderr

    # Each bad record is in the dead-letter topic once: its original key, bytes and headers,
    # and headers naming the step, the error and where the record came from.
    dead = {r.key.decode(): r for r in read_records(kafka, f"{name}.dead-letters", 1)}
    assert sorted(dead) == ["bad-1", "bad-2", "bad-3"]
    expected_step = {"bad-1": input_topic, "bad-2": input_topic, "bad-3": "by-customer"}
    for why, sent in bad.items():
        assert sent.key is not None
        record = dead[sent.key]
        assert record.value == sent.value, why
        headers = record.headers
        assert tuple(headers[: len(sent.headers)]) == sent.headers, why
        named = {k: v.decode() for k, v in headers[len(sent.headers) :]}
        assert named["headwater.step"] == expected_step[sent.key], why
        assert named["headwater.source.topic"] == input_topic, why
        assert int(named["headwater.source.partition"]) == landed[sent].partition, why
        assert int(named["headwater.source.offset"]) == landed[sent].offset, why
        error, kind = named["headwater.error"], named["headwater.error.type"]
        if why == "malformed":
            assert kind == "ValidationError"
            assert "Invalid JSON" in error and "Order" in error
        elif why == "not-an-order":
            assert kind == "ValidationError"
            assert "id" in error and "integer" in error and "Order" in error
        else:
            assert kind == "KeyError"
            assert "customer" in error

    # Everything else reached the sink, keyed by customer, readable by any Kafka client.
    out = read_records(kafka, output_topic, 3)
    assert Counter(r.value for r in out) == Counter(orjson.dumps(_order(i)) for i in range(600))
    for record in out:
        value = orjson.loads(record.value)
        assert record.key == value["customer"].encode()
        assert record.partition == kafka_partition(record.key, 3)
        assert dict(record.headers)["trace"] == f"trace-{value['id']}".encode()


INTEROP_MODULE = """
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("{name}")
    .source(LogTopic(Topic("{input_topic}", partitions=2, value=dict, key=str)))
    .map("total", lambda sale: {{**sale, "total": sale["qty"] * sale["price"]}})
    .sink(LogTopic(Topic("{output_topic}", partitions=4)))
)
"""


@pytest.mark.timeout(120)
def test_reads_a_topic_another_client_wrote_and_writes_one_it_can_read(
    kafka: str, kafka_names: Names, tmp_path: Path
) -> None:
    name = kafka_names("sales")
    input_topic, output_topic = kafka_names("sales-in"), kafka_names("sales-out")
    module = tmp_path / "sales_pipeline.py"
    module.write_text(
        INTEROP_MODULE.format(name=name, input_topic=input_topic, output_topic=output_topic)
    )

    def sale(i: int) -> dict[str, Any]:
        return {"sku": f"sku-{i}", "qty": i % 5 + 1, "price": 2.5}

    sent = [
        Sent(f"sku-{i}", orjson.dumps(sale(i)), (("till", b"t-3"), ("seq", str(i).encode())))
        for i in range(300)
    ]
    sent.append(Sent(None, orjson.dumps(sale(300)), (("till", b"t-3"), ("seq", b"300"))))
    create_topic(kafka, input_topic, 2)
    produce_records(kafka, input_topic, sent)

    result = run_headwater(
        ["run", str(module), "--no-progress", *kafka_flags(kafka)], cwd=tmp_path, name="run"
    )
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert summary_counts(result.stderr)[f"to.{output_topic}"] == (301, 301)
    assert "to dead letters" not in result.stderr

    out = read_records(kafka, output_topic, 4)
    assert len(out) == 301
    by_seq = {dict(r.headers)["seq"]: r for r in out}
    for i, original in enumerate(sent):
        record = by_seq[str(i).encode()]
        assert orjson.loads(record.value) == {**sale(i), "total": sale(i)["qty"] * 2.5}
        assert tuple(record.headers) == original.headers
        if original.key is None:
            assert record.key is None
        else:
            assert record.key == original.key.encode()
            assert record.partition == kafka_partition(record.key, 4)


# -- 5. clear errors -------------------------------------------------------------------------------


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """An address that accepts TCP connections and never answers (a hung broker)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"127.0.0.1:{server.getsockname()[1]}"


SIMPLE_MODULE = """
from connectors.memory import Iterable
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("{name}")
    .source(Iterable([{{"n": n}} for n in range(100)]), into=Topic("{input_topic}", partitions=6))
    .map("double", lambda value: {{"n": value["n"] * 2}})
    .sink(LogTopic(Topic("{output_topic}", partitions=2)))
)
"""


def _simple_module(directory: Path, names: Names) -> tuple[Path, str]:
    input_topic = names("simple-in")
    module = directory / "simple_pipeline.py"
    module.write_text(
        SIMPLE_MODULE.format(
            name=names("simple"), input_topic=input_topic, output_topic=names("simple-out")
        )
    )
    return module, input_topic


def assert_one_paragraph(result: Finished) -> str:
    """Status 2, no traceback, and stderr is the one ``headwater:`` paragraph; returns it as
    one line."""
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    text = result.stderr.strip()
    assert text.startswith("headwater: "), (
        f"stderr holds more than Headwater's one-paragraph error:\n{result.stderr}"
    )
    assert "\n\n" not in text, result.stderr
    return paragraph(text)


COMMANDS = {
    "run": lambda module: ["run", str(module), "--no-progress"],
    "worker": lambda module: ["worker", str(module), "--no-progress"],
    "topics": lambda module: ["topics", "list"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "broker"),
    [
        ("run", "refused"),
        ("worker", "refused"),
        ("topics", "refused"),
        ("run", "silent"),
        ("topics", "silent"),
    ],
)
def test_unreachable_broker_is_one_clear_paragraph_within_seconds(
    command: str, broker: str, kafka_names: Names, tmp_path: Path, silent_broker: str
) -> None:
    address = "127.0.0.1:1" if broker == "refused" else silent_broker
    module, _ = _simple_module(tmp_path, kafka_names)
    result = run_headwater(
        [*COMMANDS[command](module), *kafka_flags(address)],
        cwd=tmp_path,
        name=command,
        env={"HEADWATER_CONNECT_TIMEOUT": "5"},
        timeout=60,
    )
    assert result.seconds < 30, f"took {result.seconds:.0f}s"
    message = assert_one_paragraph(result)
    assert f"Kafka at {address}" in message
    assert "within 5s" in message
    assert "--bootstrap-servers" in message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["run", "worker"])
def test_topic_with_another_partition_count_is_refused_by_name(
    command: str, kafka: str, kafka_names: Names, tmp_path: Path
) -> None:
    module, input_topic = _simple_module(tmp_path, kafka_names)
    create_topic(kafka, input_topic, 2)  # the pipeline declares 6
    result = run_headwater(
        [*COMMANDS[command](module), *kafka_flags(kafka)], cwd=tmp_path, name=command, timeout=60
    )
    message = assert_one_paragraph(result)
    assert f"topic '{input_topic}' exists on Kafka with 2 partitions, not 6" in message
    # refused, not "fixed": the topic is as it was
    assert topic_partitions(kafka, input_topic) == 2
    assert sum(end_offsets(kafka, input_topic, 2).values()) == 0


# -- 6. secrets ------------------------------------------------------------------------------------

SECRET = "supersecret"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "broker"),
    [
        ("run", "refused"),
        ("worker", "refused"),
        ("topics", "refused"),
        ("run", "silent"),
        ("run", "plaintext"),
    ],
)
def test_the_sasl_password_never_shows(
    command: str,
    broker: str,
    kafka_names: Names,
    tmp_path: Path,
    silent_broker: str,
    request: pytest.FixtureRequest,
) -> None:
    """With SASL settings and a broker that cannot be reached (or, "plaintext", the test broker,
    which does not speak SASL), the password shows neither in the output nor in the error."""
    address = {"refused": "127.0.0.1:1", "silent": silent_broker}.get(broker)
    if address is None:
        address = request.getfixturevalue("kafka")
    module, _ = _simple_module(tmp_path, kafka_names)
    env = {
        "HEADWATER_SASL_PASSWORD": SECRET,
        "HEADWATER_SASL_USERNAME": "alice",
        "HEADWATER_SASL_MECHANISM": "PLAIN",
        "HEADWATER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "HEADWATER_CONNECT_TIMEOUT": "5",
    }
    result = run_headwater(
        [*COMMANDS[command](module), *kafka_flags(address)],
        cwd=tmp_path,
        name=command,
        env=env,
        timeout=60,
    )
    assert result.code == 2, result.stderr
    assert result.seconds < 30
    assert "Traceback" not in result.stderr
    assert "headwater: " in result.stderr
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
