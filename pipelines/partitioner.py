"""Kafka's default partitioner: which partition a keyed record goes to.

A record with a key goes to ``(murmur2(key) & 0x7fffffff) % partitions``, exactly as the Java
client (and aiokafka) place it, so a topic written by Headwater is partitioned the way any
Kafka producer would partition it: a key always lands on the same partition, and pipelines that
join or aggregate by key can rely on co-partitioning with topics written by other clients.
Records without a key are spread round-robin.

:func:`murmur2` is pure Python and costs a few microseconds per key, which matters in a loop
that partitions every record, so :class:`KeyPartitioner` remembers the partition of the keys it
has seen (real key spaces repeat a lot) in a bounded dict.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "KeyPartitioner",
    "murmur2",
    "partition_batch",
    "partition_for",
]

DEFAULT_CACHE_SIZE = 100_000
"""How many keys a :class:`KeyPartitioner` remembers before it starts over."""

_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK32 = 0xFFFFFFFF
_SIGN32 = 0x80000000
_POSITIVE = 0x7FFFFFFF


@lru_cache(maxsize=128)
def _words(count: int) -> struct.Struct:
    """A struct reading ``count`` little-endian unsigned 32-bit words."""
    return struct.Struct(f"<{count}I")


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 hash of ``data`` (``org.apache.kafka.common.utils.Utils.murmur2``).

    Returns the *signed* 32-bit value the Java implementation returns, e.g.
    ``murmur2(b"21") == -973932308``. (aiokafka's ``murmur2`` returns the same bits as an
    unsigned number.)
    """
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    whole = length >> 2
    if whole:
        for word in _words(whole).unpack_from(data):
            k = (word * _M) & _MASK32
            k ^= k >> _R
            k = (k * _M) & _MASK32
            h = ((h * _M) & _MASK32) ^ k
    tail = length & 3
    if tail:
        at = length - tail
        if tail == 3:
            h ^= data[at + 2] << 16
        if tail >= 2:
            h ^= data[at + 1] << 8
        h ^= data[at]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - 0x1_0000_0000 if h & _SIGN32 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of ``key`` on a topic of ``partitions`` partitions, as Kafka places it."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return (murmur2(key) & _POSITIVE) % partitions


class KeyPartitioner:
    """Partitions keys for a topic of ``partitions`` partitions, remembering what it computed.

    The cache maps key bytes to partition and is cleared when it holds more than
    ``cache_size`` keys, which bounds its memory without the bookkeeping of an LRU.

    >>> partitioner = KeyPartitioner(12)
    >>> partitioner(b"21") == partition_for(b"21", 12)
    True
    """

    __slots__ = ("_cache", "cache_size", "partitions")

    def __init__(self, partitions: int, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if partitions < 1:
            raise ValueError(f"a topic has at least one partition, not {partitions}")
        self.partitions = partitions
        self.cache_size = cache_size
        self._cache: dict[bytes, int] = {}

    def __call__(self, key: bytes) -> int:
        """The partition of ``key``."""
        found = self._cache.get(key)
        if found is None:
            found = (murmur2(key) & _POSITIVE) % self.partitions
            self._remember(key, found)
        return found

    def _remember(self, key: bytes, partition: int) -> None:
        cache = self._cache
        if len(cache) >= self.cache_size:
            cache.clear()
        cache[key] = partition

    def cached(self) -> int:
        """How many keys are cached now."""
        return len(self._cache)

    def partition_batch(self, keys: Sequence[bytes | None], start: int = 0) -> list[int]:
        """The partition of each of ``keys``: by hash for a key, round-robin for ``None``.

        The ``i``-th ``None`` key (counting from 0) goes to ``(start + i) % partitions``; pass
        ``start`` advanced by the number of ``None`` keys of the previous batch to continue the
        rotation across batches.
        """
        partitions = self.partitions
        cache = self._cache
        result: list[int] = []
        append = result.append
        rotation = start
        for key in keys:
            if key is None:
                append(rotation % partitions)
                rotation += 1
                continue
            found = cache.get(key)
            if found is None:
                found = (murmur2(key) & _POSITIVE) % partitions
                self._remember(key, found)
            append(found)
        return result


_shared: dict[int, KeyPartitioner] = {}


def partition_batch(keys: Sequence[bytes | None], partitions: int, start: int = 0) -> list[int]:
    """The partition of each of ``keys`` on a topic of ``partitions`` partitions.

    Keys are hashed as :func:`partition_for` does (through a shared, bounded cache per
    partition count); ``None`` keys go round-robin from ``start`` (see
    :meth:`KeyPartitioner.partition_batch`).
    """
    partitioner = _shared.get(partitions)
    if partitioner is None:
        partitioner = _shared[partitions] = KeyPartitioner(partitions)
    return partitioner.partition_batch(keys, start)
