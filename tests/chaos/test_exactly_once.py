"""Exactly-once under ``kill -9``: a keyed running count is right to the record while workers
are killed mid-stream and replaced, on the embedded log and on Kafka; and on the embedded log a
transaction whose writer is killed at any step of its commit is aborted or finished whole, once,
by the next member to claim its partitions.

The pipeline under test (:data:`JOB`) reads a JSON Lines file of numbered events
``{"n", "key"}`` (no record key) into a 6-partition topic, passes them through a map that
sleeps 1 ms every 100 records, re-keys them by ``key`` (``key_by``: the repartition topic
``<pipeline>.by-key``), counts each key's records (``count``: one result per record, the key's
running count) and writes the counts to a 3-partition output topic. A key's counts all go to
one output partition, in the order they were computed, so under exactly-once the counts a key
has on the log, in offset order, are exactly ``1, 2, ..., N_key`` (N_key its number of events):
a gap is a lost record, a repeat a duplicated one. Under at-least-once (the contrast) a crash
may replay: events may be copied on the repartition topic and counts re-emitted, but nothing
may be lost.

The source is *paced*: while the file ``gate`` next to the module does not exist it sleeps
after each stored batch (and holds near the end of the file), so the run is mid-stream while
the test kills workers; once the test creates ``gate`` the rest is read at full speed. While
the file ``paused`` exists it writes nothing: the test pauses it while a killed worker's
partitions move, so however slow the machine, the input outlasts the kills. Every ``kill -9``
is followed by a replacement ``headwater worker`` that joins the group. A kill aims at the
worker reading the batch the source just wrote (its trace grows: :mod:`chaos.inflight`), and
every run proves its kills caught events read and not committed (on the embedded log: frames of
an open transaction appended, its commit record not yet written).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from chaos.inflight import (
    TRACE,
    Kill,
    a_busy_worker,
    wait_for_a_fresh_batch,
)
from chaos.jobs import (
    EXTRA_KILLS,
    Chaos,
    Job,
    caught_in_flight,
    check_in_flight,
    committed_now,
    progress_everywhere,
    wait_for_no_process,
)
from support.cli import Cli, Sessions, tail, wait_until
from support.kafka import delete_topics_of
from support.logs import EmbeddedView, KafkaView, LogView
from support.processes import alive, worker_pids

from pipelines.log._local import GroupConsumer
from pipelines.log.base import RawBatch, TopicPartition, TopicSpec
from pipelines.log.embedded import EmbeddedLog

EVENTS = 100_000
KEYS = 12
INPUT_PARTITIONS = 6
OUTPUT_PARTITIONS = 3
SEED = 20240611
HOLD = 0.95
"""While the gate is closed the source holds once it has read this much of the file, so the
run cannot end before the test is done killing workers; every kill must come before."""

# -- the data --------------------------------------------------------------------------------------


@functools.cache
def event_keys() -> tuple[str, ...]:
    """The key of each event, by event number."""
    rng = random.Random(SEED)
    return tuple(f"key-{rng.randrange(KEYS):02d}" for _ in range(EVENTS))


@functools.cache
def key_counts() -> dict[str, int]:
    """Each key's number of events: its final count."""
    return dict(Counter(event_keys()))


def write_numbered_events(path: Path) -> None:
    dumps = orjson.dumps
    path.write_bytes(
        b"".join(dumps({"n": n, "key": key}) + b"\n" for n, key in enumerate(event_keys()))
    )


# -- the pipeline module ---------------------------------------------------------------------------

