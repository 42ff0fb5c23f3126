"""Chaos tests: a keyed, windowed count keeps the promise of its processing guarantee while
workers are killed with ``kill -9``, replaced, added and stopped, and after everything is killed
at once.

1. ``test_chaos_embedded[guarantee-replaced_by]``: ``headwater run --workers 3`` on the
   embedded log; 6 times a random worker is killed and a ``headwater worker`` replaces it (or
   only the runner, which starts a new worker in place of each one killed);
2. ``test_chaos_kafka[guarantee]``: the same on the Kafka broker, 5 kills;
3. ``test_restart_after_killing_everything[guarantee]``: the runner and its workers killed at
   once, then the same command again: it goes on from the committed positions and state;
4. ``test_rebalance_while_a_window_is_open``: a worker joins, then leaves cleanly, while every
   partition has open windows;
5. a reduction, to the three state owners involved, of a failure the first test found;
6. a reduction, to the two owners of one partition, of a failure the exactly-once Kafka test
   found: a restored partition taken for idle.

The pipeline under test (:data:`JOB`) reads a JSON Lines file of events ``{"id", "user", "ts"}``
into a 6-partition topic, re-keys them by user (``key_by``: the repartition topic
``<pipeline>.by-user``), counts each user's events in tumbling event-time windows (event time
from the record, ``emit="close"``, never idle by the wall clock) and writes one
:class:`~operators.windowed.WindowResult` per closed window to a 3-partition output topic.
The reference is computed here in plain Python from the input file alone
(:func:`expected_windows`): it knows nothing of partitions, workers, batches or the log.

What makes the reference exact:

- the event times in the file are out of order by at most 20 s and the window's lateness is
  20 s: no event is late by the data, each window's final count is its number of events,
  whichever upstream task wrote an event and however far ahead the others were;
- the source is *paced*: while the file ``gate`` next to the module does not exist it sleeps
  after each stored batch, so the run stays mid-stream while the test kills workers; once the
  test creates ``gate`` the rest is read at full speed. The file ``quiet`` exists while it
  sleeps, so the test can kill just after a batch was written, while the workers process it;
  while the file ``paused`` exists it writes nothing (the test pauses it while the killed
  worker's partitions move), so however slow the machine, the input outlasts the kills;
- a map sleeps 1 ms every 100 records, so the workers have work in hand when they are killed,
  and traces what each worker reads (:mod:`chaos.inflight`): each run proves its kills caught
  events read and not committed.

What each guarantee promises, and what is checked:

- **exactly-once** (:func:`check_windows_exactly_once`): every window is emitted once, final,
  with the reference count, on the committed output (read as a ``read_committed`` client on
  Kafka; everything on the embedded log is committed); the repartition topic holds every event
  once and nothing is late.
- **at-least-once**, the default (:func:`check_windows_at_least_once`): nothing is lost, but
  counts are not exact. A worker killed after sending records to the repartition topic and before
  committing its input offsets makes the next owner of the partition replay those inputs and
  append them to the repartition topic again. The count step reads each copy like any record:
  a copy whose window is still open is counted again, one whose window has closed is late. So
  every window must be emitted, each emission final and of the same value, between the
  reference and the number of its records on the repartition topic (copies included): nothing
  lost, and a restore never counts a record twice unless the topic holds it twice.

The checks name the first window that differs, with what the repartition and late-data topics
hold for it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import signal
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
from chaos.inflight import (
    TRACE,
    Kill,
    describe,
    in_flight,
    read_by,
    traced_pids,
)
from chaos.jobs import (
    EXTRA_KILLS,
    Chaos,
    Job,
    caught_in_flight,
    check_in_flight,
    committed_now,
    positions,
    progress_everywhere,
    wait_for_no_process,
)
from support.cli import Cli, Sessions, summary_counts, tail, wait_until
from support.logs import EmbeddedView, KafkaView, LogView
from support.processes import alive, worker_pids

from connectors import JsonLines, LogTopic
from operators.windows import Tumbling
from pipelines import Pipeline, Topic
from pipelines.log import EmbeddedLog
from pipelines.log.base import TopicPartition
from pipelines.log.kafka import KafkaLog
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.state import TaskState
from pipelines.runtime.task import Task
from pipelines.runtime.topology import compile_pipeline
from pipelines.settings import KafkaSettings

# -- the data --------------------------------------------------------------------------------------

HOUR_MS = 3_600_000
BASE_MS = (int(time.time() * 1000) // HOUR_MS - 5) * HOUR_MS
"""The event time of the first event: the start of the hour 5 hours ago. Recent on purpose:
results are timestamped with their window's end, and Kafka deletes records older than a
topic's retention (7 days by default) at its next retention check."""


