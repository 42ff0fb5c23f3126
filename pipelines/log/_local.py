"""What the ``memory`` and ``embedded`` backends share: a producer that appends directly and a
consumer group whose members agree on an assignment without a coordinator.

Each member computes the same range assignment from the sorted list of live members, so no
leader is needed. A partition changes hands only through a *claim*: a member starts fetching a
partition only once it holds the partition's claim, and the previous owner releases the claim
after its ``on_revoked`` callback has committed. A dead member's claims are released by the
storage (the kernel drops the file locks of a killed process on ``embedded``), so survivors pick
its partitions up at their next membership check.

Standby replicas (a pipeline's ``standby_replicas``): from the same member list and assignment,
each member also computes which partitions it keeps a warm standby copy of the state for
(:func:`standby_assignment`): those of the next member down the sorted list, so every member's
tasks have a standby on another member once there are two. While a member waits for partitions
assigned to it (their owner is still handing them over), :meth:`GroupConsumer.unclaimed` says
which, so that it keeps their standbys warm until it takes them over.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence

from pipelines.errors import CorruptLogError, LogError, TopicError
from pipelines.log.base import (
    Consumer,
    FetchedBatch,
    LogBackend,
    Producer,
    RawBatch,
    RebalanceListener,
    TopicPartition,
)

__all__ = [
    "AppendWaiter",
    "GroupConsumer",
    "LocalLog",
    "Membership",
    "range_assignment",
    "standby_assignment",
]

REBALANCE_CHECK_SECONDS = 0.2
_member_ids = itertools.count()


class Membership(ABC):
    """One member's view of a consumer group on local storage."""

    member_id: str

    @abstractmethod
    def live_members(self) -> list[str]:
        """The ids of the members alive now, this one included, sorted."""

    @abstractmethod
    def try_claim(self, tp: TopicPartition) -> bool:
        """Take exclusive ownership of ``tp`` if nobody holds it."""

    @abstractmethod
    def release(self, tp: TopicPartition) -> None:
        """Give up ownership of ``tp``."""

    @abstractmethod
    def leave(self) -> None:
        """Release every claim and leave the group."""


def range_assignment(
    members: Sequence[str], partitions: Mapping[str, int]
) -> dict[str, set[TopicPartition]]:
    """Kafka's range assignor: each topic's partitions split into contiguous runs over the
    sorted members, so equal-sized topics are co-partitioned on the same member."""
    ordered = sorted(members)
    result: dict[str, set[TopicPartition]] = {m: set() for m in ordered}
    if not ordered:
        return result
    for topic, count in partitions.items():
        share, extra = divmod(count, len(ordered))
        start = 0
        for index, member in enumerate(ordered):
            size = share + (1 if index < extra else 0)
            result[member].update(TopicPartition(topic, p) for p in range(start, start + size))
            start += size
    return result


def standby_assignment(
    members: Sequence[str], assignment: Mapping[str, set[TopicPartition]]
) -> dict[str, set[TopicPartition]]:
    """Which partitions each member keeps a standby of: member ``i`` of the sorted members
    stands by those ``assignment`` gives member ``i - 1`` (the last one stands by the first's),
    so a member's partitions have their standby on another member; with one member, none."""
    ordered = sorted(members)
    if len(ordered) < 2:
        return {m: set() for m in ordered}
    return {
        member: set(assignment.get(ordered[index - 1], set()))
        for index, member in enumerate(ordered)
    }


def new_member_id() -> str:
    """A member id unique on this machine and sortable by creation."""
    return f"{time.time_ns():020d}-{next(_member_ids)}"