JOB = '''
"""A running count per key of numbered events ({guarantee}), for the exactly-once chaos tests.

While no file `gate` exists next to this module, the source sleeps PACE seconds after each
batch (written, its position stored), longer while a file `paused` exists, and holds once it
has read HOLD of the file; while it sleeps the file `quiet` exists.
"""

import asyncio
from pathlib import Path

from connectors import JsonLines, LogTopic
from pipelines import Pipeline, Topic

HERE = Path(__file__).parent
GATE = HERE / "gate"
QUIET = HERE / "quiet"
PAUSED = HERE / "paused"
PACE = {pace}
HOLD = {hold}


class PacedJsonLines(JsonLines):
    async def read(self, position):
        size = self.path.stat().st_size
        async for batch in super().read(position):
            yield batch
            if GATE.exists():
                continue
            # resumed: the batch is written and its position stored; the workers process it
            QUIET.touch()
            await asyncio.sleep(PACE)
            while (PAUSED.exists() or batch.position >= HOLD * size) and not GATE.exists():
                await asyncio.sleep(0.02)
            QUIET.unlink(missing_ok=True)


ID = "n"
{trace}


pipeline = (
    Pipeline("{name}", processing_guarantee="{guarantee}")
    .source(
        PacedJsonLines(HERE / "events.jsonl", batch_size=1000),
        into=Topic("{input_topic}", partitions={input_partitions}),
    )
    .map("slow", slow)
    .key_by("by-key", lambda e: e["key"])
    .count("count")
    .sink(LogTopic(Topic("{output_topic}", partitions={output_partitions})))
)
'''


def write_count_job(
    directory: Path,
    *,
    guarantee: str,
    pace: float,
    hold: float = HOLD,
    name: str = "eos",
    input_topic: str = "events",
    output_topic: str = "counts",
) -> Job:
    job = Job(directory, name, input_topic, output_topic, guarantee, "by-key", "n")
    write_numbered_events(directory / "events.jsonl")
    job.module.write_text(
        textwrap.dedent(JOB).format(
            guarantee=guarantee,
            pace=pace,
            hold=hold,
            name=name,
            input_topic=input_topic,
            output_topic=output_topic,
            input_partitions=INPUT_PARTITIONS,
            output_partitions=OUTPUT_PARTITIONS,
            trace=TRACE,
        )
    )
    return job


# -- checking the results --------------------------------------------------------------------------


@dataclass
class Emitted:
    """What the output topic holds for one key."""

    counts: list[int] = field(default_factory=list)
    """Its counts in offset order."""
    where: list[tuple[int, int]] = field(default_factory=list)
    """(partition, offset) of each."""


def emitted_counts(view: LogView, job: Job) -> dict[str, Emitted]:
    found: dict[str, Emitted] = defaultdict(Emitted)
    for partition, entries in enumerate(view.records(job.output_topic, OUTPUT_PARTITIONS)):
        for offset, key, value in entries:
            assert key is not None and value is not None, (
                f"a count without key or value at {job.output_topic}-{partition}@{offset}"
            )
            found[key.decode()].counts.append(orjson.loads(value))
            found[key.decode()].where.append((partition, offset))
    return dict(found)


def _where(job: Job, place: tuple[int, int]) -> str:
    return f"{job.output_topic}-{place[0]}@{place[1]}"


def _first_difference(job: Job, key: str, got: Emitted, want: int) -> str:
    """Where and how the counts of ``key`` first differ from 1, 2, ..., want."""
    counts = got.counts
    partitions = sorted({p for p, _ in got.where})
    seen = Counter(counts)
    repeated = sum(c - 1 for c in seen.values() if c > 1)
    missing = [n for n in range(1, want + 1) if n not in seen]
    head = (
        f"key {key!r}: {len(counts)} counts on partition(s) {partitions}, expected exactly "
        f"1..{want}; {repeated} repeated, {len(missing)} of 1..{want} missing"
        + (f" (first {missing[:5]})" if missing else "")
        + (f", last {counts[-1]}" if counts else "")
    )
    for index, value in enumerate(counts):
        if value != index + 1:
            before = counts[max(0, index - 3) : index]
            after = counts[index : index + 4]
            return (
                f"{head}; the first difference is at {_where(job, got.where[index])}: count "
                f"#{index + 1} is {value} (the counts around it: {before} then {after})"
            )
    return f"{head}; the counts stop after {len(counts)}"


def repartition_copies(view: LogView, job: Job) -> Counter[int]:
    """How many times each event number is on the repartition topic."""
    copies: Counter[int] = Counter()
    for entries in view.records(job.repartition_topic, INPUT_PARTITIONS):
        for _, _, value in entries:
            assert value is not None
            copies[orjson.loads(value)["n"]] += 1
    return copies