@dataclass(frozen=True)
class Dataset:
    """``events`` events of ``users`` users, event times rising evenly over ``span_ms``, each
    up to ``disorder_ms`` earlier than that (out of order by at most ``disorder_ms``), none
    before ``BASE_MS``."""

    events: int
    users: int
    span_ms: int
    window_minutes: int
    disorder_ms: int = 20_000
    seed: int = 20240101

    @property
    def window_ms(self) -> int:
        return self.window_minutes * 60_000

    def rows(self) -> Iterator[tuple[int, str, int]]:
        rng = random.Random(self.seed)
        for i in range(self.events):
            user = f"user-{rng.randrange(self.users):03d}"
            early = rng.randrange(self.disorder_ms + 1)
            yield i, user, max(BASE_MS, BASE_MS + i * self.span_ms // self.events - early)

    def write(self, path: Path) -> None:
        dumps = orjson.dumps
        path.write_bytes(
            b"".join(dumps({"id": i, "user": u, "ts": ts}) + b"\n" for i, u, ts in self.rows())
        )

    def window_of(self, ts: int) -> int:
        return ts - ts % self.window_ms


@functools.cache
def expected_windows(data: Dataset) -> dict[tuple[str, int], int]:
    """Each (user, window start in ms): its number of events."""
    return dict(Counter((user, data.window_of(ts)) for _, user, ts in data.rows()))


# -- the pipeline module ---------------------------------------------------------------------------

JOB = '''
"""Per-user event counts in {window_minutes}-minute tumbling event-time windows, {guarantee}
(chaos tests).

The source sleeps PACE seconds after each batch (written and its position stored) until a file
`gate` exists next to this module, and longer while a file `paused` exists there; while it
sleeps the file `quiet` exists.
"""

import asyncio
from datetime import timedelta
from pathlib import Path

from connectors import JsonLines, LogTopic
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

HERE = Path(__file__).parent
GATE = HERE / "gate"
QUIET = HERE / "quiet"
PAUSED = HERE / "paused"
PACE = {pace}


class PacedJsonLines(JsonLines):
    async def read(self, position):
        async for batch in super().read(position):
            yield batch
            # resumed: the runner has written the batch and stored the position after it
            if not GATE.exists():
                QUIET.touch()
                await asyncio.sleep(PACE)
                while PAUSED.exists() and not GATE.exists():
                    await asyncio.sleep(0.02)
                QUIET.unlink(missing_ok=True)


ID = "id"
{trace}


pipeline = (
    Pipeline("{name}", processing_guarantee="{guarantee}")
    .source(
        PacedJsonLines(HERE / "events.jsonl", batch_size={batch}, key=lambda e: e["user"]),
        into=Topic("{input_topic}", partitions=6),
    )
    .map("slow", slow)
    .key_by("by-user", lambda e: e["user"])
    .window(
        "minute",
        Tumbling(minutes={window_minutes}),
        time=lambda e: e["ts"],
        lateness=timedelta(milliseconds={lateness_ms}),
        # windows close on the data's watermark and the source's end, never on the wall clock:
        # a paused source is not idle input
        idle=timedelta(days=1),
        emit="close",
    )
    .count("count")
    .sink(LogTopic(Topic("{output_topic}", partitions=3)))
)
'''


@dataclass(frozen=True)
class WindowJob(Job):
    """A job counting each user's events of :attr:`data` in windows (:data:`JOB`)."""

    data: Dataset

    @property
    def late_topic(self) -> str:
        return f"{self.name}.count.late"


def write_window_job(
    directory: Path,
    data: Dataset,
    *,
    pace: float,
    batch: int = 1000,
    guarantee: str = "at_least_once",
    name: str = "chaos",
    input_topic: str = "events",
    output_topic: str = "counts",
) -> WindowJob:
    job = WindowJob(directory, name, input_topic, output_topic, guarantee, "by-user", "id", data)
    data.write(directory / "events.jsonl")
    job.module.write_text(
        textwrap.dedent(JOB).format(
            guarantee=guarantee,
            name=name,
            input_topic=input_topic,
            output_topic=output_topic,
            window_minutes=data.window_minutes,
            lateness_ms=data.disorder_ms,
            pace=pace,
            batch=batch,
            trace=TRACE,
        )
    )
    return job


# -- running headwater -----------------------------------------------------------------------------


def gone(pid: int) -> Callable[[], bool]:
    return lambda: not alive(pid)


def has_workers(cli: Cli, count: int) -> Callable[[], bool]:
    return lambda: len(worker_pids(cli.pid)) == count


def records_written(stderr: str, topic: str) -> int | None:
    """What the summary says the source step ``topic`` wrote."""
    match = re.search(rf"^  source {re.escape(topic)}: ([\d,]+) records written", stderr, re.M)
    return None if match is None else int(match[1].replace(",", ""))


# -- checking the results --------------------------------------------------------------------------


def _millis(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


Window = tuple[str, int]
"""(user, window start in ms)."""


@dataclass
class Outcome:
    """What the output topic says about every window."""

    emissions: dict[Window, list[int]]
    """(user, window start) -> the values emitted for it, in the order they were written."""
    not_final: int
    """Results not marked final (``emit="close"`` emits only final ones)."""

    @property
    def repeated(self) -> int:
        """Windows emitted more than once (allowed under at-least-once, if every value is
        right)."""
        return sum(1 for v in self.emissions.values() if len(v) > 1)


def read_outcome(view: LogView, job: WindowJob) -> Outcome:
    emissions: dict[Window, list[int]] = defaultdict(list)
    not_final = 0
    # a user's results are all on one partition (keyed by user), so this is their write order
    for values in view.values(job.output_topic, 3):
        for raw in values:
            result = orjson.loads(raw)
            emissions[(result["key"], _millis(result["start"]))].append(result["value"])
            not_final += result["final"] is not True
    return Outcome(dict(emissions), not_final)


@dataclass
class Repartitioned:
    """What the repartition topic gave the count step."""

    records: Counter[Window] = field(default_factory=Counter)
    """Records of each window on the repartition topic, copies included."""
    events: Counter[Window] = field(default_factory=Counter)
    """Distinct events of each window there."""
    copies: Counter[int] = field(default_factory=Counter)
    """Event id -> how many times it is on the repartition topic."""
    where: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Event id -> (partition, position among the records) of its first copy there."""
    window_of: dict[int, Window] = field(default_factory=dict)
    """Event id -> its window."""

    def about(self, window: Window) -> str:
        return (
            f"the repartition topic holds {self.records[window]} records of it "
            f"({self.events[window]} distinct events)"
        )

    def late_report(self, job: WindowJob, on_topic: Counter[int]) -> str:
        """Where the records on the late-data topic sit on the repartition topic."""
        if not on_topic:
            return ""
        by_partition: dict[int, list[int]] = defaultdict(list)
        for i in sorted(on_topic, key=lambda i: self.where.get(i, (-1, i))):
            by_partition[self.where.get(i, (-1, i))[0]].append(i)
        spans = "; ".join(
            f"partition {p}: {len(ids)} records, positions {self.where.get(ids[0], (p, '?'))[1]} "
            f"to {self.where.get(ids[-1], (p, '?'))[1]} (event {ids[0]} to {ids[-1]})"
            for p, ids in sorted(by_partition.items())
        )
        return (
            f"{on_topic.total()} records went to the late-data topic {job.late_topic} though no "
            f"event is later than the lateness allows: the count step's watermark moved ahead "
            f"of an upstream writer. {spans}"
        )


def repartitioned(job: WindowJob, partitions: list[list[bytes]]) -> Repartitioned:
    """Tally the records of the repartition topic (its values, partition by partition)."""
    found = Repartitioned()
    for partition, values in enumerate(partitions):
        for position, raw in enumerate(values):
            event = orjson.loads(raw)
            window = (event["user"], job.data.window_of(event["ts"]))
            found.records[window] += 1
            found.copies[event["id"]] += 1
            if found.copies[event["id"]] == 1:
                found.events[window] += 1
                found.where[event["id"]] = (partition, position)
                found.window_of[event["id"]] = window
    return found


def late_event_ids(view: LogView, job: WindowJob) -> Counter[int]:
    """Event id -> how many times it is on the late-data topic."""
    return Counter(orjson.loads(raw)["id"] for vs in view.values(job.late_topic, 1) for raw in vs)


def _when(start: int) -> str:
    return datetime.fromtimestamp(start / 1000).astimezone().isoformat()


def _fail(job: WindowJob, what: str, problems: list[tuple[Window, str]], context: str) -> None:
    (user, start), first = problems[0]
    more = "".join(f"\nnext: {u} @ {s}: {w}" for (u, s), w in problems[1:6])
    pytest.fail(
        f"{job.guarantee}: {len(problems)} windows {what}. First: user {user!r}, window "
        f"starting {_when(start)} ({start} ms): {first}{more}\n{context}",
        pytrace=False,
    )


def check_windows_exactly_once(
    view: LogView, job: WindowJob, outcome: Outcome, context: str = ""
) -> None:
    """What exactly-once promises (and at-least-once gives when nothing crashes): the
    repartition topic holds every event once, every window is emitted once, final, with its
    reference count, and nothing is late."""
    expected = expected_windows(job.data)
    given = repartitioned(job, view.values(job.repartition_topic, 6))
    unknown = sorted(i for i in given.copies if not 0 <= i < job.data.events)
    missing = [i for i in range(job.data.events) if given.copies[i] == 0]
    copied = sorted(i for i, n in given.copies.items() if n > 1)
    assert not unknown, f"{job.repartition_topic} holds events that do not exist: {unknown[:5]}"
    assert not missing, (
        f"{len(missing)} events never reached {job.repartition_topic} (lost), e.g. "
        f"{missing[:5]}\n{context}"
    )
    late = late_event_ids(view, job)
    late_in = Counter(given.window_of[i] for i in late.elements() if i in given.window_of)
    problems: list[tuple[Window, str]] = []
    for window in sorted(expected.keys() | outcome.emissions.keys()):
        want = expected.get(window)
        got = outcome.emissions.get(window, [])
        if got != [want]:
            what = "never emitted" if not got else f"emitted {got}"
            problems.append(
                (
                    window,
                    f"{what}, expected [{want}] ({given.about(window)}; the late-data topic "
                    f"holds {late_in[window]})",
                )
            )
    if problems:
        report = given.late_report(job, late)
        context = f"{report}\n{context}" if report else context
        _fail(job, "are not emitted exactly once with the reference count", problems, context)
    assert not copied, (
        f"{len(copied)} events are on {job.repartition_topic} more than once (e.g. event "
        f"{copied[0]}: {given.copies[copied[0]]} times), yet every window is right\n{context}"
    )
    assert outcome.not_final == 0, f"{outcome.not_final} results not marked final"
    assert not late, (
        f"{late.total()} records on the late-data topic, e.g. {late.most_common(3)}\n"
        f"{given.late_report(job, late)}"
    )


@dataclass
class Replays:
    """What replays after the kills did (at-least-once)."""

    copies: int
    """Records on the repartition topic that copy an event already there."""
    late: int
    """Records on the late-data topic (copies whose window had closed)."""
    over: int
    """Windows whose count is above the reference (copies counted)."""
    repeated: int
    """Windows emitted more than once."""

    def __str__(self) -> str:
        return (
            f"{self.copies} copies on the repartition topic, {self.late} records late, "
            f"{self.over} windows counted copies, {self.repeated} windows emitted more than once"
        )


def check_windows_at_least_once(
    view: LogView, job: WindowJob, outcome: Outcome, context: str = ""
) -> Replays:
    """What at-least-once promises, and that the state never double counts a record it
    restored: every event reaches the repartition topic; every window is emitted, every
    emission final and of the same value, at least the reference and at most the records of
    it on the repartition topic (copies included)."""
    expected = expected_windows(job.data)
    given = repartitioned(job, view.values(job.repartition_topic, 6))
    unknown = sorted(i for i in given.copies if not 0 <= i < job.data.events)
    missing = [i for i in range(job.data.events) if given.copies[i] == 0]
    assert not unknown, f"{job.repartition_topic} holds events that do not exist: {unknown[:5]}"
    assert not missing, (
        f"{len(missing)} events never reached {job.repartition_topic} (lost), e.g. "
        f"{missing[:5]}\n{context}"
    )
    late = late_event_ids(view, job)
    problems: list[tuple[Window, str]] = []
    for window in sorted(expected.keys() | outcome.emissions.keys()):
        want = expected.get(window)
        got = outcome.emissions.get(window, [])
        about = given.about(window)
        if want is None:
            problems.append((window, f"emitted {got} but the input has no event in it"))
        elif not got:
            problems.append((window, f"never emitted (reference count {want}; {about})"))
        elif not want <= got[-1] <= given.records[window]:
            problems.append(
                (
                    window,
                    f"last emitted count {got[-1]} outside [reference {want}, records on the "
                    f"repartition topic {given.records[window]}] ({about}; emissions {got})",
                )
            )
        elif any(value != got[-1] for value in got):
            problems.append((window, f"emitted different values {got} ({about})"))
    if problems:
        _fail(job, "differ from what at-least-once promises", problems, context)
    assert outcome.not_final == 0, f"{outcome.not_final} results not marked final"
    copies = given.copies.total() - job.data.events
    over = sum(1 for w, n in expected.items() if outcome.emissions[w][-1] > n)
    return Replays(copies, late.total(), over, outcome.repeated)


def wait_for_output_to_settle(
    view: LogView, job: WindowJob, *, quiet_for: float = 3.0, timeout: float = 30.0
) -> int:
    """Wait until nothing more is written to the output topic for ``quiet_for`` seconds (the
    windows still open in ``headwater worker`` processes close once the source's end reaches
    them); returns how many results it holds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        now = view.count(job.output_topic, 3)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return now
        if time.monotonic() > deadline:
            pytest.fail(f"the output topic kept growing for {timeout:.0f}s after the run ended")
        time.sleep(0.25)


# -- chaos: kill -9 workers at random, each time start a replacement -------------------------------


def kill_at_random(
    *,
    runner: Cli,
    job: WindowJob,
    view: LogView,
    sessions: Sessions,
    worker_args: Callable[[int], list[str]] | None,
    kills: int,
    pause: tuple[float, float],
    delay: tuple[float, float],
    takeover_timeout: float,
) -> Chaos:
    """``kills`` times: kill -9 a random worker, start a replacement ``headwater worker`` (or,
    with no ``worker_args``, let the runner start one in its place), and wait until every
    partition makes progress again; then more kills, up to :data:`EXTRA_KILLS`, until one has
    caught work in flight (:mod:`chaos.inflight`).

    Each kill happens mid-stream, ``delay`` seconds after the source has written a batch: while
    the workers process it, with outputs sent and offsets not committed yet (the moment a
    crash must not turn into a lost or double-counted record)."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    chaos = Chaos(seed=seed)
    started = time.monotonic()
    round_ = 0
    while round_ < kills or (
        round_ < kills + EXTRA_KILLS and not any(caught_in_flight(view, job, chaos))
    ):
        round_ += 1
        job.paused.unlink(missing_ok=True)
        time.sleep(rng.uniform(*pause))
        written = view.count(job.input_topic, 6)
        assert written < job.data.events, (
            f"kill {round_} ({kills} planned) would come after the source finished: "
            "slow the source down (PACE)"
        )
        own = worker_pids(runner.pid)
        candidates = [(pid, "run") for pid in own]
        for replacement in chaos.replacements:
            candidates += [(pid, replacement.name) for pid in worker_pids(replacement.pid)]
        assert candidates, "no worker left to kill"
        victim, whose = rng.choice(candidates)
        before = view.committed(job.group, job.input_topic, 6)
        job.wait_for_a_fresh_batch()
        time.sleep(rng.uniform(*delay))
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            logs = "".join(
                f"\n--- {c.name}:\n{tail(c.stderr())}" for c in [runner, *chaos.replacements]
            )
            pytest.fail(f"worker {victim} ({whose}) ended before the test killed it{logs}")
        job.paused.touch()  # no new input until every partition has an owner again
        chaos.killed.append((victim, whose, "at random"))
        wait_until(gone(victim), timeout=10, what=f"worker {victim} to die", interval=0.002)
        since = committed_now(view, job)  # from now on only the new owners commit
        chaos.kills.append(Kill((victim,), before, since[job.input_topic]))

        watch = [runner]
        if worker_args is None:
            wait_until(
                has_workers(runner, len(own)),
                timeout=30,
                what=f"the runner to start a worker in place of {victim}",
                watch=watch,
            )
        else:
            name = f"worker-{round_}"
            replacement = sessions.start(worker_args(round_), cwd=job.directory, name=name)
            chaos.replacements.append(replacement)
            watch.append(replacement)
            wait_until(
                has_workers(replacement, 1),
                timeout=30,
                what=f"the worker process of {name}",
                watch=watch,
            )
        wait_until(
            progress_everywhere(view, job, since=since),
            timeout=takeover_timeout,
            what=f"progress on every partition after kill {round_} (worker {victim})",
            watch=watch,
            interval=0.25,
        )
    chaos.seconds = time.monotonic() - started
    job.paused.unlink()
    return chaos


def finish_chaos(
    runner: Cli, job: WindowJob, view: LogView, chaos: Chaos, sessions: Sessions
) -> None:
    """Let the input run out; the run must end by itself with status 0. Then wait for the output
    to settle, stop the replacements (SIGTERM) and check every window."""
    assert view.count(job.input_topic, 6) < job.data.events, "the source finished during chaos"
    job.open_gate()
    code = runner.wait(120)
    stderr = runner.stderr()
    assert code == 0, tail(stderr)
    assert "Traceback" not in stderr, tail(stderr)
    assert "lag: 0 records" in stderr, tail(stderr)
    if any(whose == "run" for _, whose, _ in chaos.killed):
        assert "killed by signal 9" in stderr, tail(stderr)
    assert records_written(stderr, job.input_topic) == job.data.events, tail(stderr)

    wait_for_output_to_settle(view, job)
    survivors = [r for r in chaos.replacements if r.running()]
    assert survivors or not chaos.replacements, "no replacement worker survived"
    for replacement in survivors:
        assert worker_pids(replacement.pid), f"{replacement.name} lost its worker"
    for replacement in survivors:
        code = replacement.terminate()
        text = replacement.stderr()
        assert code in (0, 128 + signal.SIGTERM), f"{replacement.name}:\n{tail(text)}"
        assert "Traceback" not in text, f"{replacement.name}:\n{tail(text)}"
    for replacement in chaos.replacements:  # those whose worker was killed end by themselves
        replacement.wait(30)
    wait_for_no_process(sessions)

    assert view.count(job.input_topic, 6) == job.data.events
    # every offset committed, the source's end-of-time marker after each partition's records too
    assert view.committed(job.group, job.input_topic, 6) == view.ends(job.input_topic, 6)
    replays = check(view, job, chaos.describe())
    check_in_flight(view, job, chaos, None if replays is None else replays.copies)


def check(view: LogView, job: WindowJob, context: str = "") -> Replays | None:
    """What the job's guarantee promises (see the module docstring); under at-least-once,
    what the replays did."""
    outcome = read_outcome(view, job)
    if job.exactly_once:
        check_windows_exactly_once(view, job, outcome, context)
        print(f"exactly-once: {len(outcome.emissions)} windows, each emitted once; {context}")
        return None
    replays = check_windows_at_least_once(view, job, outcome, context)
    print(f"at-least-once: {replays}; {context}")
    return replays


# -- 1. embedded -----------------------------------------------------------------------------------

CHAOS_DATA = Dataset(events=200_000, users=40, span_ms=3 * HOUR_MS, window_minutes=1)
"""3 hours of events of 40 users: 7,200 one-minute windows of about 28 events."""

GUARANTEES = pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("guarantee", "replaced_by"),
    [
        ("at_least_once", "headwater worker"),
        ("exactly_once", "headwater worker"),
        ("exactly_once", "the runner"),
    ],
)
def test_chaos_embedded(
    tmp_path: Path, sessions: Sessions, guarantee: str, replaced_by: str
) -> None:
    """6 kill -9 of random workers of ``headwater run --workers 3``, each replaced by a
    hand-started ``headwater worker`` or only by the runner itself (which starts a new worker
    in place of each one killed)."""
    # while the gate is closed the source writes 1,000 events every 0.12 s: 24 s for all
    job = write_window_job(tmp_path, CHAOS_DATA, pace=0.12, guarantee=guarantee)
    data_dir = tmp_path / "log"
    view = EmbeddedView(data_dir)
    flags = ["--no-progress", "--data-dir", str(data_dir)]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "3", *flags], cwd=tmp_path, name="run"
    )
    wait_until(has_workers(runner, 3), timeout=30, what="3 workers")
    wait_until(
        lambda: view.count(job.output_topic, 3) > 0,
        timeout=30,
        what="the first closed windows",
        watch=[runner],
    )
    by_hand = replaced_by == "headwater worker"
    chaos = kill_at_random(
        runner=runner,
        job=job,
        view=view,
        sessions=sessions,
        worker_args=(
            (lambda i: ["worker", str(job.module), "--backend", "embedded", *flags])
            if by_hand
            else None
        ),
        kills=6,
        pause=(0.3, 1.2),
        delay=(0.01, 0.06),
        takeover_timeout=20,
    )
    finish_chaos(runner, job, view, chaos, sessions)
    if not by_hand:
        assert runner.stderr().count("started in place of worker") == 6, tail(runner.stderr())


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_workers_stop_when_their_runner_is_killed(tmp_path: Path, sessions: Sessions) -> None:
    """kill -9 of the runner alone, one of its workers stuck (stopped with SIGSTOP, as one
    stuck in a user function would not read its pipe): every worker dies with the runner (the
    kernel's parent-death signal); none lives on as an orphan holding partitions."""
    job = write_window_job(tmp_path, RESTART_DATA, pace=0.15)
    data_dir = tmp_path / "log"
    view = EmbeddedView(data_dir)
    flags = ["--no-progress", "--data-dir", str(data_dir)]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "3", *flags], cwd=tmp_path, name="run"
    )
    wait_until(has_workers(runner, 3), timeout=30, what="3 workers")
    wait_until(
        lambda: all(view.committed(job.group, job.repartition_topic, 6).values()),
        timeout=30,
        what="every partition to be counting",
        watch=[runner],
    )
    workers = worker_pids(runner.pid)
    os.kill(workers[0], signal.SIGSTOP)
    os.kill(runner.pid, signal.SIGKILL)
    for pid in workers:
        wait_until(gone(pid), timeout=10, what=f"worker {pid} to stop after its runner died")


# -- 2. kafka --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
@GUARANTEES
def test_chaos_kafka(
    tmp_path: Path,
    sessions: Sessions,
    kafka: str,
    kafka_names: Callable[[str], str],
    guarantee: str,
) -> None:
    # while the gate is closed the source writes 1,000 events every 0.5 s; a killed member is
    # noticed by the group coordinator after its session timeout (10 s), so each kill costs
    # 10-15 s
    job = write_window_job(
        tmp_path,
        CHAOS_DATA,
        pace=0.5,
        guarantee=guarantee,
        name=kafka_names("chaos"),
        input_topic=kafka_names("chaos-events"),
        output_topic=kafka_names("chaos-counts"),
    )
    data_dir = tmp_path / "state"
    view = KafkaView(kafka)
    flags = [
        "--no-progress",
        "--data-dir",
        str(data_dir),
        "--backend",
        "kafka",
        "--bootstrap-servers",
        kafka,
    ]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "3", *flags], cwd=tmp_path, name="run"
    )
    wait_until(has_workers(runner, 3), timeout=30, what="3 workers")
    wait_until(
        lambda: view.count(job.output_topic, 3) > 0,
        timeout=60,
        what="the first closed windows",
        watch=[runner],
        interval=0.5,
    )
    chaos = kill_at_random(
        runner=runner,
        job=job,
        view=view,
        sessions=sessions,
        worker_args=lambda i: [
            "worker",
            str(job.module),
            *flags,
            "--client-id",
            kafka_names(f"replacement-{i}"),
        ],
        kills=5,
        pause=(0.5, 2.0),
        delay=(0.02, 0.15),
        takeover_timeout=60,
    )
    finish_chaos(runner, job, view, chaos, sessions)
    if job.exactly_once:
        # the kills did catch transactions in flight: the records they had written are on the
        # log, aborted, and only a read_uncommitted client sees them
        raw = KafkaView(kafka, "read_uncommitted").values(job.repartition_topic, 6)
        aborted = sum(map(len, raw)) - job.data.events
        print(f"{aborted} records of aborted transactions on {job.repartition_topic}")
        assert aborted > 0, f"no kill caught a transaction in flight\n{chaos.describe()}"


