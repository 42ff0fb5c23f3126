"""A durable local copy of one store's committed state, so a restart does not replay the whole
changelog: SQLite in WAL mode, one file per (step, partition).

The copy records the changelog offset it reflects (``meta``: ``offset``), and a restore replays
the changelog from there; a file without that row is not trusted (it loads as empty, from
offset 0). Every write is one SQLite transaction, so a writer killed at any point (even
``kill -9``) leaves the copy as it was before that write: it never claims an offset whose
changes it does not hold.

Two layers hold the state:

``snapshot``
    the whole state as of the last restore that changed it (:meth:`LocalStore.replace`), packed
    in parts of up to ``_PART`` entries: ``<I count>``, ``count`` key lengths and ``count``
    value lengths (``<I>`` each), then the keys and the values, concatenated.
``changed``
    the keys checkpoints changed since (:meth:`LocalStore.save`): one row per key, its latest
    value, or, while there is a snapshot, an empty value for a key deleted since (a tombstone:
    a JSON value is never empty). Without a snapshot a delete just deletes the row.

Loading reads the snapshot parts, then the rows on top. Why a packed snapshot (measured on a
2-core VM, CPython 3.11, 500,000 keys): a fresh worker restoring from the changelog must write
the whole state, and SQLite takes 0.95-1.4 s to insert 500,000 rows from Python whatever the
pragmas (``synchronous=off``, no journal, a larger cache, sorted keys: the cost is the per-row
work of ``executemany``), while packing them takes 0.05 s and writing the parts 0.03-0.05 s.
Checkpoints, which change a small part of a large state, still upsert rows (about 2 µs a key).

Tombstones pile up where keys come and go (windows): once a checkpoint has written more of
them since the snapshot than the snapshot holds entries (and at least ``_FOLD_AT``), it folds:
the copy is read back and written as a new snapshot, in the same transaction. Upserted rows
need no folding: there is at most one per live key.

Nothing needs ``synchronous=off``: a commit in WAL mode with ``synchronous=normal`` does not
wait for the disk already, and only the checkpoints of the write-ahead log do (so a machine
crash may lose the last writes, which the changelog still has, but never corrupts the file).

Older versions kept every entry as a row of ``kv`` and the offset as ``changelog``. Opening
such a copy moves its rows to ``changed`` and drops ``kv``; whatever else the file holds is
dropped too (a snapshot left from before a downgrade: the older version, which did not trust
it, wrote the whole state into ``kv``). Without a ``changelog`` row nothing is kept. An older
version opening a copy of this format finds no ``changelog`` row and an empty ``kv``: it
restores from the changelog and never reads entries it does not understand.
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
from collections.abc import Iterator, Mapping
from functools import lru_cache
from itertools import accumulate, pairwise
from pathlib import Path

from pipelines.log.base import RawBatch

__all__ = ["LocalStore"]

_SCHEMA = """
create table if not exists meta (name text primary key, value integer not null);
create table if not exists snapshot (part integer primary key, data blob not null);
create table if not exists changed (k blob primary key, v blob not null) without rowid;
"""
_PART = 32_768
"""Entries per snapshot part."""
_FOLD_AT = 16_384
"""The fewest tombstones that make a checkpoint fold the copy into a new snapshot."""
_TOMBSTONE = b""
_COUNT = struct.Struct("<I")


@lru_cache(maxsize=16)
def _lengths(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


class LocalStore:
    """One store's committed state on disk, and the changelog offset it reflects."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        # keep the write-ahead log small: checkpointed every 1 MiB of pages and cut back to
        # 1 MiB after (by default it stays at its largest, ~4 MiB a store, for good)
        self._db.execute("pragma wal_autocheckpoint=256")
        self._db.execute("pragma journal_size_limit=1048576")
        self._db.executescript(_SCHEMA)
        legacy = "select 1 from sqlite_master where type = 'table' and name = 'kv'"
        if self._db.execute(legacy).fetchone():
            self._migrate()

    def _migrate(self) -> None:
        """Take over a copy an older version wrote (see the module docstring)."""
        with self._transaction("begin immediate") as db:
            row = db.execute("select value from meta where name = 'changelog'").fetchone()
            db.execute("delete from snapshot")
            db.execute("delete from changed")
            db.execute("delete from meta")
            if row is not None:
                db.execute("insert into changed select k, v from kv")
                self._set(offset=row[0])
            db.execute("drop table kv")

    def load(self) -> tuple[dict[bytes, bytes], int]:
        """Every entry, and the changelog offset to replay from."""
        with self._transaction("begin"):  # one view, whoever else writes the file
            meta = self._meta()
            if "offset" not in meta:
                return {}, 0
            return self._entries(tombstones=meta.get("tombstones", 0) > 0), meta["offset"]

    def save(self, changes: RawBatch, changelog_offset: int) -> None:
        """Apply committed ``changes`` (None values delete; the last change of a key counts)
        and remember the offset after them."""
        latest = dict(zip(changes.keys, changes.values, strict=True))
        upserts = [(k, v) for k, v in latest.items() if v is not None]
        deletes = [k for k, v in latest.items() if v is None]
        with self._transaction("begin immediate") as db:
            meta = self._meta()
            db.executemany("insert or replace into changed values (?, ?)", upserts)
            snapshot = meta.get("snapshot", 0)
            if not snapshot:
                db.executemany("delete from changed where k = ?", [(k,) for k in deletes])
            elif deletes:
                tombstones = meta.get("tombstones", 0) + len(deletes)
                db.executemany(
                    "insert or replace into changed values (?, ?)",
                    [(k, _TOMBSTONE) for k in deletes],
                )
                if tombstones >= max(snapshot, _FOLD_AT):
                    self._write_snapshot(self._entries(tombstones=True))
                else:
                    self._set(tombstones=tombstones)
            self._set(offset=changelog_offset)

    def replace(self, entries: Mapping[bytes, bytes], changelog_offset: int) -> None:
        """Make ``entries`` (the whole state, as changelog bytes) the copy, as of
        ``changelog_offset``: one snapshot, no rows."""
        with self._transaction("begin immediate"):
            self._write_snapshot(entries)
            self._set(offset=changelog_offset)

    def reset(self) -> None:
        """Forget everything (the changelog no longer matches this copy)."""
        with self._transaction("begin immediate") as db:
            db.execute("delete from changed")
            db.execute("delete from snapshot")
            db.execute("delete from meta")

    def close(self) -> None:
        self._db.close()

    def _meta(self) -> dict[str, int]:
        return dict(self._db.execute("select name, value from meta"))

    def _set(self, **values: int) -> None:
        self._db.executemany("insert or replace into meta values (?, ?)", values.items())

    def _entries(self, *, tombstones: bool) -> dict[bytes, bytes]:
        """The snapshot, then the rows on top (``tombstones``: some delete)."""
        db = self._db
        entries: dict[bytes, bytes] = {}
        for (part,) in db.execute("select data from snapshot order by part"):
            entries.update(_unpack(part))
        if not tombstones:
            entries.update(db.execute("select k, v from changed"))
            return entries
        entries.update(db.execute("select k, v from changed where v != ?", (_TOMBSTONE,)))
        for (key,) in db.execute("select k from changed where v = ?", (_TOMBSTONE,)):
            entries.pop(key, None)
        return entries

    def _write_snapshot(self, entries: Mapping[bytes, bytes]) -> None:
        """Within a transaction: ``entries`` as the snapshot, every row gone."""
        db = self._db
        db.execute("delete from snapshot")
        db.execute("delete from changed")
        db.executemany("insert into snapshot values (?, ?)", enumerate(_pack(entries)))
        self._set(snapshot=len(entries), tombstones=0)

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """One transaction: all of it is written, or none of it."""
        db = self._db
        db.execute(begin)
        try:
            yield db
        except BaseException:
            if db.in_transaction:  # (SQLite rolls back by itself after some errors)
                db.execute("rollback")
            raise
        db.execute("commit")


def _pack(entries: Mapping[bytes, bytes]) -> Iterator[bytes]:
    """``entries`` as snapshot parts (see the module docstring)."""
    keys, values = list(entries), list(entries.values())
    for start in range(0, len(keys), _PART):
        part_keys, part_values = keys[start : start + _PART], values[start : start + _PART]
        count = len(part_keys)
        lengths = _lengths(2 * count).pack(*map(len, part_keys), *map(len, part_values))
        yield b"".join([_COUNT.pack(count), lengths, *part_keys, *part_values])


def _unpack(part: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) entries of a snapshot part."""
    (count,) = _COUNT.unpack_from(part)
    lengths = _lengths(2 * count).unpack_from(part, _COUNT.size)
    ends = accumulate(lengths, initial=_COUNT.size + 8 * count)
    pieces = [part[start:end] for start, end in pairwise(ends)]
    return zip(pieces[:count], pieces[count:], strict=True)
