"""``headwater reset``: forget what a pipeline has done, so that its next run starts afresh.

Running again resumes: the sources go on from their stored positions and the workers from the
group's committed offsets, so a second run of a finished pipeline processes nothing; and
deleting the data directory by hand makes file sinks append a second copy of their output. A
reset removes exactly what makes a run resume, and what it would duplicate:

- the committed offsets of the pipeline's consumer group (on the embedded log the whole
  ``groups/<group>/`` directory, which also holds its members and claims, and the states of
  the group's exactly-once transactions; on Kafka the group itself, through the DeleteGroups
  request);
- its source-position topic, and its internal topics: ``key_by`` repartition topics, state
  changelogs and event-time mark changelogs;
- the topics its sources write into: its own copy of its input, which its sources write again
  on the next run (kept, the next run would read that input twice);
- the local copies of its state (``<data-dir>/state/<group>/``);
- the files its sinks wrote (:meth:`connectors.base.Sink.output_files`: a ``JsonLinesSink`` or
  ``CsvSink`` file, a local ``ParquetSink``'s files), unless ``keep_outputs`` (the next
  run then refuses to start until they are moved away: see
  :func:`pipelines.runtime.engine.refuse_a_second_copy`);
- what its sinks keep of its runs outside the log (:meth:`connectors.base.Sink.remembered`:
  the input offsets of a ``PostgresSink``; its table and rows stay).

The dead-letter and late-data topics stay unless ``dead_letters`` is given: they hold records
nobody processed, which a user may still want. Topics the pipeline reads with ``LogTopic`` or
writes with a ``LogTopic`` sink belong to whoever else uses them and stay; a ``LogTopic`` sink's
topic then receives a second copy, which the plan says. Only topics the compiled pipeline names
are touched, never a scan of its name prefix: the topics of a pipeline named ``a.b`` also start
with ``a.``.

The reset holds the pipeline's run lock (:mod:`pipelines.runtime.runlock`) from before it looks
until it is done, so it is refused while a runner runs the pipeline on the data directory and no
runner starts in the middle of it. Other members of the group are checked too: on the embedded
log a live member (a ``headwater worker``) makes it refuse; on Kafka the broker refuses to delete
a group that has members. Those checks come before anything is removed. Removal is idempotent:
a reset that fails half-way leaves less to remove, and running it again finishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipelines.errors import LogError, PipelineError
from pipelines.loader import load_pipeline
from pipelines.log._locks import held, locked
from pipelines.log.embedded import EmbeddedLog
from pipelines.runtime.runlock import AlreadyRunning, run_lock
from pipelines.runtime.topology import Topology, compile_pipeline
from pipelines.settings import KafkaSettings
from pipelines.steps import KeyByStep, WriteStep

__all__ = ["ResetOptions", "ResetPlan", "plan_reset", "reset", "reset_pipeline"]

T = TypeVar("T")
Kind = Literal["group", "topic", "directory", "file", "sink"]

_KAFKA_GROUP_NOT_EMPTY = 68
_KAFKA_GROUP_NOT_FOUND = 69
_KAFKA_UNKNOWN_TOPIC = 3
_KAFKA_RETRY = (14, 15, 16)  # coordinator loading, not available, not the coordinator
_KAFKA_DELETE_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class ResetOptions:
    """Which pipeline to reset, on which log, and what to keep."""

    spec: str
    backend: str = "embedded"
    data_dir: Path = Path(".headwater")
    kafka: KafkaSettings | None = None
    keep_outputs: bool = False
    """Keep the files the sinks wrote (``JsonLinesSink``, ``CsvSink``, ``ParquetSink``...)."""
    dead_letters: bool = False
    """Also remove the dead-letter and late-data topics."""

    def compile(self) -> Topology:
        group = self.kafka.group_id if self.kafka is not None else None
        return compile_pipeline(load_pipeline(self.spec), group=group)


@dataclass(frozen=True, slots=True)
class Item:
    """One thing a reset removes or keeps: a group's offsets, a topic, a directory, a file."""

    kind: Kind
    name: str
    why: str

    def __str__(self) -> str:
        if self.kind == "group":
            return f"committed offsets of consumer group {self.name!r}: {self.why}"
        if self.kind == "topic":
            return f"topic {self.name!r}: {self.why}"
        if self.kind == "sink":
            return f"what sink step {self.name!r} keeps: {self.why}"
        return f"{self.kind} {self.name}: {self.why}"


