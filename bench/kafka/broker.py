"""What ``bench/kafka/compare.py`` does on the broker itself, the same for every framework.

* topics: created with the admin client (output topics with ``LogAppendTime``, so every output
  record carries the moment the broker appended it) and deleted after each run;
* the throughput input: N events written behind a :class:`Gate` (an open transaction) that is
  opened once every worker is in the group;
* the throughput watch: polls the group's membership and the output topic's end offsets (never
  reads the records, which would take CPU from the framework under test), then reads the
  broker's append time of the first and the last output record; it also samples the CPU time
  of the framework's processes, of the broker and of the whole machine (:class:`CpuSample`)
  when the gate opens and when the output is complete;
* the latency phase: a producer at a steady rate that stamps each event's ``ts`` with the
  wall-clock ms it is sent (aiokafka's, with no linger, so that the load is the same whatever
  Headwater's producer does), and a reader of the output topic that takes ``now - ts``;
* :func:`prefill`: plain input for ``profile_worker.py``, with Headwater's batch producer.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from clicks import clicks_below, encode_events

from pipelines.errors import LogError
from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.kafka import KafkaLog
from pipelines.settings import KafkaSettings

PREFILL_BATCH = 5000
POLL_SECONDS = 0.05
SETTLE_SECONDS = 0.5
"""After the output count is reached: how long it must stay put (duplicates would add more)."""
GATE_TIMEOUT_MS = 300_000
"""How long the gate's transaction may stay open (the workers' start-up must fit)."""
DRAIN_GRACE = 10.0
"""Latency phase: seconds the reader waits for the last records after the producer stops."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def partitions_of(topic: str, partitions: int) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(partitions)]


def kafka_log(bootstrap: str) -> KafkaLog:
    return KafkaLog(KafkaSettings(bootstrap_servers=bootstrap, client_id="headwater-bench"))


# -- topics ---------------------------------------------------------------------------------


async def wait_for_broker(bootstrap: str, timeout: float) -> None:
    """Return once the broker answers (it may be restarting), or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-bench")
        try:
            await admin.start()
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)
        else:
            return
        finally:
            await admin.close()


async def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int, *, append_time: bool = False
) -> None:
    """Create ``names``; with ``append_time`` the broker stamps records when it appends them."""
    configs = {"message.timestamp.type": "LogAppendTime"} if append_time else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-bench")
    await admin.start()
    try:
        new = [NewTopic(name, partitions, 1, topic_configs=configs) for name in names]
        response = await admin.create_topics(new)
        for name, code, *_ in response.topic_errors:
            if code:
                raise RuntimeError(f"creating topic {name} failed with error code {code}")
    finally:
        await admin.close()
    await wait_for_leaders(bootstrap, names, partitions)


async def wait_for_leaders(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Wait until every partition of ``names`` answers for its end offset (has a leader)."""
    log = kafka_log(bootstrap)
    wanted = [tp for name in names for tp in partitions_of(name, partitions)]
    try:
        for _ in range(100):
            try:
                await log.end_offsets(wanted)
            except LogError:
                await asyncio.sleep(0.1)
            else:
                return
        raise RuntimeError(f"topics {list(names)} have no leaders")
    finally:
        await log.close()