# -- 3. kill everything at once, then run the same command again -----------------------------------

RESTART_DATA = Dataset(events=100_000, users=40, span_ms=2 * HOUR_MS, window_minutes=1)


@pytest.mark.slow
@pytest.mark.timeout(120)
@GUARANTEES
def test_restart_after_killing_everything(
    tmp_path: Path, sessions: Sessions, guarantee: str
) -> None:
    job = write_window_job(tmp_path, RESTART_DATA, pace=0.15, guarantee=guarantee)
    data_dir = tmp_path / "log"
    view = EmbeddedView(data_dir)
    command = ["run", str(job.module), "--workers", "3", "--no-progress"]
    command += ["--data-dir", str(data_dir)]
    total = job.data.events

    first = sessions.start(command, cwd=tmp_path, name="first")
    wait_until(has_workers(first, 3), timeout=30, what="3 workers")
    wait_until(
        lambda: (
            view.count(job.input_topic, 6) >= total * 0.4 and view.count(job.output_topic, 3) > 0
        ),
        timeout=60,
        what="the run to get going",
        watch=[first],
    )
    # kill -9 the runner and its workers at once: just after the source has written a batch and
    # stored its position, while it sleeps (a kill while a batch is being written could repeat
    # that batch: the source is at-least-once too) and the workers process that batch
    workers = worker_pids(first.pid)
    before = view.committed(job.group, job.input_topic, 6)
    job.wait_for_a_fresh_batch()
    time.sleep(random.uniform(0.01, 0.05))
    first.kill_session()
    for pid in workers:
        wait_until(gone(pid), timeout=10, what=f"worker {pid} to die")
    wait_for_no_process(sessions, timeout=10)  # nothing survives the kill of the whole group

    written = view.count(job.input_topic, 6)
    committed_in = view.committed(job.group, job.input_topic, 6)
    kill = Kill(tuple(workers), before, committed_in)
    first_run = set(traced_pids(tmp_path))
    committed_input = sum(committed_in.values())
    committed_at = view.committed(job.group, job.repartition_topic, 6)
    committed = sum(committed_at.values())
    assert 0 < written < total, "the source was not killed mid-stream"
    assert committed_input > 0 and committed > 0, "nothing was committed before the kill"
    copies = sorted((data_dir / "state").rglob("*.lmdb"))
    assert copies, f"no local state copy under {data_dir / 'state'}"

    job.open_gate()
    second = sessions.start(command, cwd=tmp_path, name="second")
    code = second.wait(90)
    stderr = second.stderr()
    assert code == 0, tail(stderr)
    assert "Traceback" not in stderr, tail(stderr)
    assert "lag: 0 records" in stderr, tail(stderr)
    wait_for_no_process(sessions)

    # the source resumed from its stored position: each event is on the input topic once
    assert records_written(stderr, job.input_topic) == total - written, tail(stderr)
    assert view.count(job.input_topic, 6) == total
    inputs = Counter(orjson.loads(v)["id"] for vs in view.values(job.input_topic, 6) for v in vs)
    assert inputs == Counter(range(total))
    # the second run went on from the committed offsets and state
    check_read_once_what_was_not_committed(view, job, kill, first_run)
    steps = summary_counts(stderr)
    counted = steps["count"][0]
    uncommitted = view.values(job.repartition_topic, 6, since=committed_at)
    assert counted == sum(map(len, uncommitted)), tail(stderr)
    assert counted < total, f"the second run counted {counted:,} of {total:,} records"
    check(view, job)


