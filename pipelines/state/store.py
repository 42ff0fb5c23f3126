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

**Namespaces.** An operator sees its state as :class:`~pipelines.state.api.State` views, one
per namespace (:meth:`KeyValueStore.namespace`, which the step context's ``state(name)`` calls),
all over this one store, its one changelog and its one copy. The store is itself the view of
the default namespace (:data:`~pipelines.state.api.DEFAULT_NAMESPACE`), so a keyed aggregation
calls the store's own ``get`` and ``put``: nothing stands between a record and the dict. Any
other namespace is a :class:`Namespace`, whose entry for ``key`` the store holds under the
in-memory key ``(namespace, key)``: a tuple whose first item is the :class:`Namespace` object
(hashed by identity), which no key of the default namespace can be, as those are JSON.

In the changelog and the copy, a key of the default namespace is the JSON of the key, as it
always was, and a key of namespace ``N`` is ``\x00`` + ``N`` (UTF-8) + ``\x00`` + the JSON
of the key. JSON never starts with (nor holds) a NUL byte, as orjson escapes control
characters, and a name holds none, so the two never meet and the name ends at the second NUL;
the copy's own entries for long keys start with ``\x01`` (:mod:`pipelines.state.local`),
which neither starts with. A store decodes a key's namespace as it reads the key back.

State written before namespaces keeps every entry in the default namespace: an operator that
now keeps some of them in a namespace of their own moves them there the first time it reads
its state (:mod:`operators._legacy`); each move is a change like any other, so the next
checkpoint writes the changelog in the new layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import chain, groupby, islice, repeat
from typing import TYPE_CHECKING, Any, cast

import orjson

from pipelines.log.base import RawBatch, TopicPartition
from pipelines.record import Headers
from pipelines.serde import compacted
from pipelines.state.api import DEFAULT_NAMESPACE, State

if TYPE_CHECKING:
    from pipelines.state.local import LocalStore

__all__ = [
    "POSITIONS_HEADER",
    "KeyValueStore",
    "Namespace",
    "decode_key",
    "encode_key",
    "positions_header",
    "split_key",
]

POSITIONS_HEADER = "headwater.input"
_ENCODE_CHUNK = 1024
"""Changes encoded at a time at a checkpoint, then copied at their size before the next ones
are (:func:`~pipelines.serde.compacted`): the buffers of ``orjson.dumps`` results are ~4 KiB
each, and a checkpoint that held all of its changes' buffers at once (~75,000 changed keys and
values at 1M keys: ~600 MB) took fresh heap that glibc gave back to the system once freed, two
page faults a changed key (3.4 s of system CPU per 1M records). Chunk by chunk, each reuses the
buffers the one before freed."""
_MISSING = object()
_NUL = b"\x00"
"""Starts a namespaced key's bytes and ends its namespace's name (see the module docstring)."""


def encode_key(key: Any, namespace: str = DEFAULT_NAMESPACE) -> bytes:
    """The changelog bytes of a state key of ``namespace`` (JSON, tuples as arrays, after the
    namespace's prefix: see the module docstring)."""
    encoded = orjson.dumps(key)
    return encoded if namespace == DEFAULT_NAMESPACE else _prefix(namespace) + encoded


def decode_key(data: bytes) -> Any:
    """A state key of the default namespace from its changelog bytes (arrays come back as
    tuples, to stay hashable)."""
    return _hashable(orjson.loads(data))


def split_key(data: bytes) -> tuple[str, Any]:
    """The namespace and the state key of changelog bytes, in any namespace."""
    if not data.startswith(_NUL):
        return DEFAULT_NAMESPACE, decode_key(data)
    _, name, key = data.split(_NUL, 2)
    return name.decode(), decode_key(key)


def _prefix(namespace: str) -> bytes:
    """What the changelog bytes of a key of ``namespace`` (not the default) start with."""
    return _NUL + namespace.encode() + _NUL


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _space_of(key: Any) -> Namespace | None:
    """The namespace of an in-memory key (None: the default namespace)."""
    if key.__class__ is tuple and len(key) == 2 and key[0].__class__ is Namespace:
        space: Namespace = key[0]
        return space
    return None


def _encoded(key: Any) -> bytes:
    """The changelog bytes of an in-memory key, in any namespace."""
    space = _space_of(key)
    return orjson.dumps(key) if space is None else space.prefix + orjson.dumps(key[1])


def _within(encoded: bytes, space: Namespace | None) -> bool:
    """Whether the changelog bytes ``encoded`` are of a key of ``space`` (None: default)."""
    return not encoded.startswith(_NUL) if space is None else encoded.startswith(space.prefix)


def positions_header(positions: Mapping[TopicPartition, int]) -> Headers:
    """The header that says which input positions a changelog record reflects."""
    encoded = orjson.dumps({f"{tp.topic}/{tp.partition}": o for tp, o in positions.items()})
    return ((POSITIONS_HEADER, encoded),)


class KeyValueStore:
    """One step's state on one partition (see the module docstring): the runtime's side
    (changes, restores, the copy) and the :class:`~pipelines.state.api.State` of the default
    namespace."""

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
        self._spaces: dict[str, Namespace] = {}

    def namespace(self, name: str = DEFAULT_NAMESPACE) -> State:
        """The view of namespace ``name``: the store itself for the default one."""
        return self if name == DEFAULT_NAMESPACE else self._space(name)

    def _space(self, name: str) -> Namespace:
        space = self._spaces.get(name)
        if space is None:
            if not isinstance(name, str) or "\x00" in name or name == DEFAULT_NAMESPACE:
                raise ValueError(f"a namespace is a name without NUL characters, not {name!r}")
            space = self._spaces[name] = Namespace(self, name)
        return space

    def __len__(self) -> int:
        """How many entries the default namespace holds."""
        return self._count(None)

    def _count(self, space: Namespace | None) -> int:
        """How many entries ``space`` (None: the default namespace) holds, reading nothing into
        memory: no cost while memory holds every entry and they are all in the default
        namespace, else a scan of the keys (and, for a store larger than memory, its copy)."""
        raw = self._raw
        if self.complete:  # (namespaced keys sort first: a glance at the least restored one)
            if space is None and not self._spaces and not (raw and min(raw).startswith(_NUL)):
                return len(self._values) + len(raw)
            held = sum(1 for key in self._values if _space_of(key) is space)
            return held + sum(1 for encoded in raw if _within(encoded, space))
        backing = self._backing
        assert backing is not None
        pending: dict[bytes, bool] = {k: v is not None for k, v in self._unsaved.items()}
        pending.update((_encoded(k), k in self._values) for k in self._dirty)
        count = sum(1 for encoded, _ in backing.items() if _within(encoded, space))
        for key, present in pending.items():
            if _within(key, space):
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
        encoded = _encoded(key)
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
            self._raw.pop(_encoded(key), None)
        self._values.pop(key, None)
        self._dirty.add(key)

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) of the default namespace (see :meth:`_scan`)."""
        return self._scan(None)

    def _scan(self, space: Namespace | None) -> Iterator[tuple[Any, Any]]:
        """Every (in-memory key, value) of ``space`` (None: the default namespace), decoding
        restored entries on the way; a store larger than memory reads the rest from its copy
        (as of its last write, under what memory holds)."""
        if self._raw:
            raw, self._raw = self._raw, {}
            for key, value in raw.items():
                self._values.setdefault(self._decoded(key), orjson.loads(value))
        held = list(self._values.items())
        if self._spaces:
            held = [(key, value) for key, value in held if _space_of(key) is space]
        if self.complete:
            return iter(held)
        assert self._backing is not None
        shadowed = {*self._values, *self._dirty}
        newer = set(self._unsaved)
        rest = (
            (key, orjson.loads(value))
            for encoded, value in self._backing.items()
            if _within(encoded, space)
            and encoded not in newer
            and (key := self._decoded(encoded)) not in shadowed
        )
        return chain(held, rest)

    def _decoded(self, encoded: bytes) -> Any:
        """The in-memory key of the changelog bytes ``encoded``, in any namespace."""
        if not encoded.startswith(_NUL):
            return decode_key(encoded)
        name, key = split_key(encoded)
        return (self._space(name), key)

    # -- checkpoints and restores --------------------------------------------------------------

    def changes(self, positions: Mapping[TopicPartition, int], now_ms: int) -> RawBatch | None:
        """The dirty keys as a changelog batch, and forget that they were dirty (with a local
        copy, they are kept as unsaved until :meth:`saved`)."""
        dirty = self._dirty
        if not dirty:
            return None
        header = positions_header(positions)
        dumps = orjson.dumps
        encode = _encoded if self._spaces else dumps
        changed = list(dirty)
        found = list(map(self._values.get, changed, repeat(_MISSING)))
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        for start in range(0, len(changed), _ENCODE_CHUNK):
            end = start + _ENCODE_CHUNK
            keys += compacted(list(map(encode, changed[start:end])))
            values += compacted([None if v is _MISSING else dumps(v) for v in found[start:end]])
        if self._backing is not None:
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


def _reflects_committed(header: Headers, committed: Mapping[str, int]) -> bool:
    reflected = orjson.loads(dict(header).get(POSITIONS_HEADER, b"{}"))
    return all(offset <= committed.get(tp, 0) for tp, offset in reflected.items())


class Namespace:
    """A namespace other than the default of a :class:`KeyValueStore` (see the module
    docstring): a :class:`~pipelines.state.api.State` over the store's entries under
    ``(self, key)``. The store makes one per name (:meth:`KeyValueStore.namespace`)."""

    __slots__ = ("_store", "name", "prefix")

    def __init__(self, store: KeyValueStore, name: str) -> None:
        self._store = store
        self.name = name
        self.prefix = _prefix(name)
        """What the changelog bytes of each of its keys start with."""

    def __repr__(self) -> str:
        return f"<namespace {self.name!r} of {self._store.step_id!r}>"

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self._store.get((self, key), default)

    def put(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value`` (JSON-serialisable)."""
        self._store.put((self, key), value)

    def delete(self, key: Any) -> None:
        """Remove ``key``."""
        self._store.delete((self, key))

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) of the namespace."""
        return ((named[1], value) for named, value in self._store._scan(self))

    def __len__(self) -> int:
        """How many entries the namespace holds (a scan of the store's keys)."""
        return self._store._count(self)