async def delete_topics(bootstrap: str, prefixes: Sequence[str]) -> list[str]:
    """Delete every topic whose name starts with one of ``prefixes``; returns their names."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-bench")
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(tuple(prefixes))]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


async def prefill(bootstrap: str, topic: str, partitions: int, records: int) -> None:
    """Append ``records`` events to ``topic``, spread evenly over its partitions."""
    log = kafka_log(bootstrap)
    producer = log.producer()
    try:
        stamp = now_ms()
        for index, start in enumerate(range(0, records, PREFILL_BATCH)):
            count = min(PREFILL_BATCH, records - start)
            values: list[bytes | None] = list(encode_events(start, count, stamp))
            batch = RawBatch([None] * count, values, [stamp] * count)
            await producer.send(topic, index % partitions, batch)
            if index % 20 == 19:
                await producer.flush()
    finally:
        await producer.close()
        await log.close()


# -- CPU ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds (user + system) used so far by the framework's processes (those launched
    and every process under them), by the broker, by this process and by the whole machine;
    NaN where ``/proc`` is missing. Differences of two samples say who used the CPU between
    them."""

    at: float
    framework: float
    broker: float
    own: float
    machine: float

    @classmethod
    def take(cls, roots: Sequence[int], broker: int | None) -> CpuSample:
        """A sample of the processes ``roots`` and those under them, and of ``broker``."""
        stats = _process_stats()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in stats.items():
            children.setdefault(parent, []).append(pid)
        tree, todo = set(), [pid for pid in roots if pid in stats]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += children.get(pid, [])
        own = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            at=time.monotonic(),
            framework=sum(stats[pid][1] for pid in tree) if stats else float("nan"),
            broker=stats[broker][1] if broker in stats else float("nan"),
            own=own.ru_utime + own.ru_stime,
            machine=_machine_busy(),
        )

    def minus(self, before: CpuSample) -> CpuSample:
        return CpuSample(
            at=self.at - before.at,
            framework=self.framework - before.framework,
            broker=self.broker - before.broker,
            own=self.own - before.own,
            machine=self.machine - before.machine,
        )

    @property
    def other_cores(self) -> float:
        """Cores the rest of the machine kept busy on average (of a difference of samples):
        neither the framework, nor the broker, nor this benchmark."""
        rest = self.machine - self.framework - self.broker - self.own
        return rest / self.at if self.at > 0 else float("nan")


def _process_stats() -> dict[int, tuple[int, float]]:
    """Every process's parent and CPU seconds (empty without ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir() if Path("/proc/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after the name: state ppid ... utime (14th field of the line) stime (15th)
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return stats


def broker_process(bootstrap: str) -> int | None:
    """The process listening on the port of ``bootstrap`` on this machine (the broker), if
    ``/proc`` tells."""
    port = f"{int(bootstrap.rsplit(':', 1)[1]):04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state, inode = (row.split()[i] for i in (1, 3, 9))
            if local.endswith(f":{port}") and state == "0A":  # 0A: listening
                inodes.add(f"socket:[{inode}]")
    for entry in Path("/proc").iterdir() if inodes else ():
        if entry.name.isdigit() and _holds(entry, inodes):
            return int(entry.name)
    return None


def _holds(process: Path, sockets: set[str]) -> bool:
    try:
        return any(os.readlink(fd) in sockets for fd in (process / "fd").iterdir())
    except OSError:
        return False  # gone, or not ours to look at


def _machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (NaN without ``/proc/stat``)."""
    try:
        ticks = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- throughput -----------------------------------------------------------------------------


class Gate:
    """The input of one throughput run, held back until every worker is in the group.

    :meth:`fill` writes the events in one Kafka transaction and leaves it open; consumers that
    read committed data only (Headwater's and librdkafka's default, so Quix's) see none of it.
    :meth:`open` commits the transaction, and the whole input becomes readable at once. Without
    this, the first worker to join would process much of the input alone while the group
    rebalances to let the second one in (the group protocol is eager for every framework here).
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._topic = topic
        self._partitions = partitions
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="headwater-bench",
            transactional_id=f"{topic}-gate",
            enable_idempotence=True,
            transaction_timeout_ms=GATE_TIMEOUT_MS,
            max_batch_size=1 << 20,
            max_request_size=4 << 20,
            linger_ms=5,
        )

    async def fill(self, records: int) -> None:
        """Write ``records`` events, spread evenly over the partitions, in an open transaction."""
        producer = self._producer
        await producer.start()
        await producer.begin_transaction()
        stamp = now_ms()
        pending = []
        for index, start in enumerate(range(0, records, PREFILL_BATCH)):
            builder = producer.create_batch()
            for value in encode_events(start, min(PREFILL_BATCH, records - start), stamp):
                if builder.append(key=None, value=value, timestamp=stamp) is None:
                    pending.append(await self._send(builder, index))
                    builder = producer.create_batch()
                    builder.append(key=None, value=value, timestamp=stamp)
            pending.append(await self._send(builder, index))
        await asyncio.gather(*pending)

    async def _send(self, builder: Any, index: int) -> asyncio.Future[Any]:
        partition = index % self._partitions
        future: asyncio.Future[Any] = await self._producer.send_batch(
            builder, self._topic, partition=partition
        )
        return future

    async def open(self) -> None:
        await self._producer.commit_transaction()

    async def close(self) -> None:
        await self._producer.stop()


@dataclass(slots=True)
class Watch:
    """What the throughput watch saw, on the wall clock (seconds since the epoch)."""

    launched: float
    ready: float | None = None
    """When the group was first seen stable with every worker in it."""
    opened: float | None = None
    """When the input's transaction was committed (right after ``ready``)."""
    output_at_open: int = 0
    """Output records already on the topic then: a framework that reads uncommitted data
    (faust) starts before the gate opens, and those records are not counted."""
    output: int = 0
    first_append: float | None = None
    last_append: float | None = None
    """The broker's append time of the first and the last output record."""
    cpu: CpuSample | None = None
    """Who used the CPU from the gate opening to the output found complete."""
    error: str | None = None


