"""Keyed state of one stateful step on one partition: a dict in memory, a changelog on the log,
and (optionally) a durable local copy.

Reads hit a dict. Writes mark keys dirty; at each checkpoint the runtime turns the dirty keys into
one changelog batch (the latest value per key, or a tombstone) whose records carry, in a header,
the input positions they reflect. A restore applies a changelog record only if those positions
are all at or below the offsets the group committed, so an update whose input was never committed
(the worker died between writing the changelog and committing) is not applied: that input will
be processed again. Keys and values travel as JSON; restored values are decoded only when a key
is first read again.

A restore (:meth:`KeyValueStore.apply`) works on runs of records with the same header (the
records of one changelog batch, found by ``itertools.groupby``, which compares headers in C and
costs least when they are one shared object): each distinct header is judged once, and a run is
applied with one ``dict.update`` of its keys and values (the last value of a key wins). Only a
run with tombstones costs Python work per record, to find the keys whose last value deletes
them. Memory holds the last committed value of each key, as raw bytes, and nothing else.

**A bounded cache over the local copy.** A store given a local copy (``backing``, a
:class:`~pipelines.state.local.LocalStore`) and ``cache_keys`` keeps at most about that many
entries in memory; the rest live in the copy only, and a read that misses memory reads the copy
(one LMDB lookup, ~1 µs). While memory holds every entry (:attr:`complete`: nothing was ever
evicted, and the restore loaded the whole copy) a miss is just a miss and costs nothing more
than before.

The rules that keep an evicted value from being lost or coming back stale:

- The copy only ever holds committed state: the runtime writes it after the checkpoint that
  committed the changes (:meth:`unsaved` -> ``LocalStore.save`` -> :meth:`saved`), with the
  changelog offset it then reflects.
- Only entries the copy holds are evicted: eviction happens in :meth:`saved`, right after such
  a write, and never takes a key changed since the last checkpoint (``_dirty``). Between two
  writes, the changes the copy does not have yet are kept, encoded, in ``_unsaved`` (a
  tombstone as None), and a miss looks there before the copy, so a key deleted or changed since
  the last write never reads an older value from disk. Changes live in memory until they are
  in the copy: memory is bounded by ``cache_keys`` plus the keys changed or read since the last
  write of the copy, which the runtime makes at every checkpoint while the store is over its
  bound.
- Which entries go: restored entries not read since (``_raw``) first, then decoded ones in
  insertion order, where a store over its bound moves every key it changes to the end at each
  checkpoint (a FIFO with a second chance for written keys: no bookkeeping per read).

A crash (``kill -9``) at any point loses only memory; the copy is as of some committed
checkpoint, and the restore replays the changelog after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import accumulate, chain, groupby, islice, repeat
from typing import TYPE_CHECKING, Any, cast

import orjson

from pipelines.log.base import RawBatch, TopicPartition
from pipelines.record import Headers

if TYPE_CHECKING:
    from pipelines.state.local import LocalStore

__all__ = ["POSITIONS_HEADER", "KeyValueStore", "decode_key", "encode_key", "positions_header"]

POSITIONS_HEADER = "headwater.input"
_MISSING = object()


def encode_key(key: Any) -> bytes:
    """The changelog bytes of a state key (JSON; tuples become arrays)."""
    return orjson.dumps(key)


def decode_key(data: bytes) -> Any:
    """A state key from its changelog bytes (arrays come back as tuples, to stay hashable)."""
    return _hashable(orjson.loads(data))


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def positions_header(positions: Mapping[TopicPartition, int]) -> Headers:
    """The header that says which input positions a changelog record reflects."""
    encoded = orjson.dumps({f"{tp.topic}/{tp.partition}": o for tp, o in positions.items()})
    return ((POSITIONS_HEADER, encoded),)


class KeyValueStore:
    """One step's state on one partition (see the module docstring)."""

    def __init__(
        self,
        step_id: str,
        partition: int,
        *,
        backing: LocalStore | None = None,
        cache_keys: int | None = None,
    ) -> None:
        self.step_id = step_id
        self.partition = partition
        self.cache_keys = cache_keys
        """At most this many entries stay in memory after a write of the copy (None: all)."""
        self.complete = True
        """Whether memory holds every entry (else the rest is in ``backing``)."""
        self._backing = backing
        self._values: dict[Any, Any] = {}
        self._raw: dict[bytes, bytes] = {}  # restored, not decoded yet
        self._dirty: set[Any] = set()
        self._unsaved: dict[bytes, bytes | None] = {}  # newer than the copy (with a backing)

    def __len__(self) -> int:
        if self.complete:
            return len(self._values) + len(self._raw)
        backing = self._backing
        assert backing is not None
        pending: dict[bytes, bool] = {k: v is not None for k, v in self._unsaved.items()}
        pending.update((encode_key(k), k in self._values) for k in self._dirty)
        count = backing.count()
        for key, present in pending.items():
            count += present - (backing.get(key) is not None)
        return count

    @property
    def has_unsaved(self) -> bool:
        """Whether the local copy lacks changes (see :meth:`unsaved`)."""
        return bool(self._unsaved)

    @property
    def over_cache(self) -> bool:
        """Whether memory holds more entries than the cache may keep."""
        limit = self.cache_keys
        return limit is not None and len(self._values) + len(self._raw) > limit

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        value = self._values.get(key, _MISSING)
        if value is _MISSING:
            if self.complete and not self._raw:
                return default
            return self._miss(key, default)
        return value

    def _miss(self, key: Any, default: Any) -> Any:
        """``key`` is not decoded in memory: a restored entry, a change the copy does not have
        yet, or the copy (see the module docstring)."""
        encoded = encode_key(key)
        raw = self._raw.pop(encoded, None) if self._raw else None
        if raw is None:
            if self.complete or key in self._dirty:  # (a key changed and not in memory: gone)
                return default
            raw = cast("dict[bytes, Any]", self._unsaved).get(encoded, _MISSING)
            if raw is _MISSING:
                assert self._backing is not None
                raw = self._backing.get(encoded)
            if raw is None:
                return default
        value = self._values[key] = orjson.loads(raw)
        return value

    def put(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value`` (JSON-serialisable)."""
        self._values[key] = value
        self._dirty.add(key)

    def delete(self, key: Any) -> None:
        """Remove ``key``."""
        if self._raw:
            self._raw.pop(encode_key(key), None)
        self._values.pop(key, None)
        self._dirty.add(key)

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value), decoding restored entries on the way; a store larger than
        memory reads the rest from its copy (as of its last write, under what memory holds)."""
        if self._raw:
            raw, self._raw = self._raw, {}
            for key, value in raw.items():
                self._values.setdefault(decode_key(key), orjson.loads(value))
        held = list(self._values.items())
        if self.complete:
            return iter(held)
        assert self._backing is not None
        shadowed = {*self._values, *self._dirty}
        newer = set(self._unsaved)
        rest = (
            (key, orjson.loads(value))
            for encoded, value in self._backing.items()
            if encoded not in newer and (key := decode_key(encoded)) not in shadowed
        )
        return chain(held, rest)

    # -- checkpoints and restores --------------------------------------------------------------

    def changes(self, positions: Mapping[TopicPartition, int], now_ms: int) -> RawBatch | None:
        """The dirty keys as a changelog batch, and forget that they were dirty (with a local
        copy, they are kept as unsaved until :meth:`saved`)."""
        dirty = self._dirty
        if not dirty:
            return None
        header = positions_header(positions)
        dumps = orjson.dumps
        keys: list[bytes | None] = list(map(dumps, dirty))
        found = list(map(self._values.get, dirty, repeat(_MISSING)))
        values: list[bytes | None] = [None if v is _MISSING else dumps(v) for v in found]
        if self._backing is not None:
            keys, values = _compact(keys), _compact(values)
            self._unsaved.update(zip(cast("list[bytes]", keys), values, strict=True))
            if not self.complete:  # written keys get a second chance against eviction
                held = self._values
                for key, value in zip(dirty, found, strict=True):
                    if value is not _MISSING:
                        del held[key]
                        held[key] = value
        self._dirty = set()
        count = len(keys)
        return RawBatch(keys, values, [now_ms] * count, [header] * count)

    def unsaved(self) -> RawBatch:
        """The changes the local copy does not have yet (a deleted key's value is None)."""
        count = len(self._unsaved)
        keys: list[bytes | None] = list(self._unsaved)
        return RawBatch(keys, list(self._unsaved.values()), [0] * count)

    def saved(self) -> None:
        """The copy now holds :meth:`unsaved`: forget those, and evict down to the cache."""
        self._unsaved = {}
        if not self.over_cache:
            return
        assert self.cache_keys is not None
        self.complete = False
        excess = len(self._values) + len(self._raw) - self.cache_keys
        raw = self._raw
        for encoded in list(islice(raw, min(excess, len(raw)))):
            del raw[encoded]
            excess -= 1
        held, dirty = self._values, self._dirty
        victims = islice((key for key in held if key not in dirty), max(excess, 0))
        for key in list(victims):
            del held[key]

    def apply(self, batch: RawBatch, committed: Mapping[str, int]) -> int:
        """Restore: apply the changelog records of ``batch`` whose input positions are committed
        (``committed`` by ``topic/partition``), before any processing; returns how many it
        applied. Records come in runs that share one header (a changelog batch), each judged
        once and applied with one ``dict.update``."""
        keys, values = batch.keys, batch.values
        if batch.headers is None:
            runs: list[tuple[Headers, int]] = [((), len(keys))]
        else:
            runs = [(header, len(list(run))) for header, run in groupby(batch.headers)]
        verdicts: dict[Headers, bool] = {}
        applied = start = 0
        for header, count in runs:
            stop = start + count
            verdict = verdicts.get(header)
            if verdict is None:
                verdict = verdicts[header] = _reflects_committed(header, committed)
            if verdict:
                applied += self._update(keys[start:stop], values[start:stop])
            start = stop
        return applied

    def _update(self, keys: list[bytes | None], values: list[bytes | None]) -> int:
        """Set ``keys`` to ``values`` in order, the last value of a key winning; a None value
        deletes (a keyless record, which a changelog never has, is left out)."""
        if None in keys:
            kept = [i for i, key in enumerate(keys) if key is not None]
            keys, values = [keys[i] for i in kept], [values[i] for i in kept]
        present = cast("list[bytes]", keys)
        if not self.complete:  # into the copy at the next write, tombstones too
            self._unsaved.update(zip(present, values, strict=True))
            if self._raw:
                for key in present:
                    self._raw.pop(key, None)
            return len(present)
        raw = cast("dict[bytes, bytes | None]", self._raw)
        raw.update(zip(present, values, strict=True))
        if None in values:  # tombstones: a key whose last value here is None goes
            for key in {k for k, v in zip(present, values, strict=True) if v is None}:
                if raw[key] is None:
                    del raw[key]
        return len(present)

    def load(self, entries: dict[bytes, bytes]) -> None:
        """Start from ``entries`` (a durable local copy, as raw changelog bytes), which the
        store takes over."""
        if self._raw:
            self._raw.update(entries)
        else:
            self._raw = entries

    def restored(self) -> Mapping[bytes, bytes]:
        """The whole state as raw changelog bytes, right after a restore (before anything is
        read or written): what a local copy of the store holds."""
        assert not self._values and not self._dirty, "the store was used since its restore"
        return self._raw


def _compact(blobs: list[bytes | None]) -> list[bytes | None]:
    """Copies of ``blobs`` at their size (None stays None). orjson (3.x) gives each result of
    ``dumps`` a buffer of ~4 KiB, however short the JSON (tracemalloc: 311 MB held by 80,000
    changed keys and values): a store that keeps its changes until the next write of its copy
    would hold ~8 KiB per changed key. One join and one slice per blob: ~0.1 µs each."""
    present = cast("list[bytes]", [b for b in blobs if b is not None])
    joined = b"".join(present)
    compact = map(
        joined.__getitem__,
        map(slice, accumulate(map(len, present), initial=0), accumulate(map(len, present))),
    )
    if len(present) == len(blobs):
        return list(compact)
    return [None if b is None else next(compact) for b in blobs]


def _reflects_committed(header: Headers, committed: Mapping[str, int]) -> bool:
    reflected = orjson.loads(dict(header).get(POSITIONS_HEADER, b"{}"))
    return all(offset <= committed.get(tp, 0) for tp, offset in reflected.items())