def check_repartition(copies: Counter[int], job: Job, *, exactly_once: bool) -> None:
    missing = [n for n in range(EVENTS) if copies[n] == 0]
    unknown = sorted(n for n in copies if not 0 <= n < EVENTS)
    duplicated = sorted(n for n, c in copies.items() if c > 1)
    assert not unknown, f"{job.repartition_topic} holds events that do not exist: {unknown[:5]}"
    assert not missing, (
        f"{len(missing)} events never reached {job.repartition_topic} (lost), e.g. {missing[:5]}"
    )
    if exactly_once:
        assert not duplicated, (
            f"{len(duplicated)} events are on {job.repartition_topic} more than once "
            f"(e.g. event {duplicated[0]}: {copies[duplicated[0]]} times; first few "
            f"{duplicated[:5]}): a replay upstream of the repartition topic was committed again"
        )


def given_per_key(copies: Counter[int]) -> tuple[Counter[str], Counter[str]]:
    """Per key: the records the count step was given (copies included), and how many
    distinct events they are."""
    keys = event_keys()
    given: Counter[str] = Counter()
    distinct: Counter[str] = Counter()
    for n, c in copies.items():
        given[keys[n]] += c
        distinct[keys[n]] += 1
    return given, distinct


def check_counts_exactly_once(
    outputs: dict[str, Emitted], copies: Counter[int], job: Job, chaos: Chaos
) -> None:
    """Every key's counts are exactly 1..N_key, N_key its reference count: nothing lost,
    nothing duplicated. Fails naming the first key that differs, with what the repartition
    topic gave the count step for it (copies there mean the fault is upstream of the count)."""
    expected = key_counts()
    given, distinct = given_per_key(copies)
    bad = []
    for key in sorted(expected.keys() | outputs.keys()):
        want = expected.get(key, 0)
        got = outputs.get(key, Emitted())
        one_partition = len({p for p, _ in got.where}) <= 1
        if got.counts != list(range(1, want + 1)) or not one_partition:
            bad.append(
                _first_difference(job, key, got, want)
                + f"; {job.repartition_topic} holds {given[key]} records of it "
                f"({distinct[key]} distinct events)"
            )
    if bad:
        pytest.fail(
            f"exactly-once broken: {len(bad)} of {len(expected)} keys differ from 1..N_key.\n"
            f"First: {bad[0]}\n"
            + "".join(f"next: {line}\n" for line in bad[1:4])
            + chaos.describe(),
            pytrace=False,
        )


def check_counts_at_least_once(
    outputs: dict[str, Emitted], copies: Counter[int], job: Job, chaos: Chaos
) -> None:
    """Nothing lost: every key's counts include every number 1..N_key, and its last count is
    exactly the number of its records the count step was given (every event at least once,
    plus the copies a replay put on the repartition topic: a count never double counts what
    it read, and never forgets any of it)."""
    expected = key_counts()
    given, _ = given_per_key(copies)
    bad = []
    for key in sorted(expected.keys() | outputs.keys()):
        want = expected.get(key, 0)
        got = outputs.get(key, Emitted())
        present = set(got.counts)
        missing = [n for n in range(1, want + 1) if n not in present]
        last = got.counts[-1] if got.counts else 0
        if missing or last != given[key] or last < want:
            bad.append(
                f"key {key!r}: last count {last}, the repartition topic gave the count step "
                f"{given[key]} records of it ({want} events); {len(missing)} of 1..{want} "
                f"never emitted (first {missing[:5]}); " + _first_difference(job, key, got, want)
            )
    if bad:
        pytest.fail(
            f"at-least-once broken: {len(bad)} of {len(expected)} keys.\nFirst: {bad[0]}\n"
            + "".join(f"next: {line}\n" for line in bad[1:4])
            + chaos.describe(),
            pytrace=False,
        )


# -- chaos: kill -9 workers mid-stream, each time start a replacement ------------------------------


