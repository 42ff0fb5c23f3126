"""The ``embedded`` backend: a durable partitioned log in a local directory, the default.

Several processes on one machine use the same directory at once (the runner's source tasks and
its worker processes). The layout under the data directory::

    topics/<topic>/topic.json          the topic's spec
    topics/<topic>/<partition>.log     the partition (see :mod:`._partition_file`)
    groups/<group>/members/<id>        one file per live member, flock-ed while it lives
    groups/<group>/claims/<t>.<p>      flock-ed by the member that owns partition p of t
    groups/<group>/offsets/<t>.<p>     the committed offset, replaced atomically
    groups/<group>/commits/*.commit    exactly-once commits not yet applied (see ._commits)

Liveness and ownership are ``flock`` locks, so the kernel releases them the moment a process
dies, even under ``kill -9``: survivors see the dead member gone at their next membership check
(every 0.2 s) and claim its partitions. A committed offset is written to a temporary file and
renamed over the old one, so it is either the old or the new value after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import orjson

from pipelines.errors import CorruptLogError, LogError, TopicError
from pipelines.log._commits import CommitRecord, pending_commits, read_commit, write_commit
from pipelines.log._local import LocalLog, LocalTransaction, Membership, new_member_id
from pipelines.log._partition_file import PartitionFile
from pipelines.log.base import FetchedBatch, RawBatch, TopicPartition, TopicSpec

__all__ = ["DEFAULT_DATA_DIR", "EmbeddedLog"]

DEFAULT_DATA_DIR = Path(".headwater")
_POLL_SECONDS = 0.005


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _FileMembership(Membership):
    def __init__(self, group_dir: Path) -> None:
        self.member_id = new_member_id()
        self._members = group_dir / "members"
        self._claims_dir = group_dir / "claims"
        self._members.mkdir(parents=True, exist_ok=True)
        self._claims_dir.mkdir(parents=True, exist_ok=True)
        # lock under a temporary name, then rename: nobody ever sees our file unlocked
        temporary = self._members / f".{self.member_id}.joining"
        fd = _try_lock(temporary)
        if fd is None:
            raise LogError(f"cannot lock member file {temporary}")
        self._member_fd = fd
        os.replace(temporary, self._members / self.member_id)
        self._claims: dict[TopicPartition, int] = {}

    def live_members(self) -> list[str]:
        alive = []
        for path in self._members.iterdir():
            name = path.name
            if name.startswith("."):
                continue
            if name == self.member_id:
                alive.append(name)
                continue
            try:
                fd = _try_lock(path)
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
        fd = _try_lock(self._claims_dir / f"{tp.topic}.{tp.partition}")
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
        with contextlib.suppress(FileNotFoundError):
            (self._members / self.member_id).unlink()
        os.close(self._member_fd)


class EmbeddedLog(LocalLog):
    """A durable log in ``data_dir`` shared by the processes of one machine."""

    name = "embedded"

    def __init__(self, data_dir: Path | str = DEFAULT_DATA_DIR, *, fsync: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self._fsync = fsync
        self._topics_dir = self.data_dir / "topics"
        self._groups_dir = self.data_dir / "groups"
        self._topics_dir.mkdir(parents=True, exist_ok=True)
        self._groups_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[TopicPartition, PartitionFile] = {}

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        with _locked(self._topics_dir / ".lock"):
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
                topic_dir = self._topics_dir / spec.name
                topic_dir.mkdir(exist_ok=True)
                meta = {
                    "partitions": spec.partitions,
                    "compacted": spec.compacted,
                    "retention_ms": spec.retention_ms,
                }
                _write_atomically(topic_dir / "topic.json", orjson.dumps(meta))

    async def describe_topics(self) -> dict[str, TopicSpec]:
        specs = {}
        for meta_path in self._topics_dir.glob("*/topic.json"):
            meta = orjson.loads(meta_path.read_bytes())
            name = meta_path.parent.name
            specs[name] = TopicSpec(
                name, meta["partitions"], meta["compacted"], meta["retention_ms"]
            )
        return specs

    def _file(self, tp: TopicPartition) -> PartitionFile:
        found = self._files.get(tp)
        if found is None:
            topic_dir = self._topics_dir / tp.topic
            if not (topic_dir / "topic.json").exists():
                raise TopicError(f"no topic {tp.topic!r} in {self.data_dir}")
            found = self._files[tp] = PartitionFile(
                topic_dir / f"{tp.partition}.log", fsync=self._fsync
            )
        return found

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._file(tp).end_offset() for tp in partitions}

    def _offsets_dir(self, group: str) -> Path:
        return self._groups_dir / group / "offsets"

    async def committed_offsets(
        self, group: str, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        offsets_dir = self._offsets_dir(group)
        found = {}
        for tp in partitions:
            path = offsets_dir / f"{tp.topic}.{tp.partition}"
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                found[tp] = int(text)
            except ValueError:
                raise CorruptLogError(
                    f"the committed offset of group {group!r} on {tp} is damaged: {path} holds "
                    f"{text[:40]!r}, not a number. Headwater stops rather than guess where to "
                    "go on; write the offset to resume from into that file, or delete it to "
                    "read the partition again from its start"
                ) from None
        return found

    def append(self, tp: TopicPartition, batch: RawBatch) -> None:
        self._file(tp).append(batch)

    def read_now(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        records, next_offset = self._file(tp).read(offset, max_records)
        return FetchedBatch(
            tp.topic, tp.partition, records, range(offset, offset + len(records)), next_offset
        )

    def store_offsets(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        offsets_dir = self._offsets_dir(group)
        offsets_dir.mkdir(parents=True, exist_ok=True)
        for tp, offset in offsets.items():
            _write_atomically(offsets_dir / f"{tp.topic}.{tp.partition}", b"%d" % offset)

    def membership(self, group: str) -> Membership:
        return _FileMembership(self._groups_dir / group)

    def commit_transaction(
        self,
        transaction: LocalTransaction,
        batches: Sequence[tuple[TopicPartition, RawBatch]],
        offsets: Mapping[TopicPartition, int],
        group: str,
    ) -> None:
        record = CommitRecord(
            transaction.identity,
            transaction.next_sequence(),
            group,
            dict(offsets),
            list(batches),
        )
        fd, path = write_commit(self._groups_dir / group / "commits", record)
        try:
            self._apply(record)
            path.unlink()
        finally:
            os.close(fd)

    def _apply(self, record: CommitRecord) -> None:
        mark = (record.transaction, record.sequence)
        for tp, batch in record.batches:
            self._file(tp).append(batch, mark)
        self.store_offsets(record.group, record.offsets)

    def recover_transactions(self, group: str) -> None:
        for path in pending_commits(self._groups_dir / group / "commits"):
            try:
                fd = _try_lock(path)
            except FileNotFoundError:
                continue  # its writer just finished
            if fd is None:
                continue  # its writer is alive and applying it
            try:
                if path.exists():
                    self._apply(read_commit(path))
                    path.unlink()
            finally:
                os.close(fd)

    async def wait_for_append(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, _POLL_SECONDS))

    async def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