class Workers(Protocol):
    """The framework's processes, as the watch sees them."""

    def running(self) -> bool: ...

    def pids(self) -> list[int]: ...


async def group_members(admin: AIOKafkaAdminClient, group: str) -> int:
    """Members of ``group`` if it is stable (its partitions handed out), else 0."""
    responses = await admin.describe_consumer_groups([group])
    for response in responses:
        for described in response.groups:
            _error, _group, state, _protocol_type, _protocol, members, *_ = described
            if state == "Stable":
                return len(members)
    return 0


async def output_count(log: KafkaLog, topic: str, partitions: int) -> int:
    return sum((await log.end_offsets(partitions_of(topic, partitions))).values())


async def append_times(log: KafkaLog, topic: str, partitions: int) -> tuple[float, float]:
    """The broker's append time (s) of the first and of the last record on ``topic``."""
    ends = await log.end_offsets(partitions_of(topic, partitions))
    firsts, lasts = [], []
    for tp, end in ends.items():
        if end == 0:
            continue
        firsts.append((await log.read(tp, 0, 1)).records.timestamps[0])
        lasts.append((await log.read(tp, end - 1, 1)).records.timestamps[-1])
    return min(firsts) / 1000, max(lasts) / 1000


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """What the throughput watch waits for."""

    group: str
    members: int
    topic: str
    partitions: int
    expected: int
    timeout: float


@dataclass(slots=True)
class Watcher:
    """Polls one throughput run from outside (see the module docstring)."""

    target: WatchTarget
    log: KafkaLog
    admin: AIOKafkaAdminClient
    workers: Workers
    watch: Watch
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.target.timeout

    def failed(self, count: int) -> bool:
        """Note why the run cannot finish, if it cannot."""
        expected = self.target.expected
        if not self.workers.running():
            self.watch.error = f"the processes exited after {count:,} of {expected:,} records"
        elif time.monotonic() > self.deadline:
            self.watch.error = f"timed out after {count:,} of {expected:,} output records"
        return self.watch.error is not None

    async def count(self) -> int:
        return await output_count(self.log, self.target.topic, self.target.partitions)

    async def until_ready(self) -> bool:
        """Wait until the group is stable with every worker in it."""
        while await group_members(self.admin, self.target.group) < self.target.members:
            if self.failed(await self.count()):
                return False
            await asyncio.sleep(POLL_SECONDS)
        self.watch.ready = time.time()
        return True

    async def until_done(self, opened: CpuSample, broker: int | None) -> None:
        """Wait until every output record is on the topic, and has stayed put for a moment
        (duplicates would add more); note the CPU used from ``opened`` until the first."""
        reached: float | None = None
        while True:
            count = await self.count()
            if count >= self.target.expected:
                if self.watch.cpu is None:
                    done = CpuSample.take(self.workers.pids(), broker)
                    self.watch.cpu = done.minus(opened)
                if count != self.watch.output:
                    reached = time.monotonic()
                elif reached is not None and time.monotonic() - reached >= SETTLE_SECONDS:
                    return
            self.watch.output = count
            if count < self.target.expected and self.failed(count):
                return
            await asyncio.sleep(POLL_SECONDS)