def kill_busy_workers(
    *,
    runner: Cli,
    job: Job,
    view: LogView,
    sessions: Sessions,
    worker_args: Sequence[str],
    kills: int,
    rng: random.Random,
    pause: tuple[float, float],
    delay: tuple[float, float],
    takeover_timeout: float,
) -> Chaos:
    """``kills`` times: kill -9 a worker (never the runner's last one: the runner stops when
    all its own workers are gone), start a replacement ``headwater worker``, and wait until
    every partition makes progress again; then more kills, up to :data:`EXTRA_KILLS`, until
    one has caught work in flight. A kill aims at the worker reading the batch the source just
    wrote, ``delay`` seconds after it started."""
    chaos = Chaos()
    started = time.monotonic()
    round_ = -1
    while round_ + 1 < kills or (
        round_ + 1 < kills + EXTRA_KILLS and not any(caught_in_flight(view, job, chaos))
    ):
        round_ += 1
        job.paused.unlink(missing_ok=True)
        time.sleep(rng.uniform(*pause))
        assert view.count(job.input_topic, INPUT_PARTITIONS) < HOLD * EVENTS, (
            f"kill {round_ + 1} ({kills} planned) would come after the source stopped writing (it "
            f"holds at {HOLD:.0%} of the file until the gate opens): slow it down (pace)\n"
            + chaos.describe()
        )
        own = worker_pids(runner.pid)
        whose = {pid: "run" for pid in own} if len(own) > 1 else {}
        for replacement in chaos.replacements:
            whose.update({pid: replacement.name for pid in worker_pids(replacement.pid)})
        assert whose, "no worker left to kill"
        since = committed_now(view, job)
        # the source writes each batch to one partition (its events have no key): aim at the
        # worker that reads it, a random delay after it started
        wait_for_a_fresh_batch(job.quiet)
        busy = a_busy_worker(job.directory, sorted(whose), within=1.0)
        time.sleep(rng.uniform(*delay))
        victim = busy if busy is not None else rng.choice(sorted(whose))
        os.kill(victim, signal.SIGKILL)
        job.paused.touch()  # no new input until every partition has an owner again
        wait_until(
            lambda v=victim: not alive(v),
            timeout=10,
            what=f"worker {victim} to die",
            interval=0.002,
        )
        after = view.committed(job.group, job.input_topic, INPUT_PARTITIONS)
        chaos.kills.append(Kill((victim,), since[job.input_topic], after))
        chaos.killed.append((victim, whose[victim], "at random"))

        name = f"worker-{round_ + 1}"
        replacement = sessions.start(worker_args, cwd=job.directory, name=name)
        chaos.replacements.append(replacement)
        wait_until(
            lambda r=replacement: len(worker_pids(r.pid)) == 1,
            timeout=30,
            what=f"the worker process of {name}",
            watch=[runner, replacement],
        )
        wait_until(
            progress_everywhere(view, job, since=since),
            timeout=takeover_timeout,
            what=f"progress on every partition after kill {round_ + 1} (worker {victim})",
            watch=[runner, replacement],
            interval=0.25,
        )
    chaos.seconds = time.monotonic() - started
    job.paused.unlink()
    return chaos


def finish_counting(runner: Cli, job: Job, view: LogView, chaos: Chaos, sessions: Sessions) -> None:
    """Let the input run out; the run must end by itself with status 0 and nothing left to
    process. Then stop the replacements (SIGTERM): they leave cleanly."""
    assert view.count(job.input_topic, INPUT_PARTITIONS) < EVENTS, "the source ended in chaos"
    job.gate.touch()
    code = runner.wait(120)
    stderr = runner.stderr()
    assert code == 0, f"{tail(stderr)}\n{chaos.describe()}"
    assert "Traceback" not in stderr, tail(stderr)
    assert "lag: 0 records" in stderr, tail(stderr)
    if any(whose == "run" for _, whose, _ in chaos.killed):
        assert "killed by signal 9" in stderr, tail(stderr)
    for replacement in chaos.replacements:
        if replacement.running() and worker_pids(replacement.pid):
            code = replacement.terminate()
            text = replacement.stderr()
            assert code in (0, 128 + signal.SIGTERM), f"{replacement.name}:\n{tail(text)}"
            assert "Traceback" not in text, f"{replacement.name}:\n{tail(text)}"
    for replacement in chaos.replacements:  # those whose worker was killed end by themselves
        if replacement.running():
            replacement.terminate()
    wait_for_no_process(sessions)
    # every event is on the input topic once, and the group committed all of it
    assert view.count(job.input_topic, INPUT_PARTITIONS) == EVENTS
    committed = view.committed(job.group, job.input_topic, INPUT_PARTITIONS)
    ends = view.ends(job.input_topic, INPUT_PARTITIONS)
    assert all(committed[p] == ends[p] for p in range(INPUT_PARTITIONS)), (committed, ends)


