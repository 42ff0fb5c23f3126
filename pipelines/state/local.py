"""A durable local copy of one store's committed state, so a restart does not replay the whole
changelog: SQLite in WAL mode, one file per (step, partition).

Why SQLite (measured on a 2-core VM): an upsert of 200k dirty keys in one transaction takes
about 0.8 s (240k rows/s) and loading them back about 0.15 s (1.3M rows/s); it is in the
standard library, crash-safe, and only the keys changed since the last checkpoint are written.
The copy is written after the input offsets are committed, so it never holds state whose input
was not committed; it records the changelog offset it reflects, and a restore replays the
changelog from there.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pipelines.log.base import RawBatch

__all__ = ["LocalStore"]

_SCHEMA = """
create table if not exists kv (k blob primary key, v blob not null) without rowid;
create table if not exists meta (name text primary key, value integer not null);
"""


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

    def load(self) -> tuple[dict[bytes, bytes], int]:
        """Every entry, and the changelog offset to replay from."""
        row = self._db.execute("select value from meta where name = 'changelog'").fetchone()
        if row is None:
            return {}, 0
        return dict(self._db.execute("select k, v from kv")), int(row[0])

    def save(self, changes: RawBatch, changelog_offset: int) -> None:
        """Apply committed ``changes`` (None values delete) and remember the offset after them."""
        upserts = [
            (k, v) for k, v in zip(changes.keys, changes.values, strict=True) if v is not None
        ]
        deletes = [(k,) for k, v in zip(changes.keys, changes.values, strict=True) if v is None]
        db = self._db
        db.execute("begin")
        try:
            db.executemany("insert or replace into kv values (?, ?)", upserts)
            db.executemany("delete from kv where k = ?", deletes)
            db.execute("insert or replace into meta values ('changelog', ?)", (changelog_offset,))
        except BaseException:
            db.execute("rollback")
            raise
        db.execute("commit")

    def reset(self) -> None:
        """Forget everything (the changelog no longer matches this copy)."""
        self._db.execute("delete from kv")
        self._db.execute("delete from meta")

    def close(self) -> None:
        self._db.close()