async def watch_throughput(
    bootstrap: str, target: WatchTarget, gate: Gate, launch: Callable[[], Workers]
) -> Watch:
    """Start the workers with ``launch``, open the gate once they are all in the group, and
    watch until the output is complete."""
    log = kafka_log(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-bench")
    await admin.start()
    watch = Watch(time.time())
    try:
        workers = launch()
        watcher = Watcher(target, log, admin, workers, watch)
        broker = broker_process(bootstrap)
        if await watcher.until_ready():
            opened = CpuSample.take(workers.pids(), broker)
            await gate.open()
            watch.opened = time.time()
            watch.output_at_open = await watcher.count()
            await watcher.until_done(opened, broker)
        if watch.output:
            watch.first_append, watch.last_append = await append_times(
                log, target.topic, target.partitions
            )
    finally:
        await admin.close()
        await log.close()
    return watch


# -- latency --------------------------------------------------------------------------------


@dataclass(slots=True)
class Clock:
    """The latency phase's schedule. It starts once the first output record has been read and
    the group is stable with every worker in it: records stamped before ``warmup`` seconds after
    that are not measured, and the producer stops ``seconds`` later."""

    warmup: float
    seconds: float
    startup_timeout: float
    started: float = field(default_factory=time.time)
    first_output: float | None = None
    group_ready: float | None = None

    @property
    def ready(self) -> float | None:
        if self.first_output is None or self.group_ready is None:
            return None
        return max(self.first_output, self.group_ready)

    @property
    def measure_from_ms(self) -> float:
        ready = self.ready
        return float("inf") if ready is None else (ready + self.warmup) * 1000

    def producing(self) -> bool:
        ready = self.ready
        if ready is None:
            return time.time() < self.started + self.startup_timeout
        return time.time() < ready + self.warmup + self.seconds


async def watch_group(bootstrap: str, group: str, members: int, clock: Clock) -> None:
    """Set ``clock.group_ready`` once ``group`` is stable with ``members`` members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-bench")
    await admin.start()
    try:
        while clock.producing():
            if await group_members(admin, group) >= members:
                clock.group_ready = time.time()
                return
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await admin.close()


async def steady_producer(
    bootstrap: str, topic: str, partitions: int, rate: int, tick: float, clock: Clock
) -> int:
    """Send ``rate`` events/s in small batches every ``tick`` seconds, each batch stamped with
    the wall-clock ms it is sent, round-robin over the partitions, each acknowledged before the
    next; returns the events sent."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="headwater-bench",
        acks="all",
        linger_ms=0,
        max_batch_size=1 << 20,
    )
    await producer.start()
    start = time.monotonic()
    sent = rotation = 0
    try:
        while clock.producing():
            due = int((time.monotonic() - start) * rate) - sent
            if due > 0:
                stamp = now_ms()
                builder = producer.create_batch()
                for value in encode_events(sent, due, stamp):
                    builder.append(key=None, value=value, timestamp=stamp)
                builder.close()  # complete: sent at once, no linger
                await (await producer.send_batch(builder, topic, partition=rotation % partitions))
                rotation += 1
                sent += due
            await asyncio.sleep(tick)
    finally:
        await producer.stop()
    return sent


async def latency_reader(
    bootstrap: str, topic: str, partitions: int, clock: Clock, producing: asyncio.Task[int]
) -> tuple[int, list[float]]:
    """Read the output topic until every click the producer sent is out (or a grace period
    after it stopped): records read, and the latency (ms) of each measured one."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="headwater-bench",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,
    )
    await consumer.start()
    consumer.assign([KafkaPartition(topic, p) for p in range(partitions)])
    latencies: list[float] = []
    received = 0
    deadline: float | None = None
    try:
        while True:
            received += await _read_some(consumer, clock, latencies)
            if producing.done():
                if received >= clicks_below(producing.result()):
                    return received, latencies
                deadline = deadline or time.monotonic() + DRAIN_GRACE
                if time.monotonic() > deadline:
                    return received, latencies
            elif clock.ready is None and not clock.producing():
                return received, latencies
    finally:
        await consumer.stop()


async def _read_some(consumer: AIOKafkaConsumer, clock: Clock, latencies: list[float]) -> int:
    fetched = await consumer.getmany(timeout_ms=20)
    read_at = time.time() * 1000
    got = 0
    loads = orjson.loads
    for messages in fetched.values():
        got += len(messages)
        if clock.first_output is None and messages:
            clock.first_output = read_at / 1000
        measure_from = clock.measure_from_ms
        for message in messages:
            stamp = loads(message.value)["ts"]
            if stamp >= measure_from:
                latencies.append(read_at - stamp)
    return got