@dataclass(slots=True)
class ResetPlan:
    """What a reset of one pipeline removes, and what it deliberately keeps."""

    pipeline: str
    where: str
    remove: list[Item] = field(default_factory=list)
    keep: list[Item] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The plan as the command prints it."""
        if not self.remove:
            lines = [f"nothing to reset for pipeline {self.pipeline!r} on {self.where}"]
        else:
            lines = [f"resetting pipeline {self.pipeline!r} on {self.where} removes:"]
            lines += [f"  {item}" for item in self.remove]
        if self.keep:
            lines.append("and keeps:")
            lines += [f"  {item}" for item in self.keep]
        return lines


# -- the stores a reset removes from -----------------------------------------------------------


class _Store(ABC):
    """Where a backend keeps topics and consumer groups, as far as a reset needs."""

    where: str

    @abstractmethod
    async def topics(self) -> set[str]:
        """The names of the topics that exist."""

    @abstractmethod
    async def group(self, group: str) -> str | None:
        """Where the group's committed offsets are, or None if it has none."""

    async def check_idle(self, group: str) -> None:  # noqa: B027 - most stores need nothing
        """Raise if members of ``group`` are running (before anything is removed)."""

    @abstractmethod
    async def remove_group(self, group: str) -> None:
        """Remove the group and its committed offsets."""

    @abstractmethod
    async def remove_topics(self, names: Sequence[str]) -> None:
        """Delete the topics ``names`` (they exist)."""

    async def close(self) -> None:  # noqa: B027 - most stores hold nothing
        """Release the store's connections."""


class _NoLog(_Store):
    """The memory backend: every run starts from an empty log, nothing outlives it."""

    def __init__(self) -> None:
        self.where = "the memory log (nothing on it outlives a run)"

    async def topics(self) -> set[str]:
        return set()

    async def group(self, group: str) -> str | None:
        return None

    async def remove_group(self, group: str) -> None:
        return None

    async def remove_topics(self, names: Sequence[str]) -> None:
        return None


class _EmbeddedStore(_Store):
    """The embedded log's directory (see :mod:`pipelines.log.embedded` for its layout)."""

    def __init__(self, data_dir: Path) -> None:
        self.where = f"the embedded log in {data_dir}"
        self._topics = data_dir / "topics"
        self._groups = data_dir / "groups"
        self._data_dir = data_dir

    async def topics(self) -> set[str]:
        if not self._topics.is_dir():
            return set()
        return {path.parent.name for path in self._topics.glob("*/topic.json")}

    async def group(self, group: str) -> str | None:
        path = self._groups / group
        return f"the directory {path}{os.sep}" if path.is_dir() else None

    async def check_idle(self, group: str) -> None:
        members = self._groups / group / "members"
        live = [path.name for path in sorted(members.glob("*")) if held(path)]
        if live:
            raise PipelineError(
                f"cannot reset: {len(live)} worker(s) of consumer group {group!r} are running on "
                f"the embedded log in {self._data_dir} (headwater worker processes, or a run "
                "started from another directory); stop them first, then run headwater reset "
                "again. Nothing was removed"
            )

    async def remove_group(self, group: str) -> None:
        # first the group's exactly-once transaction states: a recovery must not store the
        # offsets of their last commits into the group's next run
        log = EmbeddedLog(self._data_dir)
        try:
            log.forget_transactions(group)
        finally:
            await log.close()
        shutil.rmtree(self._groups / group, ignore_errors=False)

    async def remove_topics(self, names: Sequence[str]) -> None:
        with locked(self._topics / ".lock"):  # the lock topic creation takes
            for name in names:
                directory = self._topics / name
                (directory / "topic.json").unlink(missing_ok=True)  # gone for readers first
                shutil.rmtree(directory)