# -- 1 and 2. the embedded log ---------------------------------------------------------------------


def _embedded_chaos(
    tmp_path: Path, sessions: Sessions, guarantee: str
) -> tuple[Job, EmbeddedView, Chaos]:
    # while the gate is closed the source writes 1,000 events every 0.25 s (25 s for all)
    job = write_count_job(tmp_path, guarantee=guarantee, pace=0.25)
    data_dir = tmp_path / "log"
    view = EmbeddedView(data_dir)
    flags = ["--no-progress", "--data-dir", str(data_dir)]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "3", *flags], cwd=tmp_path, name="run"
    )
    wait_until(
        lambda: len(worker_pids(runner.pid)) == 3, timeout=30, what="3 workers", watch=[runner]
    )
    wait_until(
        lambda: view.count(job.output_topic, OUTPUT_PARTITIONS) > 0,
        timeout=30,
        what="the first counts",
        watch=[runner],
    )
    chaos = kill_busy_workers(
        runner=runner,
        job=job,
        view=view,
        sessions=sessions,
        worker_args=["worker", str(job.module), "--backend", "embedded", *flags],
        kills=6,
        rng=random.Random(),
        pause=(0.3, 1.0),
        delay=(0.01, 0.06),
        takeover_timeout=20,
    )
    finish_counting(runner, job, view, chaos, sessions)
    return job, view, chaos


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_exactly_once_embedded_under_kill_9(tmp_path: Path, sessions: Sessions) -> None:
    job, view, chaos = _embedded_chaos(tmp_path, sessions, "exactly_once")
    copies = repartition_copies(view, job)
    check_counts_exactly_once(emitted_counts(view, job), copies, job, chaos)
    check_repartition(copies, job, exactly_once=True)
    # a kill at each step of a commit is proven deterministically by
    # test_a_crash_at_each_step_of_a_commit_is_recovered
    check_in_flight(view, job, chaos)
    print(chaos.describe())


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_exactly_once_embedded_under_kill_9_while_segments_roll(
    tmp_path: Path, sessions: Sessions
) -> None:
    """The same run with 32 KiB segments: every partition rolls many times, and workers are
    killed while they seal segments and follow seals. (No purges: the check reads every copy
    on the repartition topic.)"""
    sessions.env["HEADWATER_SEGMENT_BYTES"] = "32768"
    job, view, chaos = _embedded_chaos(tmp_path, sessions, "exactly_once")
    check_counts_exactly_once(emitted_counts(view, job), repartition_copies(view, job), job, chaos)
    rolled = list((tmp_path / "log" / "topics").glob("*/0-*.log"))
    assert len(rolled) > 10, rolled
    check_in_flight(view, job, chaos)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_at_least_once_can_duplicate_but_never_loses(tmp_path: Path, sessions: Sessions) -> None:
    job, view, chaos = _embedded_chaos(tmp_path, sessions, "at_least_once")
    copies = repartition_copies(view, job)
    check_repartition(copies, job, exactly_once=False)
    outputs = emitted_counts(view, job)
    check_counts_at_least_once(outputs, copies, job, chaos)
    extra_events = copies.total() - EVENTS
    extra_counts = sum(len(e.counts) for e in outputs.values()) - EVENTS
    check_in_flight(view, job, chaos, copies=extra_events)
    print(chaos.describe())
    print(f"copies: {extra_events} on the repartition topic, {extra_counts} re-emitted counts")


