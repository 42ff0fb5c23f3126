"""Exactly-once on the embedded log: transactions whose records are written once, in place.

A transaction appends its batches to their partitions as they are sent, as *pending* frames
marked with (transaction, sequence) (see :mod:`pipelines.log._partition_file`). Readers stop
before the first pending frame that no marker has decided yet (Kafka's last stable offset), so
nothing after an open transaction is seen before it, and they pass over frames a marker
aborted. The commit point is a small record, replaced atomically: one *state file* per
transactional id. Committing transaction ``s``:

1. under the state lock, check that this owner was not fenced (its epoch is the file's), then
   write the state: ``s`` committed, with the group, the input offsets and the partitions it
   wrote, and the next transaction's sequence (temporary file, rename; both fsync-ed with
   ``fsync=True``) -- the commit point;
2. append a COMMIT marker of ``s`` to each partition it wrote: its frames become visible;
3. store the input offsets.

A crash before 1 leaves ``s`` open: its frames stay invisible until the next owner aborts them.
A crash after 1 leaves the commit to finish: the next owner appends the markers still missing
and stores the offsets. Either way the transaction becomes visible whole, with its offsets, or
not at all, and never twice (a partition gets a marker only while it has undecided frames of
the transaction).

To find an open transaction's frames after a crash, the state also lists the partitions the
open transaction may have written: before its first frame to a partition not listed, a
transaction adds it (a state write under the lock). Each commit lists the partitions it wrote
for the next transaction, so a task that writes to the same partitions every checkpoint pays
one state write per commit and nothing per batch.

Owners and fencing: an owner holds the ``flock`` of ``<id>.owner`` for its life, so the kernel
frees it the moment its process dies. Whoever takes the lock of a free id first recovers it:
finishes its last commit if that is not marked applied, aborts its open transaction (ABORT
markers where it left undecided frames) and starts a new sequence. That is the next owner of
the task when it starts, and any member when it claims partitions of a group (before it reads
the group's committed offsets, as the commit files of earlier versions were applied). A new
owner that finds the lock held (the old owner is alive) bumps the epoch in the state file and
waits: the old owner's next commit or partition registration fails with
:class:`~pipelines.errors.FencedError`, the worker drops its task and closes it, which aborts
what it had sent and frees the lock. So two owners never write frames of one transactional id
at once, and a zombie's frames are never made visible after the next owner took over.

Why (measured on a 2-core VM, ``bench/stateful.py``): the commit files of earlier versions held
a transaction's records themselves, so every output record was encoded and written twice and
0.5 s of output sat in Python lists until the checkpoint; exactly-once cost 25% of throughput
against at-least-once. Now the hot path is the at-least-once append with a 16-byte mark, and a
commit costs a few small file writes per task.

The layout under ``<data dir>/transactions``: ``<id>.state`` (JSON, replaced atomically),
``<id>.owner`` (the owner's lock), ``.lock`` (held for a read-modify-write of a state file),
where ``<id>`` is the transaction's number in hex (a hash of the transactional id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from pipelines.errors import FencedError, LogError, TopicError
from pipelines.log._locks import locked, try_lock
from pipelines.log._partition_file import PartitionFile, _write_all, disk_error
from pipelines.log.base import RawBatch, TopicPartition, TransactionalProducer

__all__ = ["EmbeddedTransaction", "Transactions", "fsync_directory", "transaction_number"]

log = logging.getLogger(__name__)

_WAIT_SECONDS = 0.01  # between two looks at a held owner lock
_WARN_SECONDS = 10.0


def transaction_number(transactional_id: str) -> int:
    """The number frames of ``transactional_id`` are marked with."""
    return int.from_bytes(
        hashlib.blake2b(transactional_id.encode(), digest_size=8).digest(), "little"
    )


def _next_sequence(sequence: int) -> int:
    """Increasing across transactions and owners (a clock, never behind the last one)."""
    return max(sequence + 1, time.time_ns())


@dataclass(slots=True)
class _Commit:
    """The last commit of a transactional id."""

    sequence: int
    group: str
    offsets: dict[TopicPartition, int]
    partitions: list[TopicPartition]
    applied: bool = False
    """Whether its markers and offsets are known to be in place (set when an owner closes or
    a recovery finished it): a later recovery then leaves it alone."""


@dataclass(slots=True)
class _State:
    """What ``<id>.state`` holds."""

    transactional_id: str
    epoch: int = 0
    sequence: int = 0
    """The open transaction's sequence."""
    partitions: list[TopicPartition] = field(default_factory=list)
    """Where the open transaction may have pending frames."""
    commit: _Commit | None = None

    def encode(self) -> bytes:
        commit = self.commit
        return orjson.dumps(
            {
                "id": self.transactional_id,
                "epoch": self.epoch,
                "sequence": self.sequence,
                "partitions": [[tp.topic, tp.partition] for tp in self.partitions],
                "commit": None
                if commit is None
                else {
                    "sequence": commit.sequence,
                    "group": commit.group,
                    "offsets": [[tp.topic, tp.partition, o] for tp, o in commit.offsets.items()],
                    "partitions": [[tp.topic, tp.partition] for tp in commit.partitions],
                    "applied": commit.applied,
                },
            }
        )

    @staticmethod
    def decode(data: bytes) -> _State:
        meta = orjson.loads(data)
        found = meta["commit"]
        commit = None
        if found is not None:
            commit = _Commit(
                found["sequence"],
                found["group"],
                {TopicPartition(t, p): o for t, p, o in found["offsets"]},
                [TopicPartition(t, p) for t, p in found["partitions"]],
                found["applied"],
            )
        return _State(
            meta["id"],
            meta["epoch"],
            meta["sequence"],
            [TopicPartition(t, p) for t, p in meta["partitions"]],
            commit,
        )


