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
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import groupby
from typing import Any, cast

import orjson

from pipelines.log.base import RawBatch, TopicPartition
from pipelines.record import Headers

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

    def __init__(self, step_id: str, partition: int) -> None:
        self.step_id = step_id
        self.partition = partition
        self._values: dict[Any, Any] = {}
        self._raw: dict[bytes, bytes] = {}  # restored, not decoded yet
        self._dirty: set[Any] = set()

    def __len__(self) -> int:
        return len(self._values) + len(self._raw)

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        value = self._values.get(key, _MISSING)
        if value is _MISSING:
            if not self._raw:
                return default
            raw = self._raw.pop(encode_key(key), None)
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
        """Every (key, value), decoding restored entries on the way."""
        if self._raw:
            raw, self._raw = self._raw, {}
            for key, value in raw.items():
                self._values.setdefault(decode_key(key), orjson.loads(value))
        return iter(list(self._values.items()))

    # -- checkpoints and restores --------------------------------------------------------------

    def changes(self, positions: Mapping[TopicPartition, int], now_ms: int) -> RawBatch | None:
        """The dirty keys as a changelog batch, and forget that they were dirty."""
        if not self._dirty:
            return None
        header = positions_header(positions)
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        for key in self._dirty:
            keys.append(encode_key(key))
            value = self._values.get(key, _MISSING)
            values.append(None if value is _MISSING else orjson.dumps(value))
        self._dirty.clear()
        count = len(keys)
        return RawBatch(keys, values, [now_ms] * count, [header] * count)

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