class _KafkaStore(_Store):
    """A Kafka cluster, through aiokafka's admin client built as :mod:`pipelines.log.kafka`
    builds it. aiokafka has no public call to delete a consumer group: the DeleteGroups
    request goes to the group's coordinator through the admin client's request method."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.where = f"Kafka at {settings.bootstrap_servers}"
        self._settings = settings
        self._admin: Any = None

    async def _call(self, what: str, action: Callable[[Any], Awaitable[T]]) -> T:
        """``action(admin)``, or a clear error when the cluster does not answer in time."""
        from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415 (optional aiokafka)
        from aiokafka.errors import KafkaError  # noqa: PLC0415 (optional aiokafka)

        settings = self._settings
        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(**settings.client_options())
                await asyncio.wait_for(admin.start(), settings.connect_timeout)
                self._admin = admin
            return await asyncio.wait_for(action(self._admin), settings.connect_timeout)
        except (TimeoutError, KafkaError, OSError) as error:
            raise LogError(
                f"cannot {what} on Kafka at {settings.bootstrap_servers} within "
                f"{settings.connect_timeout:g}s ({str(error) or type(error).__name__}); check "
                "--bootstrap-servers (HEADWATER_BOOTSTRAP_SERVERS) and that the brokers are up",
                retriable=True,
            ) from error

    async def topics(self) -> set[str]:
        names = await self._call("list topics", lambda admin: admin.list_topics())
        return {name for name in names if not name.startswith("__")}

    async def group(self, group: str) -> str | None:
        groups = await self._call("list consumer groups", lambda a: a.list_consumer_groups())
        return "the group on the cluster" if any(found[0] == group for found in groups) else None

    async def remove_group(self, group: str) -> None:
        from aiokafka.protocol.admin import DeleteGroupsRequest  # noqa: PLC0415 (optional aiokafka)

        async def delete(admin: Any) -> int:
            coordinator = await admin.find_coordinator(group)
            response = await admin._send_request(DeleteGroupsRequest([group]), coordinator)
            return int(dict(response.results).get(group, 0))

        for _ in range(10):
            code = await self._call("delete the consumer group", delete)
            if code not in _KAFKA_RETRY:
                break
            await asyncio.sleep(0.5)
        if code == _KAFKA_GROUP_NOT_EMPTY:
            raise PipelineError(
                f"cannot reset: consumer group {group!r} on {self.where} has members (workers "
                "of the pipeline are running, here or on other machines); stop them first, then "
                "run headwater reset again. Nothing was removed"
            )
        if code not in (0, _KAFKA_GROUP_NOT_FOUND):
            raise LogError(
                f"Kafka refused to delete consumer group {group!r} (error code {code}); nothing "
                "was removed: run headwater reset again once the cluster is healthy"
            )

    async def remove_topics(self, names: Sequence[str]) -> None:
        response = await self._call("delete topics", lambda a: a.delete_topics(list(names)))
        for name, code, *_ in response.topic_error_codes:
            if code not in (0, _KAFKA_UNKNOWN_TOPIC):
                raise LogError(
                    f"Kafka refused to delete topic {name!r} (error code {code}); run headwater "
                    "reset again to finish the reset (what was removed stays removed)"
                )
        await self._wait_until_gone(names)

    async def _wait_until_gone(self, names: Sequence[str]) -> None:
        """Topic deletion is asynchronous on Kafka: a run started before it completes would
        find the old topics, which would then vanish under it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _KAFKA_DELETE_WAIT
        while set(names) & await self.topics():
            if loop.time() > deadline:
                raise LogError(
                    f"Kafka accepted to delete topics {sorted(names)} but they still exist "
                    f"after {_KAFKA_DELETE_WAIT:g}s; wait, and run headwater reset again before "
                    "running the pipeline"
                )
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


def _store(options: ResetOptions) -> _Store:
    if options.backend == "memory":
        return _NoLog()
    if options.backend == "embedded":
        return _EmbeddedStore(options.data_dir)
    if options.backend == "kafka":
        return _KafkaStore(options.kafka or KafkaSettings())
    raise PipelineError(f"unknown log backend {options.backend!r}")