def check_read_once_what_was_not_committed(
    view: LogView, job: WindowJob, kill: Kill, before: set[int]
) -> None:
    """The workers of the run after ``kill`` (those not among ``before``) read each event the
    kill left not committed once, and nothing else; the kill had caught some in flight."""
    found = positions(view, job)
    caught = in_flight(job.directory, kill, found)
    report = describe(job.directory, [kill], found)
    assert caught > 0, f"the kill caught nothing in flight:\n{report}"
    left = Counter(i for i, (p, o) in found.items() if o >= kill.committed_after[p])
    later = [pid for pid in traced_pids(job.directory) if pid not in before]
    read = Counter(i for pid in later for i in read_by(job.directory, pid))
    assert read == left, (
        f"the run after the kill read {read.total():,} events; {left.total():,} were not "
        f"committed at the kill; {(read - left).total():,} read that were committed or read "
        f"twice, {(left - read).total():,} not read\n{report}"
    )


# -- 4. partitions move while windows are open -----------------------------------------------------

REBALANCE_DATA = Dataset(events=80_000, users=200, span_ms=2 * HOUR_MS, window_minutes=60)
"""Two one-hour windows per user: every user's first window is open until the source reaches
the second half of the file, and the second until the end (the source's end closes it)."""


def members(data_dir: Path, group: str) -> int:
    """The live members of an embedded consumer group (one flock-ed file each)."""
    directory = data_dir / "groups" / group / "members"
    if not directory.is_dir():
        return 0
    return sum(1 for p in directory.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rebalance_while_a_window_is_open(tmp_path: Path, sessions: Sessions) -> None:
    # 500 events every 0.1 s: 16 s for the whole file, 8 s per hour of event time
    job = write_window_job(tmp_path, REBALANCE_DATA, pace=0.1, batch=500)
    data_dir = tmp_path / "log"
    view = EmbeddedView(data_dir)
    half = job.data.events // 2
    flags = ["--no-progress", "--data-dir", str(data_dir)]
    runner = sessions.start(
        ["run", str(job.module), "--workers", "2", *flags], cwd=tmp_path, name="run"
    )
    wait_until(has_workers(runner, 2), timeout=30, what="2 workers")
    wait_until(
        lambda: all(view.committed(job.group, job.repartition_topic, 6).values()),
        timeout=30,
        what="every partition to be counting",
        watch=[runner],
    )
    assert view.count(job.output_topic, 3) == 0  # every first window is open

    # a third worker joins: it takes partitions 4 and 5 (the newest member sorts last), and
    # partition 2 moves between the runner's workers, each with its first windows open
    joining = sessions.start(
        ["worker", str(job.module), "--backend", "embedded", *flags], cwd=tmp_path, name="joining"
    )
    wait_until(lambda: members(data_dir, job.group) == 3, timeout=30, what="3 members")
    since = committed_now(view, job)
    wait_until(
        progress_everywhere(view, job, since=since),
        timeout=20,
        what="progress on every partition with 3 workers",
        watch=[runner, joining],
    )
    assert view.count(job.input_topic, 6) < half, "the first windows closed before the move"
    assert view.count(job.output_topic, 3) == 0, "the first windows closed before the move"

    # into the second hour: the first windows close, the second ones open; then the third
    # worker stops gracefully and its partitions move back with their second windows open
    wait_until(
        lambda: (
            view.count(job.output_topic, 3) > 0 and view.count(job.input_topic, 6) > half + 5000
        ),
        timeout=30,
        what="the second windows to open",
        watch=[runner, joining],
    )
    code = joining.terminate()
    assert code in (0, 128 + signal.SIGTERM), tail(joining.stderr())
    assert members(data_dir, job.group) == 2
    since = committed_now(view, job)
    wait_until(
        progress_everywhere(view, job, since=since),
        timeout=20,
        what="progress on every partition after the third worker left",
        watch=[runner],
    )
    assert view.count(job.input_topic, 6) < job.data.events, "the input ended before the move"

    job.open_gate()
    code = runner.wait(60)
    stderr = runner.stderr()
    assert code == 0, tail(stderr)
    assert "Traceback" not in stderr, tail(stderr)
    wait_for_no_process(sessions)

    joined = summary_counts(joining.stderr())
    assert joined.get("count", (0, 0))[0] > 0, "the third worker counted nothing"
    # nothing crashed: every move checkpointed, so at-least-once gives what exactly-once
    # promises: each event once on the repartition topic, each window emitted once, exactly
    check_windows_exactly_once(view, job, read_outcome(view, job))


# -- 5. what test_chaos_embedded found, reduced: the local state copy after a crash ----------------


async def test_a_restore_keeps_the_committed_changes_it_read_from_the_changelog(
    tmp_path: Path,
) -> None:
    """Three owners of one partition's state, one after the other, sharing the local copies of
    one machine (as ``headwater run`` and ``headwater worker`` do on one data directory).

    Owner A checkpoints (the local copy is saved), then commits a second checkpoint (a window
    closed: its entry deleted; another entry updated) and is killed before saving the local
    copy again. Owner B restores: the local copy, then the committed changelog records after it
    (the deletion and the update). B commits a checkpoint of its own and saves the local copy.
    Owner C restores from that copy: A's committed changes must still be there."""
    pipeline = (
        Pipeline("local-copy")
        .source(JsonLines(tmp_path / "events.jsonl"), into=Topic("events", partitions=1))
        .key_by("by-user", lambda e: e["user"])
        .window("minute", Tumbling(minutes=1), time=lambda e: e["ts"])
        .count("count")
        .sink(LogTopic(Topic("counts", partitions=1)))
    )
    topology = compile_pipeline(pipeline)
    log = EmbeddedLog(tmp_path / "log")
    await prepare_topics(log, topology)
    sub = topology.by_topic["local-copy.by-user"]
    source = TopicPartition("local-copy.by-user", 0)
    outbox = Outbox(log.producer())
    closed, updated, other = ("u1", 0, 60_000), ("u2", 0, 60_000), ("u3", 60_000, 120_000)

    def owner() -> TaskState:
        return TaskState(topology, sub, 0, tmp_path / "log" / "state")

    try:
        a = owner()
        await a.restore(log, {})
        a.stores["count"].put(closed, 10)
        a.stores["count"].put(updated, 5)
        a.flush(outbox, {source: 100})
        await outbox.send()  # then the offsets are committed at 100
        await a.persist(log)
        a.stores["count"].delete(closed)  # the window closed (its result was emitted)
        a.stores["count"].put(updated, 7)
        a.flush(outbox, {source: 200})
        await outbox.send()  # committed at 200 ... and kill -9 before the local copy is saved
        a.close()

        b = owner()
        await b.restore(log, {source: 200})
        assert b.stores["count"].get(closed) is None
        assert b.stores["count"].get(updated) == 7
        b.stores["count"].put(other, 1)
        b.flush(outbox, {source: 300})
        await outbox.send()  # committed at 300
        await b.persist(log)
        b.close()

        c = owner()
        await c.restore(log, {source: 300})
        found = {key: c.stores["count"].get(key) for key in (closed, updated, other)}
        c.close()
    finally:
        await log.close()
    assert found == {closed: None, updated: 7, other: 1}, (
        f"after a restore from the local copy B saved: {found}; A's committed changes (the "
        f"window {closed} deleted, {updated} set to 7) were read from the changelog by B but "
        "never written to the local copy, whose changelog offset B's save moved past them"
    )


# -- 6. what test_chaos_kafka[exactly_once] found, reduced: a partition idle right after its restore


async def test_a_partition_is_not_idle_right_after_its_restore(
    tmp_path: Path, kafka: str, kafka_names: Callable[[str], str]
) -> None:
    """Two owners of one partition of an exactly-once windowed count on Kafka, the second on
    another machine (no local copy of the state: it restores from the changelog).

    Owner A opens a window and commits it in a transaction. Owner B builds its task (as a
    worker does when the partition is assigned to it), restores the state, and advances as an
    idle worker does at once (when a poll finds nothing, as its first poll after an assignment
    may). The partition has not been idle: it was restoring. That must close nothing; if it
    moves the watermark to the wall clock instead, the restored windows close with what they
    had counted so far and every later record of the partition is late."""
    name = kafka_names("idle")
    pipeline = (
        Pipeline(name, processing_guarantee="exactly_once")
        .source(
            JsonLines(tmp_path / "events.jsonl"),
            into=Topic(kafka_names("idle-events"), partitions=1),
        )
        .key_by("by-user", lambda e: e["user"])
        .window("minute", Tumbling(minutes=1), time=lambda e: e["ts"], idle=timedelta(seconds=1))
        .count("count")
        .sink(LogTopic(Topic(kafka_names("idle-counts"), partitions=1)))
    )
    topology = compile_pipeline(pipeline)
    sub = topology.by_topic[f"{name}.by-user"]
    source = TopicPartition(f"{name}.by-user", 0)
    transactional_id = f"{topology.group}.{sub.index}.0"
    window = ("u1", BASE_MS, BASE_MS + 60_000)
    log = KafkaLog(KafkaSettings(bootstrap_servers=kafka))
    try:
        await prepare_topics(log, topology)
        transaction = log.transactional_producer(transactional_id)
        a = Task(topology, sub, 0, Outbox(transaction), {}, {}, None)
        await a.restore(log, {})
        a.state.stores["count"].put(window, 5)
        a.state.flush(a.outbox, {source: 5})
        await a.outbox.send()
        await transaction.commit({}, topology.group)
        await transaction.close()
        a.close()
        # the commit returns before its markers are written: wait until a read_committed
        # reader sees it (in a worker the partition moves seconds later)
        changelog = TopicPartition(f"{name}.count.changelog", 0)
        deadline = time.monotonic() + 10
        while not (await log.end_offsets([changelog]))[changelog]:
            assert time.monotonic() < deadline, "A's transaction never became visible"
            await asyncio.sleep(0.01)

        transaction = log.transactional_producer(transactional_id)
        b = Task(topology, sub, 0, Outbox(transaction), {}, {}, None)
        started = time.monotonic()
        await b.restore(log, {source: 5})
        took = time.monotonic() - started
        restored = b.pending
        moved = b.advance(idle=True)
        left = b.pending
        await transaction.close()
        b.close()
    finally:
        await log.close()
    assert restored == 1, f"owner B restored {restored} open windows, not A's one"
    assert not moved and left == 1, (
        f"an idle advance right after the restore closed {restored - left} window(s): the "
        f"restore took {took:.1f}s, longer than the window step's idle (1s), and the "
        "partition's idle timer had been running since its task was built, before the restore. "
        "In a worker this moves the partition's watermark to the wall clock: its restored "
        "windows close with partial counts and every later record of it goes to the late-data "
        "topic"
    )