# -- 3. Kafka --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_exactly_once_kafka_under_kill_9(tmp_path: Path, sessions: Sessions, kafka: str) -> None:
    run = uuid.uuid4().hex[:10]
    # while the gate is closed the source writes 1,000 events every second; a killed member
    # is noticed by the group coordinator after its session timeout (10 s): each kill costs
    # 10-15 s
    job = write_count_job(
        tmp_path,
        guarantee="exactly_once",
        pace=1.0,
        name=f"eos-{run}",
        input_topic=f"eos-events-{run}",
        output_topic=f"eos-counts-{run}",
    )
    view = KafkaView(kafka)
    flags = ["--no-progress", "--data-dir", str(tmp_path / "state")]
    flags += ["--backend", "kafka", "--bootstrap-servers", kafka]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "3", *flags], cwd=tmp_path, name="run"
    )
    wait_until(
        lambda: len(worker_pids(runner.pid)) == 3, timeout=30, what="3 workers", watch=[runner]
    )
    wait_until(
        lambda: view.count(job.output_topic, OUTPUT_PARTITIONS) > 0,
        timeout=60,
        what="the first committed counts",
        watch=[runner],
        interval=0.5,
    )
    chaos = kill_busy_workers(
        runner=runner,
        job=job,
        view=view,
        sessions=sessions,
        worker_args=["worker", str(job.module), *flags],
        kills=5,
        rng=random.Random(),
        pause=(0.5, 1.5),
        delay=(0.02, 0.15),
        takeover_timeout=60,
    )
    finish_counting(runner, job, view, chaos, sessions)
    copies = repartition_copies(view, job)
    check_counts_exactly_once(emitted_counts(view, job), copies, job, chaos)
    check_repartition(copies, job, exactly_once=True)
    check_in_flight(view, job, chaos)
    print(chaos.describe())
    with contextlib.suppress(Exception):
        asyncio.run(delete_topics_of(kafka, run))


# -- 4. a transaction whose writer is killed at each step of its commit ---------------------------

GROUP = "g"
IN = "in"
OUT = "out"
CHANGELOG = "g.count.changelog"
TRANSACTIONAL_ID = "g.1.0"

CRASHING_WRITER = """
import asyncio, os, signal, sys

from pipelines.log._partition_file import PartitionFile
from pipelines.log._transactions import EmbeddedTransaction
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.embedded import EmbeddedLog

data_dir, crash, transactional_id = sys.argv[1:4]


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if crash == "before-the-commit-record":
    EmbeddedTransaction.commit = die
elif crash == "after-the-commit-record":
    PartitionFile.mark = die
elif crash == "after-one-marker":
    mark = PartitionFile.mark

    def mark_then_die(self, key, *, committed):
        mark(self, key, committed=committed)
        die()

    PartitionFile.mark = mark_then_die
elif crash == "before-the-offsets":
    EmbeddedLog.store_offsets = die


async def main():
    log = EmbeddedLog(data_dir)
    transaction = log.transactional_producer(transactional_id)
    await transaction.send("out", 0, RawBatch([b"a"], [b"1"], [1]))
    await transaction.send("out", 1, RawBatch([b"c"], [b"3"], [3]))
    await transaction.send("out", 0, RawBatch([b"b"], [b"2"], [2]))
    await transaction.send("g.count.changelog", 0, RawBatch([b"a"], [b"7"], [4]))
    offsets = {TopicPartition("in", 0): 5, TopicPartition("in", 1): 7}
    await transaction.commit(offsets, "g")
    print("committed without crashing")


asyncio.run(main())
"""


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}-{tp.partition}"


class Listener:
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.assigned |= partitions

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.assigned -= partitions