class Transactions:
    """The transaction states of one embedded log (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        file: Callable[[TopicPartition], PartitionFile],
        store_offsets: Callable[[str, Mapping[TopicPartition, int]], None],
        fsync: bool,
    ) -> None:
        self.directory = directory
        self.file = file
        self.store_offsets = store_offsets
        self._fsync = fsync
        self._ready = False

    def _path(self, number: int, suffix: str) -> Path:
        return self.directory / f"{number:016x}{suffix}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock under which state files are read, changed and written."""
        if not self._ready:
            with self._on_disk(self.directory, "create"):
                self.directory.mkdir(parents=True, exist_ok=True)
            self._ready = True
        with self._on_disk(self.directory / ".lock", "lock"), locked(self.directory / ".lock"):
            yield

    @staticmethod
    @contextlib.contextmanager
    def _on_disk(path: Path, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise disk_error(path, doing, error) from error

    def read(self, number: int, transactional_id: str) -> _State:
        """The state of transaction ``number`` (a fresh one if it has none yet)."""
        path = self._path(number, ".state")
        try:
            return _State.decode(path.read_bytes())
        except FileNotFoundError:
            return _State(transactional_id)
        except OSError as error:
            raise disk_error(path, "read the transaction state in", error) from error
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise LogError(
                f"{path}, the state of transactional id {transactional_id!r}, is damaged "
                f"({error!r}). With nothing running on the data directory, move it aside: the "
                "transaction's last commit, if it was not finished, is then lost, and records "
                "of its open transaction stay invisible to readers of the partitions it wrote"
            ) from error

    def write(self, number: int, state: _State) -> None:
        """Replace the state of transaction ``number`` (under :meth:`locked`)."""
        path = self._path(number, ".state")
        temporary = path.with_name(f".{path.name}.tmp")
        with self._on_disk(path, "write the transaction state to"):
            fd = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, state.encode())
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
            if self._fsync:
                fsync_directory(self.directory)

    def try_own(self, number: int) -> int | None:
        """The fd holding the owner lock of transaction ``number``, or None if it is held."""
        if not self._ready:
            with self.locked():
                pass
        path = self._path(number, ".owner")
        with self._on_disk(path, "lock"):
            return try_lock(path)

    def recover(self, number: int, transactional_id: str) -> _State:
        """With the owner lock of transaction ``number`` held: finish its last commit unless it
        is applied, abort its open transaction, start a new one; the state then."""
        with self.locked():
            state = self.read(number, transactional_id)
        commit = state.commit
        if commit is not None and not commit.applied:
            self._decide(number, commit.sequence, commit.partitions, committed=True)
            self.store_offsets(commit.group, commit.offsets)
        self._decide(number, state.sequence, state.partitions, committed=False)
        with self.locked():
            state = self.read(number, transactional_id)  # (its epoch may have moved meanwhile)
            if state.commit is not None:
                state.commit.applied = True
            state.sequence = _next_sequence(state.sequence)
            state.partitions = []
            self.write(number, state)
        return state

    def _decide(
        self, number: int, sequence: int, partitions: list[TopicPartition], *, committed: bool
    ) -> None:
        """Mark transaction (``number``, ``sequence``) in each of ``partitions`` that holds
        frames of it that no marker decided yet."""
        for tp in partitions:
            try:
                file = self.file(tp)
            except TopicError:
                continue  # the topic was deleted since: nothing left to decide
            if file.is_open((number, sequence)):
                file.mark((number, sequence), committed=committed)

    def recover_all(self) -> None:
        """Recover every transactional id whose owner is gone (see :meth:`recover`)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        except OSError as error:
            raise disk_error(self.directory, "list the transactions in", error) from error
        for name in sorted(names):
            if not name.endswith(".state") or name.startswith("."):
                continue
            try:
                number = int(name[: -len(".state")], 16)
            except ValueError:
                continue
            fd = self.try_own(number)
            if fd is None:
                continue  # its owner is alive
            try:
                with self.locked():
                    state = self.read(number, "")
                if state.partitions or (state.commit is not None and not state.commit.applied):
                    self.recover(number, state.transactional_id)
            finally:
                os.close(fd)

    def forget_group(self, group: str) -> None:
        """Remove the states whose last commit was for ``group`` (a reset of the group: they
        must not store its old offsets again), after aborting what they left open."""
        self.recover_all()
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if not name.endswith(".state") or name.startswith("."):
                continue
            path = self.directory / name
            with self.locked():
                state = _State.decode(path.read_bytes())
                if state.commit is not None and state.commit.group == group:
                    path.unlink()


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EmbeddedTransaction(TransactionalProducer):
    """Appends a task's batches as pending frames as they are sent; :meth:`commit` makes them
    visible with the consumed offsets (see the module docstring)."""

    def __init__(self, transactions: Transactions, transactional_id: str) -> None:
        self._transactions = transactions
        self.transactional_id = transactional_id
        self.identity = transaction_number(transactional_id)
        self._owner = -1  # the fd holding the owner lock, once begun
        self._epoch = 0
        self._sequence = 0
        self._registered: set[TopicPartition] = set()
        self._written: dict[TopicPartition, None] = {}  # of the open transaction, in order
        self._closed = False

    async def _begin(self) -> None:
        """Become the owner: take the owner lock (fencing a live owner first, and waiting for
        it to let go), then recover what an earlier owner left."""
        if self._owner >= 0:
            return
        if self._closed:
            raise LogError(f"transaction {self.transactional_id!r} is closed")
        transactions = self._transactions
        fd = transactions.try_own(self.identity)
        if fd is None:
            with transactions.locked():
                state = transactions.read(self.identity, self.transactional_id)
                state.epoch += 1
                transactions.write(self.identity, state)
            started = time.monotonic()
            warned = started
            while fd is None:
                await asyncio.sleep(_WAIT_SECONDS)
                fd = transactions.try_own(self.identity)
                if fd is None and time.monotonic() - warned > _WARN_SECONDS:
                    warned = time.monotonic()
                    log.warning(
                        "transactional id %r: waiting %.0f s for its previous owner, which is "
                        "fenced, to close",
                        self.transactional_id,
                        warned - started,
                    )
        self._owner = fd
        try:
            state = transactions.recover(self.identity, self.transactional_id)
        except BaseException:
            self._owner = -1
            os.close(fd)
            raise
        self._epoch, self._sequence = state.epoch, state.sequence

    async def fence(self) -> None:
        await self._begin()

    def _fenced(self) -> FencedError:
        return FencedError(
            f"transactional id {self.transactional_id!r} was taken over by a newer owner (the "
            "task's next owner): this owner's open transaction is aborted"
        )

    def _current(self) -> _State:
        """The state, under the state lock, if this owner was not fenced."""
        state = self._transactions.read(self.identity, self.transactional_id)
        if state.epoch != self._epoch:
            raise self._fenced()
        return state

    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        if not len(batch):
            return
        await self._begin()
        tp = TopicPartition(topic, partition)
        file = self._transactions.file(tp)
        if tp not in self._registered:
            with self._transactions.locked():
                state = self._current()
                if tp not in state.partitions:
                    state.partitions.append(tp)
                    self._transactions.write(self.identity, state)
            self._registered.add(tp)
        file.append(batch, (self.identity, self._sequence), pending=True)
        self._written[tp] = None

    async def commit(self, offsets: Mapping[TopicPartition, int], group: str) -> None:
        if not self._written and not offsets:
            return
        await self._begin()
        transactions = self._transactions
        written = list(self._written)
        sequence = self._sequence
        following = _next_sequence(sequence)
        with transactions.locked():
            state = self._current()
            state.commit = _Commit(sequence, group, dict(offsets), written)
            state.sequence = following
            state.partitions = written
            transactions.write(self.identity, state)  # the commit point
        self._sequence, self._written, self._registered = following, {}, set(written)
        for tp in written:
            transactions.file(tp).mark((self.identity, sequence), committed=True)
        if offsets:
            transactions.store_offsets(group, offsets)

    async def abort(self) -> None:
        if self._owner < 0 or not self._written:
            return
        self._void()
        following = _next_sequence(self._sequence)
        with self._transactions.locked():
            state = self._current()
            state.sequence = following
            state.partitions = list(self._registered)
            self._transactions.write(self.identity, state)
        self._sequence = following

    def _void(self) -> None:
        """Abort what the open transaction wrote (markers first: a crash then leaves the
        state saying it is open, and the recovery finds nothing left to abort)."""
        written, self._written = list(self._written), {}
        for tp in written:
            self._transactions.file(tp).mark((self.identity, self._sequence), committed=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owner < 0:
            return
        try:
            self._void()
            with self._transactions.locked():
                state = self._transactions.read(self.identity, self.transactional_id)
                if state.epoch == self._epoch:  # (a fenced owner leaves it to the next one)
                    if state.commit is not None:
                        state.commit.applied = True
                    state.sequence = _next_sequence(self._sequence)
                    state.partitions = []
                    self._transactions.write(self.identity, state)
        finally:
            os.close(self._owner)
            self._owner = -1
