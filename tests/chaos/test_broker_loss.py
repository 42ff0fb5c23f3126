"""Exactly-once while a Kafka broker dies: the keyed running count of tests/chaos/
test_exactly_once.py runs on a 3-broker cluster, and ``kill -9`` takes down the broker that
coordinates the pipeline's consumer group in the middle of the run. The run goes on with 2 of 3
brokers and ends by itself; every key's counts on the output topic, read with read_committed,
are exactly ``1, 2, ..., N_key`` (N_key from the input alone): nothing lost, nothing twice.

The cluster is the one ``KAFKA_BROKERS=3 bash scripts/kafka.sh start`` runs (scripts/test.sh
starts it), found through ``HEADWATER_TEST_KAFKA_CLUSTER`` (its bootstrap list); the test
**fails** without it, as the other Kafka tests fail without their broker. It kills and restarts
the broker with scripts/kafka.sh, so the cluster must be that script's (on 127.0.0.1).

What the kill hit: the victim was the group coordinator (the group's offsets, its transactional
offset commits and its membership move to another broker) and led partitions of the pipeline's
topics, and it came while the output was under way (some counts committed, the source not done).
The output's committed end offsets are polled through the kill: the longest time they stood
still after it is the failover stall, printed (and bounded below).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from chaos.jobs import Chaos
from support.cli import Cli, Sessions, tail, wait_until
from support.kafka import delete_topics_of
from support.logs import KafkaView
from support.processes import worker_pids
from test_exactly_once import (
    EVENTS,
    HOLD,
    INPUT_PARTITIONS,
    OUTPUT_PARTITIONS,
    check_counts_exactly_once,
    check_repartition,
    emitted_counts,
    repartition_copies,
    write_count_job,
)

CLUSTER_VARIABLE = "HEADWATER_TEST_KAFKA_CLUSTER"
KAFKA_SH = Path(__file__).resolve().parents[2] / "scripts" / "kafka.sh"
BROKERS = 3
STALL_LIMIT = 45.0
"""Seconds the output may stand still after the broker's death before the test fails."""


# -- the cluster -----------------------------------------------------------------------------------


async def _describe(bootstrap: str, group: str | None = None) -> tuple[dict[int, int], int | None]:
    """Node id -> client port of every registered broker; the group's coordinator."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        ports = {b["node_id"]: b["port"] for b in cluster["brokers"]}
        coordinator = await admin.find_coordinator(group) if group else None
        return ports, coordinator
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _brokers(bootstrap: str) -> dict[int, int]:
    return asyncio.run(asyncio.wait_for(_describe(bootstrap), 15))[0]


def _wait_for_all_brokers(bootstrap: str, timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ports = _brokers(bootstrap)
            if len(ports) == BROKERS:
                return ports
            problem = f"{len(ports)} of {BROKERS} brokers registered"
        except Exception as error:
            problem = repr(error)
        if time.monotonic() > deadline:
            pytest.fail(
                f"the {BROKERS}-broker cluster at {bootstrap} ({CLUSTER_VARIABLE}) is not whole "
                f"within {timeout:.0f}s: {problem}; start it with "
                f"`KAFKA_BROKERS={BROKERS} bash scripts/kafka.sh start`",
                pytrace=False,
            )
        time.sleep(0.5)


@dataclass(frozen=True)
class Cluster:
    """The test cluster: its bootstrap list, and scripts/kafka.sh to kill and restart a node."""

    bootstrap: str
    base_port: int

    def node(self, port: int) -> int:
        """The kafka.sh node number of the broker on ``port``."""
        node, odd = divmod(port - self.base_port, 2)
        if odd or not 0 <= node < BROKERS:
            pytest.fail(f"port {port} is no node of kafka.sh's cluster at {self.bootstrap}")
        return node + 1

    def kafka_sh(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            env={
                **os.environ,
                "KAFKA_BROKERS": str(BROKERS),
                "KAFKA_CLUSTER_PORT": str(self.base_port),
                "PYTHON": sys.executable,
            },
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"kafka.sh {' '.join(args)}:\n{tail(done.stderr)}"
        return done

    def restore(self) -> None:
        """Start again every node that is down, and wait until all are registered."""
        status = self.kafka_sh("status", check=False)
        for line in status.stderr.splitlines():
            if ": stopped" in line and "node " in line:
                self.kafka_sh("start-one", line.split("node ", 1)[1].split(":", 1)[0])
        _wait_for_all_brokers(self.bootstrap, 60)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """The 3-broker test cluster, whole (the test fails without it); whole again after."""
    bootstrap = os.environ.get(CLUSTER_VARIABLE)
    if not bootstrap:
        pytest.fail(
            f"{CLUSTER_VARIABLE} is not set: this test needs the {BROKERS}-broker cluster of "
            f"`KAFKA_BROKERS={BROKERS} bash scripts/kafka.sh start` (scripts/test.sh starts "
            f"it); export {CLUSTER_VARIABLE}=<the bootstrap list it prints>",
            pytrace=False,
        )
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        pytest.fail(
            f"this test kills and restarts brokers with scripts/kafka.sh, which runs them on "
            f"127.0.0.1; {CLUSTER_VARIABLE}={bootstrap} is another cluster",
            pytrace=False,
        )
    _wait_for_all_brokers(bootstrap, 30)
    found = Cluster(bootstrap, int(port))
    try:
        yield found
    finally:
        found.restore()


async def _topics_of(bootstrap: str, run: str) -> dict[str, list[tuple[int, list[int]]]]:
    """Each topic of the run: (leader, replicas) of each partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if run in t]
        return {
            t["topic"]: [
                (p["leader"], list(p["replicas"]))
                for p in sorted(t["partitions"], key=lambda p: int(p["partition"]))
            ]
            for t in await admin.describe_topics(names)
        }
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _output_end(view: KafkaView, topic: str) -> int:
    """The output topic's committed end (the sum of its last stable offsets)."""
    return sum(view.ends(topic, OUTPUT_PARTITIONS).values())