async def _prepare(data_dir: Path) -> None:
    log = EmbeddedLog(data_dir)
    try:
        await log.create_topics(
            [TopicSpec(IN, 2), TopicSpec(OUT, 2), TopicSpec(CHANGELOG, 1, compacted=True)]
        )
        for partition in range(2):
            values = [b"%d" % i for i in range(10)]
            log.append(TopicPartition(IN, partition), RawBatch([None] * 10, values, [0] * 10))
        # something written before, outside any transaction
        log.append(TopicPartition(OUT, 0), RawBatch([b"z"], [b"0"], [0]))
    finally:
        await log.close()


async def _claim_and_read(data_dir: Path) -> dict[str, Any]:
    """A new member of the group claims both input partitions (which recovers the group's
    interrupted commits first) and polls once; what it and the log then see."""
    log = EmbeddedLog(data_dir)
    consumer = log.consumer(GROUP)
    assert isinstance(consumer, GroupConsumer)
    listener = Listener()
    try:
        await consumer.subscribe([IN], listener)
        fetched = await consumer.poll(100, timeout=2.0)
        ins = [TopicPartition(IN, p) for p in range(2)]
        committed = await log.committed_offsets(GROUP, ins)
        logged = {}
        for tp in [TopicPartition(OUT, 0), TopicPartition(OUT, 1), TopicPartition(CHANGELOG, 0)]:
            batch = await log.read(tp, 0, 1000)
            logged[_name(tp)] = list(zip(batch.records.keys, batch.records.values, strict=True))
        assigned = sorted(_name(tp) for tp in listener.assigned)
        await consumer.close()
        return {
            "assigned": assigned,
            "first_offsets": {_name(b.topic_partition): b.offsets[0] for b in fetched},
            "committed": {_name(tp): o for tp, o in committed.items()},
            "logged": logged,
        }
    finally:
        await log.close()


COMMITTED_LOG = {
    "out-0": [(b"z", b"0"), (b"a", b"1"), (b"b", b"2")],
    "out-1": [(b"c", b"3")],
    f"{CHANGELOG}-0": [(b"a", b"7")],
}
ABORTED_LOG = {"out-0": [(b"z", b"0")], "out-1": [], f"{CHANGELOG}-0": []}

CRASHES = {
    # where the crash leaves what readers see (records per partition, committed offsets),
    # and whether the transaction is then committed
    "before-the-commit-record": (({"out-0": 1, "out-1": 0, f"{CHANGELOG}-0": 0}, {}), False),
    "after-the-commit-record": (({"out-0": 1, "out-1": 0, f"{CHANGELOG}-0": 0}, {}), True),
    "after-one-marker": (({"out-0": 3, "out-1": 0, f"{CHANGELOG}-0": 0}, {}), True),
    "before-the-offsets": (({"out-0": 3, "out-1": 1, f"{CHANGELOG}-0": 1}, {}), True),
}


def _state(data_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    view = EmbeddedView(data_dir)
    sizes = {f"{OUT}-{p}": n for p, n in view.ends(OUT, 2).items()}
    sizes[f"{CHANGELOG}-0"] = view.ends(CHANGELOG, 1)[0]
    committed = {f"{IN}-{p}": o for p, o in view.committed(GROUP, IN, 2).items() if o}
    return sizes, committed


def _crash_writer(data_dir: Path, crash: str) -> None:
    writer = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(data_dir), crash, TRANSACTIONAL_ID],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert writer.returncode == -signal.SIGKILL, (writer.returncode, writer.stdout, writer.stderr)