# -- the plan ------------------------------------------------------------------------------


def _internal_topics(topology: Topology) -> list[tuple[str, str]]:
    """Each topic a run resumes from, with why it goes."""
    pipeline = topology.pipeline
    topics = [(topology.positions_topic.name, "where the sources resume from")]
    topics += [
        (s.topic.name, f"what source {s.step_id!r} wrote; its next run writes it again")
        for s in topology.source_steps
    ]
    topics += [
        (s.topic.name, f"repartition topic of key_by {s.step_id!r}")
        for s in pipeline.steps
        if isinstance(s, KeyByStep)
    ]
    topics += [
        (t.name, f"state changelog of step {step_id!r}")
        for step_id, t in topology.changelogs.items()
    ]
    topics += [
        (t.name, f"event-time marks of sub-topology {index}")
        for index, t in topology.marks_changelogs.items()
    ]
    return topics


def _failure_topics(topology: Topology) -> list[tuple[str, str]]:
    """The topics of records nobody processed: dead letters and late data."""
    topics = [(topology.pipeline.dead_letter_topic.name, "dead letters")]
    topics += [
        (t.name, f"late data of step {step_id!r}") for step_id, t in topology.late_topics.items()
    ]
    return topics


def _output_files(topology: Topology) -> list[tuple[Path, str]]:
    return [
        (path, f"output of {type(step.sink).__name__} step {step.step_id!r}")
        for step in topology.sink_steps
        for path in step.sink.output_files(topology.pipeline.name, step.step_id)
    ]


def _topic_items(
    topology: Topology, options: ResetOptions, existing: set[str]
) -> tuple[list[Item], list[Item]]:
    remove: dict[str, Item] = {}
    keep: list[Item] = []
    for name, why in _internal_topics(topology):
        remove.setdefault(name, Item("topic", name, why))
    for name, why in _failure_topics(topology):
        if options.dead_letters:
            remove.setdefault(name, Item("topic", name, why))
        elif name in existing:
            keep.append(Item("topic", name, f"{why} (--dead-letters removes it too)"))
    for step in topology.pipeline.steps:
        if isinstance(step, WriteStep) and step.topic.name in existing:
            why = f"written by sink step {step.step_id!r}, which appends to it again next run"
            keep.append(Item("topic", step.topic.name, why))
    found = [item for name, item in remove.items() if name in existing]
    return found, keep


def _local_items(topology: Topology, options: ResetOptions) -> tuple[list[Item], list[Item]]:
    remove: list[Item] = []
    keep: list[Item] = []
    state = options.data_dir / "state" / topology.group
    if options.backend != "memory" and state.is_dir():
        remove.append(Item("directory", f"{state}{os.sep}", "local copies of the state"))
    if options.backend == "kafka":
        keep.append(
            Item(
                "directory",
                f"{Path('<data-dir>', 'state', topology.group)}{os.sep}",
                "on the other machines that ran workers: remove it there too",
            )
        )
    for path, why in _output_files(topology):
        if not path.exists():
            continue
        if options.keep_outputs:
            keep.append(
                Item(
                    "file",
                    str(path),
                    f"{why} (--keep-outputs); move it away before the next run, which "
                    "refuses to add a second copy to it",
                )
            )
        else:
            remove.append(Item("file", str(path), why))
    return remove, keep


async def _sink_items(topology: Topology) -> list[Item]:
    """What sinks outside the log keep of the pipeline's runs (a database sink's offsets)."""
    items = []
    for step in topology.sink_steps:
        found = await step.sink.remembered(topology.pipeline.name, step.step_id)
        if found is not None:
            items.append(Item("sink", step.step_id, found))
    return items