def _watch_failover(
    view: KafkaView, topic: str, runner: Cli, output_at_kill: int, killed_at: float
) -> tuple[float, float]:
    """Poll the output's committed end from the kill on until it is well past where it was;
    the seconds after the kill it first grew, and the longest time it stood still."""
    samples = [(0.0, output_at_kill)]
    target = output_at_kill + 5_000
    deadline = killed_at + STALL_LIMIT + 30
    while samples[-1][1] < target:
        assert runner.running(), f"`headwater run` ended after the kill:\n{tail(runner.stderr())}"
        assert time.monotonic() < deadline, (
            f"the output did not get past {target} within {deadline - killed_at:.0f}s of the "
            f"kill (samples: {samples[-10:]})\n{tail(runner.stderr())}"
        )
        with contextlib.suppress(Exception):  # a read that races the failover: try again
            samples.append((time.monotonic() - killed_at, _output_end(view, topic)))
        time.sleep(0.1)
    stall, moved_at, highest = 0.0, 0.0, output_at_kill
    first_growth = next(at for at, end in samples if end > output_at_kill)
    for at, end in samples:
        if end > highest:
            stall, moved_at, highest = max(stall, at - moved_at), at, end
    return first_growth, stall


# -- the test --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_exactly_once_survives_losing_a_broker(
    tmp_path: Path,
    sessions: Sessions,
    cluster: Cluster,
) -> None:
    run = uuid.uuid4().hex[:10]
    # while the gate is closed the source writes 1,000 events every 0.5 s: the input outlasts
    # the failover; once the output has recovered the gate opens and the rest goes at full speed
    job = write_count_job(
        tmp_path,
        guarantee="exactly_once",
        pace=0.5,
        name=f"brokerloss-{run}",
        input_topic=f"brokerloss-events-{run}",
        output_topic=f"brokerloss-counts-{run}",
    )
    view = KafkaView(cluster.bootstrap)
    flags = ["--no-progress", "--data-dir", str(tmp_path / "state")]
    flags += ["--backend", "kafka", "--bootstrap-servers", cluster.bootstrap]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "2", *flags], cwd=tmp_path, name="run"
    )
    wait_until(
        lambda: len(worker_pids(runner.pid)) == 2, timeout=30, what="2 workers", watch=[runner]
    )
    wait_until(
        lambda: _output_end(view, job.output_topic) >= 2_000,
        timeout=60,
        what="the first committed counts",
        watch=[runner],
        interval=0.25,
    )

    # every topic the pipeline created has a replica on each broker
    topics = asyncio.run(_topics_of(cluster.bootstrap, run))
    assert {job.input_topic, job.repartition_topic, job.output_topic} <= topics.keys(), topics
    assert any("changelog" in t for t in topics), f"no changelog topic among {sorted(topics)}"
    thin = {t: r for t, parts in topics.items() for _, r in parts if len(r) != BROKERS}
    assert not thin, f"topics with fewer than {BROKERS} replicas (lost with one broker): {thin}"

    # the victim: the broker that coordinates the pipeline's consumer group
    ports, coordinator = asyncio.run(_describe(cluster.bootstrap, job.group))
    assert coordinator is not None
    victim = cluster.node(ports[coordinator])
    led = sorted(
        f"{t}-{p}"
        for t, parts in topics.items()
        for p, (lead, _) in enumerate(parts)
        if lead == coordinator
    )
    assert led, f"broker {coordinator} leads no partition of the pipeline: {topics}"

    output_at_kill = _output_end(view, job.output_topic)
    input_at_kill = view.count(job.input_topic, INPUT_PARTITIONS)
    killed_at = time.monotonic()
    cluster.kafka_sh("kill", str(victim))
    assert output_at_kill > 0 and input_at_kill < HOLD * EVENTS, (
        f"the kill came too late: {output_at_kill} counts out, {input_at_kill} events in"
    )

    first_growth, stall = _watch_failover(view, job.output_topic, runner, output_at_kill, killed_at)
    assert stall < STALL_LIMIT, f"the output stood still {stall:.1f}s after the kill"

    # the rest of the input at full speed, with 2 of 3 brokers; the run ends by itself
    assert view.count(job.input_topic, INPUT_PARTITIONS) < EVENTS, "the source ended early"
    job.gate.touch()
    code = runner.wait(120)
    stderr = runner.stderr()
    assert code == 0, tail(stderr)
    assert "Traceback" not in stderr, tail(stderr)
    assert "lag: 0 records" in stderr, tail(stderr)
    assert len(_brokers(cluster.bootstrap)) == BROKERS - 1, "the killed broker came back"

    # read_committed, against the reference computed from the input alone
    assert view.count(job.input_topic, INPUT_PARTITIONS) == EVENTS
    copies = repartition_copies(view, job)
    check_repartition(copies, job, exactly_once=True)
    chaos = Chaos(killed=[(coordinator, f"broker (node {victim})", "kill -9 of a broker")])
    check_counts_exactly_once(emitted_counts(view, job), copies, job, chaos)
    print(
        f"killed broker {coordinator} (kafka.sh node {victim}): the group coordinator, leader "
        f"of {len(led)} partitions ({', '.join(led)}); {output_at_kill} records on the output "
        f"topic at the kill; it grew again {first_growth:.1f}s after it and stood still at most "
        f"{stall:.1f}s"
    )
    with contextlib.suppress(Exception):
        asyncio.run(delete_topics_of(cluster.bootstrap, run))