async def _commit_again(data_dir: Path) -> None:
    """The next owner of the task does the work again and commits it."""
    log = EmbeddedLog(data_dir)
    try:
        transaction = log.transactional_producer(TRANSACTIONAL_ID)
        await transaction.send(OUT, 0, RawBatch([b"a", b"b"], [b"1", b"2"], [1, 2]))
        await transaction.send(OUT, 1, RawBatch([b"c"], [b"3"], [3]))
        await transaction.send(CHANGELOG, 0, RawBatch([b"a"], [b"7"], [4]))
        await transaction.commit({TopicPartition(IN, 0): 5, TopicPartition(IN, 1): 7}, GROUP)
        await transaction.close()
    finally:
        await log.close()


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crash_at_each_step_of_a_commit_is_recovered(tmp_path: Path, crash: str) -> None:
    """A writer killed with its records appended (pending) and: its commit record not written
    yet, written but no marker, one marker, or every marker but not the offsets. The next
    member to claim a partition of the group aborts the transaction (no commit record) or
    finishes it (markers and offsets) before reading its offsets; the records are then on the
    log once either way, also after the work is done again, and recovering again changes
    nothing."""
    data_dir = tmp_path / "log"
    asyncio.run(_prepare(data_dir))
    _crash_writer(data_dir, crash)
    before, committed = CRASHES[crash]
    assert _state(data_dir) == before, "the crash came at another point"

    seen = asyncio.run(_claim_and_read(data_dir))
    problem = f"after a crash {crash}: {seen}"
    assert seen["assigned"] == [f"{IN}-0", f"{IN}-1"], problem
    if committed:
        assert seen["committed"] == {f"{IN}-0": 5, f"{IN}-1": 7}, problem
        assert seen["first_offsets"] == {f"{IN}-0": 5, f"{IN}-1": 7}, problem
        assert seen["logged"] == COMMITTED_LOG, problem
    else:
        assert seen["committed"] == {}, problem
        assert seen["first_offsets"] == {f"{IN}-0": 0, f"{IN}-1": 0}, problem
        assert seen["logged"] == ABORTED_LOG, problem
        asyncio.run(_commit_again(data_dir))  # a re-run does not double anything

    again = asyncio.run(_claim_and_read(data_dir))
    assert again["logged"] == COMMITTED_LOG, f"after a crash {crash}: {again}"
    assert again["committed"] == {f"{IN}-0": 5, f"{IN}-1": 7}


def test_a_transaction_is_not_recovered_while_its_owner_lives(tmp_path: Path) -> None:
    """An open transaction whose owner is alive (its owner lock held) is the owner's: a member
    claiming partitions of the group leaves it open, and its commit then counts."""
    data_dir = tmp_path / "log"
    asyncio.run(_prepare(data_dir))
    log = EmbeddedLog(data_dir)
    transaction = log.transactional_producer(TRANSACTIONAL_ID)
    asyncio.run(transaction.send(OUT, 0, RawBatch([b"a", b"b"], [b"1", b"2"], [1, 2])))
    asyncio.run(transaction.send(OUT, 1, RawBatch([b"c"], [b"3"], [3])))
    asyncio.run(transaction.send(CHANGELOG, 0, RawBatch([b"a"], [b"7"], [4])))
    held = asyncio.run(_claim_and_read(data_dir))
    assert held["committed"] == {}
    assert held["logged"] == ABORTED_LOG, "an open transaction's records were visible"
    offsets = {TopicPartition(IN, 0): 4, TopicPartition(IN, 1): 2}
    asyncio.run(transaction.commit(offsets, GROUP))
    asyncio.run(transaction.close())
    asyncio.run(log.close())
    seen = asyncio.run(_claim_and_read(data_dir))
    assert seen["committed"] == {f"{IN}-0": 4, f"{IN}-1": 2}
    assert seen["first_offsets"] == {f"{IN}-0": 4, f"{IN}-1": 2}
    assert seen["logged"] == COMMITTED_LOG


def test_a_transaction_sending_twice_to_one_partition_commits_both(tmp_path: Path) -> None:
    """TransactionalProducer.commit makes *every* batch sent since the last commit visible."""

    async def go() -> list[bytes | None]:
        log = EmbeddedLog(tmp_path / "log")
        try:
            await log.create_topics([TopicSpec(OUT, 1)])
            transaction = log.transactional_producer(TRANSACTIONAL_ID)
            await transaction.send(OUT, 0, RawBatch([b"a"], [b"1"], [1]))
            await transaction.send(OUT, 0, RawBatch([b"b"], [b"2"], [2]))
            await transaction.commit({}, GROUP)
            return (await log.read(TopicPartition(OUT, 0), 0, 100)).records.values
        finally:
            await log.close()

    values = asyncio.run(go())
    assert values == [b"1", b"2"], (
        f"the partition holds {values}: of two batches one transaction sent to one partition, "
        "only the first was committed"
    )