class LocalLog(LogBackend):
    """A backend whose storage is reachable directly from this process."""

    @abstractmethod
    def append(self, tp: TopicPartition, batch: RawBatch) -> None:
        """Append ``batch`` to ``tp``; it is durable (as the backend defines it) on return."""

    @abstractmethod
    def read_now(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        """Read synchronously from ``offset``."""

    @abstractmethod
    def store_offsets(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Durably record committed offsets."""

    @abstractmethod
    def membership(self, group: str) -> Membership:
        """Join ``group`` as a new member."""

    @abstractmethod
    async def wait_for_append(self, timeout: float) -> None:
        """Return when something may have been appended, or after ``timeout`` seconds."""

    def recover_transactions(self, group: str) -> None:
        """Finish the commits of ``group`` that a crash interrupted (before reading offsets)."""

    def append_waiter(self) -> AppendWaiter:
        """What a consumer of this log waits on while it has nothing to read (one each)."""
        return AppendWaiter(self)

    async def read(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        return self.read_now(tp, offset, max_records)

    def producer(self) -> Producer:
        return LocalProducer(self)

    def consumer(self, group: str) -> Consumer:
        return GroupConsumer(self, group)


class AppendWaiter:
    """How a :class:`GroupConsumer` waits for records appended to the partitions it owns. This
    one waits on :meth:`LocalLog.wait_for_append`, whatever the partitions; a backend whose
    writers are other processes does better (see :mod:`pipelines.log._wakeup`)."""

    def __init__(self, log: LocalLog) -> None:
        self._log = log

    def follow(self, partitions: Collection[TopicPartition]) -> None:
        """Wait for appends to ``partitions`` (the consumer's assignment) from now on: called
        when the assignment changes, before the consumer reads the partitions it got, so that
        whatever is appended to them after that read ends the next :meth:`wait`."""

    async def wait(self, timeout: float) -> None:
        """Return soon after something is appended to the partitions followed (at once if it
        was since the consumer last read them), or after ``timeout`` seconds."""
        await self._log.wait_for_append(timeout)

    def close(self) -> None:
        """Let go of what the waiter holds."""


class LocalProducer(Producer):
    """Appends each batch as it is sent: a sent batch is already acknowledged."""

    def __init__(self, log: LocalLog) -> None:
        self._log = log

    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        if len(batch):
            self._log.append(TopicPartition(topic, partition), batch)

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


class GroupConsumer(Consumer):
    """A consumer group member over a :class:`LocalLog` (see the module docstring)."""

    def __init__(self, log: LocalLog, group: str) -> None:
        self._log = log
        self._group = group
        self._membership: Membership | None = None
        self._listener: RebalanceListener | None = None
        self._partition_counts: dict[str, int] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._standby: frozenset[TopicPartition] = frozenset()
        self._unclaimed: frozenset[TopicPartition] = frozenset()
        self._next_check = 0.0
        self._rotation = 0
        self._waiter = log.append_waiter()

    @property
    def member_id(self) -> str:
        if self._membership is None:
            raise LogError("the consumer has not subscribed yet")
        return self._membership.member_id

    async def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        existing = await self._log.describe_topics()
        missing = [t for t in topics if t not in existing]
        if missing:
            raise TopicError(f"cannot subscribe to missing topic(s) {', '.join(missing)}")
        self._partition_counts = {t: existing[t].partitions for t in topics}
        self._listener = listener
        self._membership = self._log.membership(self._group)
        self._next_check = 0.0

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._positions)

    def standby_partitions(self) -> frozenset[TopicPartition]:
        """The partitions this member keeps a standby of (:func:`standby_assignment`), as of
        its last membership check."""
        return self._standby

    def unclaimed(self) -> frozenset[TopicPartition]:
        """The partitions assigned to this member at its last membership check that it has
        not claimed yet (their owner is handing them over)."""
        return self._unclaimed

    async def poll(self, max_records: int, timeout: float) -> list[FetchedBatch]:
        deadline = time.monotonic() + timeout
        while True:
            await self._check_membership()
            batches = self._fetch(max_records)
            now = time.monotonic()
            if batches or now >= deadline:
                return batches
            # until the next membership check at the latest: it may bring partitions
            await self._waiter.wait(min(deadline, self._next_check) - now)

    def _fetch(self, max_records: int) -> list[FetchedBatch]:
        owned = sorted(self._positions)
        if not owned:
            return []
        self._rotation = (self._rotation + 1) % len(owned)
        budget = max_records
        batches = []
        for tp in owned[self._rotation :] + owned[: self._rotation]:
            if budget <= 0:
                break
            fetched = self._log.read_now(tp, self._positions[tp], budget)
            # no records but a position that moved: a hole (offsets whose records were lost to
            # damage, see `headwater log check --repair`); handed on, so that it is committed
            if len(fetched.records) or fetched.next_offset > self._positions[tp]:
                batches.append(fetched)
                budget -= len(fetched.records)
                self._positions[tp] = fetched.next_offset
        return batches

    async def _check_membership(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + REBALANCE_CHECK_SECONDS
        membership, listener = self._require_subscribed()
        members = membership.live_members()
        assignment = range_assignment(members, self._partition_counts)
        target = assignment.get(membership.member_id, set())
        standby = standby_assignment(members, assignment).get(membership.member_id, set())
        revoked = frozenset(tp for tp in self._positions if tp not in target)
        if revoked:
            await listener.on_revoked(revoked)
            for tp in revoked:
                del self._positions[tp]
                membership.release(tp)
            self._waiter.follow(self._positions.keys())
        claimed = [tp for tp in sorted(target - self._positions.keys()) if membership.try_claim(tp)]
        if claimed:
            self._log.recover_transactions(self._group)
            committed = await self._log.committed_offsets(self._group, claimed)
            _check_within(self._group, committed, await self._log.end_offsets(claimed))
            starts = await self._log.start_offsets(claimed)
            for tp in claimed:  # nothing committed: from the first record still on the log
                self._positions[tp] = committed.get(tp, starts[tp])
            self._waiter.follow(self._positions.keys())  # before the first read of the claimed
            await listener.on_assigned(frozenset(claimed))
        self._standby = frozenset(standby)
        self._unclaimed = frozenset(target - self._positions.keys())
        if len(self._positions) < len(target):
            self._next_check = now + REBALANCE_CHECK_SECONDS / 4  # a claim is still held elsewhere

    def _require_subscribed(self) -> tuple[Membership, RebalanceListener]:
        if self._membership is None or self._listener is None:
            raise LogError("poll() before subscribe()")
        return self._membership, self._listener

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        foreign = [str(tp) for tp in offsets if tp not in self._positions]
        if foreign:
            raise LogError(f"cannot commit partitions this member does not own: {foreign}")
        self._log.store_offsets(self._group, offsets)

    async def close(self) -> None:
        self._waiter.close()
        if self._membership is None:
            return
        if self._positions and self._listener is not None:
            await self._listener.on_revoked(frozenset(self._positions))
        self._positions.clear()
        self._membership.leave()
        self._membership = None


def _check_within(
    group: str, committed: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]
) -> None:
    """Refuse a committed offset beyond its partition's end: reading on from there would skip
    every record appended until the partition grows past it."""
    for tp, offset in committed.items():
        if offset > ends[tp]:
            raise CorruptLogError(
                f"group {group!r} committed offset {offset:,} on {tp}, beyond the partition's "
                f"end ({ends[tp]:,} records): records were removed from the partition (a "
                "truncated or replaced file) or its offsets file was changed. Headwater stops "
                "rather than skip the records that come next; set the offset to resume from "
                "(on the embedded log: the file groups/<group>/offsets/<topic>.<partition> of "
                "the data directory)"
            )


async def sleep_until_appended(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` for at most ``timeout`` seconds, then clear it."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return
    event.clear()