async def plan_reset(topology: Topology, options: ResetOptions, store: _Store) -> ResetPlan:
    """What resetting ``topology``'s pipeline removes, as things are now."""
    plan = ResetPlan(topology.pipeline.name, store.where)
    where = await store.group(topology.group)
    if where is not None:
        why = f"where the workers resume from ({where})"
        plan.remove.append(Item("group", topology.group, why))
    topics, kept_topics = _topic_items(topology, options, await store.topics())
    local, kept_local = _local_items(topology, options)
    plan.remove += topics + local + await _sink_items(topology)
    plan.keep += kept_topics + kept_local
    return plan


async def _apply(plan: ResetPlan, topology: Topology, store: _Store) -> list[str]:
    """Remove what ``plan`` lists (the group first: on Kafka that is what may be refused);
    the lines that say what was removed."""
    if any(item.kind == "group" for item in plan.remove):
        await store.remove_group(topology.group)
    topics = [item.name for item in plan.remove if item.kind == "topic"]
    if topics:
        await store.remove_topics(topics)
    for item in plan.remove:
        if item.kind == "directory":
            shutil.rmtree(item.name)
        elif item.kind == "file":
            Path(item.name).unlink(missing_ok=True)
        elif item.kind == "sink":
            sink = next(s.sink for s in topology.sink_steps if s.step_id == item.name)
            await sink.forget(topology.pipeline.name, item.name)
    return [f"removed {item}" for item in plan.remove]


# -- the command ---------------------------------------------------------------------------


@contextlib.contextmanager
def _holding_run_lock(data_dir: Path, pipeline: str) -> Iterator[None]:
    """The pipeline's run lock, when a runner could hold it (the data directory exists)."""
    if not data_dir.is_dir():
        yield
        return
    try:
        with run_lock(data_dir, pipeline):
            yield
    except AlreadyRunning:
        path = data_dir / "runs" / f"{pipeline}.lock"
        holder = path.read_text(errors="replace").strip() or "unknown"
        raise PipelineError(
            f"cannot reset pipeline {pipeline!r}: it is running on data directory {data_dir} "
            f"(runner pid {holder}); stop it first (Ctrl-C, or kill {holder}), then run "
            "headwater reset again. Nothing was removed"
        ) from None


def _confirmation_refused(plan: ResetPlan) -> PipelineError:
    names = {
        "group": "committed offsets",
        "topic": "topics",
        "directory": "local state",
        "sink": "sink offsets",
    }
    kinds = list(dict.fromkeys(names.get(item.kind, "output files") for item in plan.remove))
    return PipelineError(
        f"resetting pipeline {plan.pipeline!r} on {plan.where} removes its "
        f"{', '.join(kinds)} ({len(plan.remove)} items), so reset asks first, but standard input "
        "is not a terminal; run it in a terminal to see the list and answer, or pass --yes to "
        "reset without asking. Nothing was removed"
    )


async def reset(
    options: ResetOptions,
    *,
    confirm: Callable[[ResetPlan], bool],
    say: Callable[[str], None],
) -> bool:
    """Reset the pipeline ``options.spec`` names, once ``confirm(plan)`` says yes; ``say``
    prints each line of the outcome. Whether anything was removed."""
    topology = options.compile()
    with _holding_run_lock(options.data_dir, topology.pipeline.name):
        store = _store(options)
        try:
            await store.check_idle(topology.group)
            plan = await plan_reset(topology, options, store)
            if not plan.remove:
                for line in plan.lines():
                    say(line)
                return False
            if not confirm(plan):
                say("headwater reset: nothing was removed")
                return False
            for line in await _apply(plan, topology, store):
                say(line)
        finally:
            await store.close()
    for item in plan.keep:
        say(f"kept {item}")
    say(f"headwater reset: done; the next run of {plan.pipeline!r} starts from the beginning")
    return True


def reset_pipeline(options: ResetOptions, *, yes: bool) -> int:
    """``headwater reset``: print the plan, ask on a terminal unless ``yes``, reset, print what
    was removed. Without a terminal and without ``yes`` it refuses, removing nothing."""

    def confirm(plan: ResetPlan) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise _confirmation_refused(plan)
        print("\n".join(plan.lines()), flush=True)
        answer = input(f"Reset pipeline {plan.pipeline!r}? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    asyncio.run(reset(options, confirm=confirm, say=print))
    return 0
