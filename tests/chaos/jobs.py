"""What the chaos tests share: a paced job written into a test's directory, what happened
during its kills, and whether the kills caught work in flight (:mod:`chaos.inflight`).

A job's source is *paced*: while the file ``gate`` next to its module does not exist it sleeps
after each stored batch (the file ``quiet`` exists while it sleeps), and writes nothing while
the file ``paused`` exists, so the run is mid-stream while a test kills workers. Its first map
step traces what each worker process reads (``inflight.TRACE``), its events numbered by a field
(:attr:`Job.event_id`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos.inflight import Kill, copy_bound, describe, in_flight, wait_for_a_fresh_batch, where
from support.cli import Cli, Sessions
from support.logs import LogView

__all__ = [
    "EXTRA_KILLS",
    "PARTITIONS",
    "Chaos",
    "Job",
    "caught_in_flight",
    "check_in_flight",
    "committed_now",
    "positions",
    "progress_everywhere",
    "wait_for_no_process",
]

PARTITIONS = 6
"""Partitions of a job's input topic and of its repartition topic."""

EXTRA_KILLS = 4
"""Kills a chaos run may add when none of the planned ones caught work in flight."""


@dataclass(frozen=True)
class Job:
    """A pipeline module written into a test's directory, with its names."""

    directory: Path
    name: str
    input_topic: str
    output_topic: str
    guarantee: str
    repartition_step: str
    """The step id of its ``key_by``."""
    event_id: str
    """The event field that numbers its events."""

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly_once"

    @property
    def module(self) -> Path:
        return self.directory / "job.py"

    @property
    def gate(self) -> Path:
        return self.directory / "gate"

    @property
    def quiet(self) -> Path:
        return self.directory / "quiet"

    @property
    def paused(self) -> Path:
        return self.directory / "paused"

    @property
    def group(self) -> str:
        return self.name

    @property
    def repartition_topic(self) -> str:
        return f"{self.name}.{self.repartition_step}"

    def open_gate(self) -> None:
        """The source reads the rest of its input at full speed."""
        self.gate.touch()

    def wait_for_a_fresh_batch(self) -> None:
        wait_for_a_fresh_batch(self.quiet)


@dataclass
class Chaos:
    """What happened during the kills."""

    killed: list[tuple[int, str, str]] = field(default_factory=list)
    """(pid, whose worker: 'run' or a replacement's name, how it was chosen) of each victim."""
    kills: list[Kill] = field(default_factory=list)
    """The input offsets around each kill, to tell what it caught in flight."""
    replacements: list[Cli] = field(default_factory=list)
    seed: int | None = None
    """The seed of the random choices, when the test chose it."""
    seconds: float = 0.0

    def describe(self) -> str:
        seed = "" if self.seed is None else f", random seed {self.seed}"
        lines = [f"kills ({self.seconds:.1f}s{seed}):"]
        lines += [f"  worker {pid} of {whose}: {how}" for pid, whose, how in self.killed]
        return "\n".join(lines)


def committed_now(view: LogView, job: Job) -> dict[str, dict[int, int]]:
    """What the job's group has committed on its input and repartition topics."""
    return {
        topic: view.committed(job.group, topic, PARTITIONS)
        for topic in (job.input_topic, job.repartition_topic)
    }


def progress_everywhere(
    view: LogView, job: Job, *, since: dict[str, dict[int, int]]
) -> Callable[[], bool]:
    """A condition: every partition of the input and repartition topics that had records not
    committed at ``since`` has had more committed: whoever owns each partition now works."""

    def check() -> bool:
        for topic, before in since.items():
            now = view.committed(job.group, topic, PARTITIONS)
            ends = view.ends(topic, PARTITIONS)
            if any(now[p] <= before[p] < ends[p] for p in range(PARTITIONS)):
                return False
        return True

    return check


def positions(view: LogView, job: Job) -> dict[int, tuple[int, int]]:
    """Event number -> (partition, offset) on the input topic."""
    return where(view.entries(job.input_topic, PARTITIONS), job.event_id)


def caught_in_flight(view: LogView, job: Job, chaos: Chaos) -> list[int]:
    """For each kill: the events its victim read and had not committed."""
    found = positions(view, job)
    return [in_flight(job.directory, kill, found) for kill in chaos.kills]


def check_in_flight(view: LogView, job: Job, chaos: Chaos, copies: int | None = None) -> None:
    """The kills caught work in flight (events read and not committed); with ``copies`` (the
    copies on the repartition topic, under at-least-once), no more copies than the killed
    workers can have read and not committed."""
    found = positions(view, job)
    caught = [in_flight(job.directory, kill, found) for kill in chaos.kills]
    report = describe(job.directory, chaos.kills, found)
    print(f"in flight:\n{report}")
    assert any(caught), (
        f"no kill caught an event read and not committed:\n{report}\n{chaos.describe()}"
    )
    if copies is not None:
        bound = copy_bound(job.directory, chaos.kills, found)
        assert copies <= bound, (
            f"{copies} copies on {job.repartition_topic}, more than the {bound} events the "
            f"killed workers can have read and not committed: a replay went back further than "
            f"the last commit\n{report}\n{chaos.describe()}"
        )


def wait_for_no_process(sessions: Sessions, timeout: float = 15.0) -> None:
    """Every process of the test's commands is gone within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := sessions.alive()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes still alive after every command was stopped: {left}"
