"""The ``embedded`` backend: a durable partitioned log in a local directory, the default.

Several processes on one machine use the same directory at once (the runner's source tasks and
its worker processes). The layout under the data directory::

    topics/<topic>/topic.json          the topic's spec
    topics/<topic>/<partition>.log     the partition (see :mod:`._partition_file`)
    groups/<group>/members/<id>        one file per live member, flock-ed while it lives
    groups/<group>/claims/<t>.<p>      flock-ed by the member that owns partition p of t
    groups/<group>/offsets/<t>.<p>     the committed offset (see ._offsets_file)
    groups/<group>/committed/<t>.<p>   empty: the group has committed on partition p of t
    groups/<group>/commits/*.commit    exactly-once commits an earlier version left (see ._commits)
    transactions/<id>.state            an exactly-once transaction's commit record (._transactions)
    transactions/<id>.owner            flock-ed by the owner of that transactional id

Liveness and ownership are ``flock`` locks, so the kernel releases them the moment a process
dies, even under ``kill -9``: survivors see the dead member gone at their next membership check
(every 0.2 s) and claim its partitions.

An offsets file that is missing where ``committed/`` says the group has committed was deleted:
reading the partition again from its start would process its records twice, so the log stops
with :class:`~pipelines.errors.CorruptLogError` instead (deleting the whole ``groups/<group>/``
is a fresh start). The marker is created right after a partition's first committed offset, so
a crash between the two leaves no marker (the group never committed there, as far as anyone
knows) rather than a marker without its offset. A commit overwrites the offsets file in place
(one small write, with a checksum); a process's first commit on a partition writes a temporary
file and renames it over the old one, so it is either the old or the new file after any crash
(see :mod:`._offsets_file`). A file that cannot be read or written (its permissions, a full
disk) raises :class:`~pipelines.errors.LogError` naming it and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import orjson

from pipelines.errors import CorruptLogError, LogError, PipelineDefinitionError, TopicError
from pipelines.log import _offsets_file
from pipelines.log._commits import CommitRecord, pending_commits, read_commit
from pipelines.log._compaction import TOMBSTONE_MS, compact
from pipelines.log._local import (
    AppendWaiter,
    LocalLog,
    Membership,
    new_member_id,
)
from pipelines.log._locks import locked, try_lock
from pipelines.log._partition_file import (
    DEFAULT_SEGMENT_BYTES,
    OffsetOutOfRange,
    PartitionFile,
    disk_error,
)
from pipelines.log._transactions import EmbeddedTransaction, Transactions, fsync_directory
from pipelines.log._wakeup import TopicWatch
from pipelines.log.base import (
    FetchedBatch,
    RawBatch,
    TopicPartition,
    TopicSpec,
    TransactionalProducer,
)

__all__ = ["DEFAULT_DATA_DIR", "EmbeddedLog"]

DEFAULT_DATA_DIR = Path(".headwater")
_POLL_SECONDS = 0.005


def _write_atomically(path: Path, data: bytes, *, fsync: bool = False) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as file:
            file.write(data)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    if fsync:
        fsync_directory(path.parent)


@contextlib.contextmanager
def _on_disk(path: Path, doing: str) -> Iterator[None]:
    """Turn an :class:`OSError` of the block into a :class:`LogError` naming ``path``, the cause
    and the fix (see :func:`~._partition_file.disk_error`)."""
    try:
        yield
    except OSError as error:
        raise disk_error(path, doing, error) from error


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a :class:`LogError` if that cannot be told (permissions)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        raise disk_error(path, "look for", error) from error
    return True


SEGMENT_BYTES_VARIABLE = "HEADWATER_SEGMENT_BYTES"
"""The size at which a partition starts a new segment file (64 MiB by default): whole sealed
segments are what retention, purges and compaction remove or rewrite."""
SEGMENT_MS_VARIABLE = "HEADWATER_SEGMENT_MS"
"""How long a partition's active segment of a topic the housekeeping looks after (a purged,
retained or compacted one) may stay open before it is sealed however small it is (an hour by
default; a topic's ``retention_ms`` if shorter): what lets an idle partition's last records
expire, be purged or compacted."""
SEGMENT_MS = 3_600_000
TOMBSTONE_MS_VARIABLE = "HEADWATER_TOMBSTONE_MS"
"""How long compaction keeps a tombstone after its segment was sealed (an hour by default)."""


def _positive_from_env(variable: str, default: int, what: str) -> int:
    """A positive integer setting from the environment, or ``default``."""
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise PipelineDefinitionError(
            f"{variable}={raw!r}: give {what}, a positive integer (the default is {default})"
        )
    return value


def _expired(file: PartitionFile, spec: TopicSpec, now_ms: int) -> int:
    """The offset below which ``spec``'s retention lets ``file``'s sealed segments go (0 for
    none)."""
    segments = file.segments()
    sizes = [_size(path) for _, _, path in segments]
    left = sum(sizes)
    expired = 0
    stable = file.stable_end()  # (never past a transaction still open)
    for (base, end, _), size in zip(segments[:-1], sizes, strict=False):
        if end > stable:
            break
        too_old = False
        if spec.retention_ms is not None:
            seal = file.seal_of(base)
            too_old = seal is not None and seal.newest < now_ms - spec.retention_ms
        too_big = spec.retention_bytes is not None and left - size >= spec.retention_bytes
        if not (too_old or too_big):
            break
        expired, left = end, left - size
    return expired


def _size(path: Path) -> int:
    """Bytes of a segment file (0 once another process removed it)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise disk_error(path, "look at", error) from error


def _file_name(tp: TopicPartition) -> str:
    return f"{tp.topic}.{tp.partition}"


_TOPIC_FIELDS = ("partitions", "compacted", "retention_ms")


def _read_topic_spec(topic_dir: Path) -> TopicSpec | None:
    """The spec in ``topic_dir/topic.json``; None while there is none (a topic being created)."""
    path = topic_dir / "topic.json"
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise disk_error(path, "read", error) from error
    try:
        meta = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        empty = not data.strip()
        raise _damaged_topic(
            topic_dir, "it is empty" if empty else f"it is not valid JSON ({error})", None
        ) from None
    wrong = _topic_problem(meta)
    if wrong is not None:
        raise _damaged_topic(topic_dir, wrong, meta)
    return TopicSpec(
        topic_dir.name,
        meta["partitions"],
        meta["compacted"],
        meta["retention_ms"],
        meta.get("retention_bytes"),  # (absent from topics made before it existed)
    )


def _topic_problem(meta: object) -> str | None:
    """What is wrong with the content of a ``topic.json``, or None. Only the partition count is
    checked further: ``compacted`` and ``retention_ms`` describe the topic, nothing reads them."""
    if not isinstance(meta, dict):
        return f"it holds {orjson.dumps(meta).decode()[:40]} where an object belongs"
    missing = [field for field in _TOPIC_FIELDS if field not in meta]
    if missing:
        return f"it lacks {', '.join(repr(field) for field in missing)}"
    partitions = meta["partitions"]
    if not isinstance(partitions, int) or partitions < 1:
        return f"its partition count {partitions!r} is not a whole number of at least 1"
    return None


def _damaged_topic(topic_dir: Path, problem: str, meta: object) -> CorruptLogError:
    path = topic_dir / "topic.json"
    old = meta if isinstance(meta, dict) else {}
    files = _partition_files(topic_dir)
    stated = old.get("partitions")
    kept = isinstance(stated, int) and stated >= max(files, 1)  # a count the files agree with
    expected = {
        "partitions": stated if kept else files or "N",
        "compacted": old.get("compacted", False),
        "retention_ms": old.get("retention_ms"),
    }
    content = orjson.dumps(expected).decode().replace('"N"', "N")
    if files and not kept:
        rewrite = (
            f"write it again: judging by its partition files, the last of which is "
            f"{files - 1}.log, it should hold {content}"
        )
    else:
        rewrite = f"write it again as {content}"
        if expected["partitions"] == "N":
            rewrite += ", where N is the number of partitions the pipeline declares for the topic"
    return CorruptLogError(
        f"{path}, the configuration of topic {topic_dir.name!r}, is damaged: {problem}. "
        f'Restore it from a copy, or {rewrite} (with "compacted" and "retention_ms" as '
        "the pipeline declares them)"
    )


def _partition_files(topic_dir: Path) -> int:
    """How many partitions the ``<p>.log`` files in ``topic_dir`` tell of (0 if none)."""
    try:
        numbers = [int(p.stem) for p in topic_dir.glob("*.log") if p.stem.isdecimal()]
    except OSError:
        return 0
    return max(numbers, default=-1) + 1


class _FileMembership(Membership):
    def __init__(self, group_dir: Path) -> None:
        self.member_id = new_member_id()
        self._members = group_dir / "members"
        self._claims_dir = group_dir / "claims"
        with _on_disk(group_dir, "join the consumer group in"):
            self._members.mkdir(parents=True, exist_ok=True)
            self._claims_dir.mkdir(parents=True, exist_ok=True)
            # lock under a temporary name, then rename: nobody ever sees our file unlocked
            temporary = self._members / f".{self.member_id}.joining"
            fd = try_lock(temporary)
            if fd is None:
                raise LogError(f"cannot lock member file {temporary}")
            self._member_fd = fd
            os.replace(temporary, self._members / self.member_id)
        self._claims: dict[TopicPartition, int] = {}

    def live_members(self) -> list[str]:
        with _on_disk(self._members, "list the members of the consumer group in"):
            return self._live_members()

    def _live_members(self) -> list[str]:
        alive = []
        for path in self._members.iterdir():
            name = path.name
            if name.startswith("."):
                continue
            if name == self.member_id:
                alive.append(name)
                continue
            try:
                fd = try_lock(path)
            except FileNotFoundError:
                continue
            if fd is None:
                alive.append(name)
            else:  # its process is gone: clean up after it
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.close(fd)
        return sorted(alive)

    def try_claim(self, tp: TopicPartition) -> bool:
        if tp in self._claims:
            return True
        path = self._claims_dir / _file_name(tp)
        with _on_disk(path, "claim the partition with"):
            fd = try_lock(path)
        if fd is None:
            return False
        self._claims[tp] = fd
        return True

    def release(self, tp: TopicPartition) -> None:
        fd = self._claims.pop(tp, None)
        if fd is not None:
            os.close(fd)

    def leave(self) -> None:
        for tp in list(self._claims):
            self.release(tp)
        with contextlib.suppress(OSError):
            (self._members / self.member_id).unlink()
        os.close(self._member_fd)


class EmbeddedLog(LocalLog):
    """A durable log in ``data_dir`` shared by the processes of one machine."""

    name = "embedded"

    def __init__(
        self,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        *,
        fsync: bool = False,
        segment_bytes: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._fsync = fsync
        self._segment_bytes = segment_bytes or _positive_from_env(
            SEGMENT_BYTES_VARIABLE, DEFAULT_SEGMENT_BYTES, "the segment size in bytes"
        )
        self._tombstone_ms = _positive_from_env(
            TOMBSTONE_MS_VARIABLE, TOMBSTONE_MS, "how long compaction keeps a tombstone, in ms"
        )
        self._segment_ms = _positive_from_env(
            SEGMENT_MS_VARIABLE, SEGMENT_MS, "how long a segment may stay open, in ms"
        )
        # the active segment of each partition rolled by age, and when it was first seen holding
        # records (in this process: a restart only delays a roll)
        self._open_since: dict[TopicPartition, tuple[int, int]] = {}
        self._topics_dir = self.data_dir / "topics"
        self._groups_dir = self.data_dir / "groups"
        for directory in (self._topics_dir, self._groups_dir):
            with _on_disk(directory, "create"):
                directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[TopicPartition, PartitionFile] = {}
        # (group, partition) known to have their committed/ marker: checked once per process
        self._marked: set[tuple[str, TopicPartition]] = set()
        self._waiters: weakref.WeakSet[TopicWatch] = weakref.WeakSet()  # closed with the log
        self._transactions = Transactions(
            self.data_dir / "transactions",
            file=self._file,
            store_offsets=self.store_offsets,
            fsync=fsync,
        )

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        lock = self._topics_dir / ".lock"
        with _on_disk(lock, "lock"), locked(lock):
            existing = await self.describe_topics()
            for spec in specs:
                found = existing.get(spec.name)
                if found is not None:
                    if found.partitions != spec.partitions:
                        raise TopicError(
                            f"topic {spec.name!r} exists in {self.data_dir} with "
                            f"{found.partitions} partitions, not {spec.partitions}; delete the "
                            "data directory or give the topic another name"
                        )
                    continue
                if spec.partitions < 1:
                    raise TopicError(f"topic {spec.name!r} needs at least one partition")
                self._create_topic(spec)

    def _create_topic(self, spec: TopicSpec) -> None:
        topic_dir = self._topics_dir / spec.name
        meta = {
            "partitions": spec.partitions,
            "compacted": spec.compacted,
            "retention_ms": spec.retention_ms,
            "retention_bytes": spec.retention_bytes,
        }
        with _on_disk(topic_dir / "topic.json", "write"):
            topic_dir.mkdir(exist_ok=True)
            _write_atomically(topic_dir / "topic.json", orjson.dumps(meta), fsync=self._fsync)

    async def describe_topics(self) -> dict[str, TopicSpec]:
        specs = {}
        for topic_dir in self._topic_dirs():
            spec = _read_topic_spec(topic_dir)
            if spec is not None:
                specs[spec.name] = spec
        return specs

    def _topic_dirs(self) -> list[Path]:
        with _on_disk(self._topics_dir, "list the topics in"), os.scandir(self._topics_dir) as it:
            return [Path(entry.path) for entry in it if entry.is_dir()]

    def _file(self, tp: TopicPartition) -> PartitionFile:
        found = self._files.get(tp)
        if found is None:
            topic_dir = self._topics_dir / tp.topic
            if not _exists(topic_dir / "topic.json"):
                raise TopicError(f"no topic {tp.topic!r} in {self.data_dir}")
            found = self._files[tp] = PartitionFile(
                topic_dir / f"{tp.partition}.log",
                fsync=self._fsync,
                segment_bytes=self._segment_bytes,
            )
        return found

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's last stable offset: records of transactions not decided yet and
        what follows them are not counted (as Kafka's ``read_committed`` consumers see it)."""
        return {tp: self._file(tp).stable_end() for tp in partitions}

    def _offsets_dir(self, group: str) -> Path:
        return self._groups_dir / group / "offsets"

    def _marker(self, group: str, tp: TopicPartition) -> Path:
        return self._groups_dir / group / "committed" / _file_name(tp)

    async def committed_offsets(
        self, group: str, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        found = {}
        for tp in partitions:
            offset = self._committed_offset(group, tp)
            if offset is not None:
                found[tp] = offset
        return found

    def _committed_offset(self, group: str, tp: TopicPartition) -> int | None:
        path = self._offsets_dir(group) / _file_name(tp)
        found = self._read_offset(path)
        if found is None:
            if not _exists(self._marker(group, tp)):
                return None  # never committed
            # the marker follows the first offsets file: look again, it may be just written
            found = self._read_offset(path)
            if found is None:
                raise self._deleted_offset(group, tp, path)
        offset, raw = found
        if offset is None:
            raise CorruptLogError(
                f"the committed offset of group {group!r} on {tp} is damaged: {path} holds "
                f"{raw[:40]!r}, not a number. Headwater stops rather than guess where to "
                "go on; write the offset to resume from into that file (0 to read the "
                "partition again from its start)"
            )
        return offset

    @staticmethod
    def _read_offset(path: Path) -> tuple[int | None, bytes] | None:
        try:
            return _offsets_file.read(path)
        except OSError as error:
            raise disk_error(path, "read the committed offset in", error) from error

    def _deleted_offset(self, group: str, tp: TopicPartition, path: Path) -> CorruptLogError:
        end = self._file(tp).end_offset()
        return CorruptLogError(
            f"the committed offset of group {group!r} on {tp} was deleted: {path} is missing, "
            f"though {self._marker(group, tp)} records that the group committed there. "
            "Resuming from the start of the partition would process its records again, so "
            "Headwater stops instead. Restore the file from a copy; or write the offset to "
            f"resume from into it (0 processes the partition again, {end} skips to its end); "
            "or run `headwater reset` to start the whole pipeline afresh"
        )

    def append(self, tp: TopicPartition, batch: RawBatch) -> None:
        self._file(tp).append(batch)

    def read_now(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        try:
            records, offsets, next_offset = self._file(tp).read(offset, max_records)
        except OffsetOutOfRange as error:
            raise OffsetOutOfRange(
                f"cannot read offset {offset:,} of topic {tp.topic!r} partition "
                f"{tp.partition}: the log now starts at offset {error.log_start:,}, as the "
                "topic's retention removed the records before it while this consumer was "
                "behind. Give the topic a longer retention_ms, or run `headwater reset` to "
                "process what is left from the start",
                log_start=error.log_start,
            ) from None
        return FetchedBatch(tp.topic, tp.partition, records, offsets, next_offset)

    def store_offsets(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        offsets_dir = self._offsets_dir(group)
        with _on_disk(offsets_dir, "create"):
            offsets_dir.mkdir(parents=True, exist_ok=True)
        for tp, offset in offsets.items():
            first = (group, tp) not in self._marked
            path = offsets_dir / _file_name(tp)
            try:
                # a process's first one whole, durably (with fsync): its marker must never
                # outlive it; then in place
                if first or not _offsets_file.write_in_place(path, offset):
                    _write_atomically(path, _offsets_file.record(offset), fsync=self._fsync)
            except OSError as error:
                doing = f"write the committed offset of group {group!r} on {tp} to"
                raise disk_error(path, doing, error) from error
            if first:
                self._mark_committed(group, tp)

    def _mark_committed(self, group: str, tp: TopicPartition) -> None:
        """Record that ``group`` has committed on ``tp``, once its offsets file is in place:
        an empty file, created whole or not at all; once per process and partition, so that
        later commits pay nothing for it."""
        marker = self._marker(group, tp)
        with _on_disk(marker, "write"):
            marker.parent.mkdir(exist_ok=True)
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))
            if self._fsync:
                fsync_directory(marker.parent)
        self._marked.add((group, tp))

    def membership(self, group: str) -> Membership:
        return _FileMembership(self._groups_dir / group)

    def transactional_producer(self, transactional_id: str) -> TransactionalProducer:
        return EmbeddedTransaction(self._transactions, transactional_id)

    def recover_transactions(self, group: str) -> None:
        """Finish the commits (and abort the open transactions) of every transactional id whose
        owner is gone (see :mod:`._transactions`), and the commit files of ``group`` that an
        earlier version left."""
        self._transactions.recover_all()
        commits = self._groups_dir / group / "commits"
        with _on_disk(commits, "read the pending commits in"):
            pending = pending_commits(commits)
        for path in pending:
            with _on_disk(path, "recover the commit"):
                self._recover(path)

    def forget_transactions(self, group: str) -> None:
        """Forget the transaction states whose last commit was for ``group`` (``headwater
        reset``: they must not store the group's old offsets again)."""
        self._transactions.forget_group(group)

    def _apply(self, record: CommitRecord) -> None:
        """Apply a commit file of an earlier version: its frames (each once, by their marks)
        and its offsets."""
        mark = (record.transaction, record.sequence)
        for tp, batch in record.batches:
            self._file(tp).append(batch, mark)
        self.store_offsets(record.group, record.offsets)

    def _recover(self, path: Path) -> None:
        try:
            fd = try_lock(path, create=False)  # (creating it would leave an empty commit)
        except FileNotFoundError:
            return  # its writer just finished
        if fd is None:
            return  # its writer is alive and applying it
        try:
            if not path.exists():
                return  # its writer finished while this waited for the lock
            if path.stat().st_size == 0:
                # never a commit (those are renamed into place whole): the empty file an earlier
                # version's recovery created when a commit went between listing and locking
                path.unlink()
                return
            self._apply(read_commit(path))
            path.unlink()
        finally:
            os.close(fd)

    async def start_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return {tp: self._file(tp).log_start() for tp in partitions}

    async def purge(self, below: Mapping[TopicPartition, int]) -> None:
        for tp, offset in below.items():
            self._file(tp).drop(below=offset)

    async def compact(self, specs: Sequence[TopicSpec], now_ms: int) -> None:
        """Compact each partition of the compacted topics among ``specs`` whose sealed
        segments are dirty enough (see :mod:`pipelines.log._compaction`), in a thread: it
        reads and rewrites whole segments, which must not hold up the caller's event loop."""
        for spec in specs:
            if not spec.compacted:
                continue
            for partition in range(spec.partitions):
                tp = TopicPartition(spec.name, partition)
                await asyncio.to_thread(self._compact_partition, tp, now_ms)

    def _compact_partition(self, tp: TopicPartition, now_ms: int) -> None:
        """Compact one partition with a partition file of its own (the log's are used by the
        event loop meanwhile), unless another process is compacting it."""
        path = self._file(tp).path
        with _on_disk(path, "compact"):
            fd = try_lock(path.with_suffix(".compacting.lock"))
        if fd is None:
            return
        file = PartitionFile(path, fsync=self._fsync, segment_bytes=self._segment_bytes)
        try:
            compact(
                file,
                segment_bytes=self._segment_bytes,
                now_ms=now_ms,
                tombstone_ms=self._tombstone_ms,
            )
        finally:
            file.close()
            os.close(fd)

    async def enforce_retention(self, specs: Sequence[TopicSpec], now_ms: int) -> None:
        """Remove each partition's sealed segments, oldest first, while their newest record
        is older than the topic's ``retention_ms``, or while the segments after them still
        hold ``retention_bytes``: the active segment stays, so a partition keeps at most one
        segment's worth past its retention."""
        for spec in specs:
            for partition in range(spec.partitions):
                file = self._file(TopicPartition(spec.name, partition))
                expired = _expired(file, spec, now_ms)
                if expired:
                    file.drop(below=expired)

    async def roll_segments(self, specs: Sequence[TopicSpec], now_ms: int) -> None:
        """Seal each partition's active segment once it has held records for
        ``HEADWATER_SEGMENT_MS`` (or the topic's ``retention_ms``, if shorter), however small:
        only sealed segments are dropped or compacted, so a partition that went quiet would
        otherwise keep its last records for good. Writers follow the seal into a new segment."""
        for spec in specs:
            age = min(self._segment_ms, spec.retention_ms or self._segment_ms)
            for partition in range(spec.partitions):
                tp = TopicPartition(spec.name, partition)
                file = self._file(tp)
                base, end, _ = file.segments()[-1]
                if end == base:
                    continue  # empty: nothing to let go
                seen = self._open_since.get(tp)
                if seen is None or seen[0] != base:
                    self._open_since[tp] = (base, now_ms)
                elif now_ms - seen[1] >= age:
                    file.roll()
                    del self._open_since[tp]

    def size_on_disk(self, tp: TopicPartition) -> tuple[int, int, int]:
        """A partition's first offset still on the log, its segment files and their bytes."""
        file = self._file(tp)
        segments = file.segments()
        size = 0
        for _, _, path in segments:
            with contextlib.suppress(FileNotFoundError):
                size += path.stat().st_size
        return file.log_start(), len(segments), size

    def compacted_to(self, tp: TopicPartition) -> tuple[int, float] | None:
        """The offset up to which the partition was compacted and when (seconds since the
        epoch), or None if it never was (see :mod:`pipelines.log._compaction`)."""
        clean = self._file(tp).path.with_suffix(".clean")
        try:
            return int(clean.read_bytes()), clean.stat().st_mtime
        except (FileNotFoundError, ValueError):
            return None
        except OSError as error:
            raise disk_error(clean, "read", error) from error

    def append_waiter(self) -> AppendWaiter:
        """Wakes a consumer as soon as a file of a topic it reads changes (inotify on Linux),
        or polls through :meth:`wait_for_append`: see :mod:`pipelines.log._wakeup`."""
        waiter = TopicWatch(self, self._topics_dir)
        self._waiters.add(waiter)
        return waiter

    async def wait_for_append(self, timeout: float) -> None:
        """Look again shortly: the poll of consumers that cannot be woken (no inotify)."""
        await asyncio.sleep(min(timeout, _POLL_SECONDS))

    async def close(self) -> None:
        for waiter in list(self._waiters):
            waiter.close()
        for file in self._files.values():
            file.close()
        self._files.clear()
