"""The partitioner must place keys exactly where Kafka's Java client and aiokafka place them."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from pipelines.partitioner import (
    KeyPartitioner,
    murmur2,
    murmur2_many,
    partition_batch,
    partition_for,
)

# Utils.murmur2 values pinned by Kafka's own UtilsTest (signed Java ints).
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def aiokafka_partition(key: bytes, partitions: int) -> int:
    everything = range(partitions)  # a range, not a list: partition counts go up to 2**31 - 1
    return int(DefaultPartitioner()(key, everything, everything))


def to_signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def sample_keys() -> list[bytes]:
    rng = random.Random(20240601)
    keys = [b"", b"\x00", b"\xff", b"\xff\xff\xff\xff", b"\x80\x00\x00\x00\x80"]
    keys += [b"user-%d" % i for i in range(500)]
    keys += [str(i).encode() for i in range(500)]
    keys += [rng.randbytes(rng.randrange(0, 70)) for _ in range(2000)]
    keys += ["ключ-é-😀-%d".encode() % i for i in range(50)]
    return keys


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS.items())
def test_java_vectors(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected
    assert to_signed(aiokafka_murmur2(key)) == expected  # the vectors agree with aiokafka too


def test_returns_a_signed_32_bit_int() -> None:
    values = [murmur2(key) for key in sample_keys()]
    assert all(-(2**31) <= v < 2**31 for v in values)
    assert any(v < 0 for v in values)
    assert any(v > 0 for v in values)


def test_accepts_other_buffers() -> None:
    assert murmur2(bytearray(b"foobar")) == JAVA_VECTORS[b"foobar"]  # type: ignore[arg-type]


def test_murmur2_matches_aiokafka_on_many_keys() -> None:
    for key in sample_keys():
        assert murmur2(key) == to_signed(aiokafka_murmur2(key)), key


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 12, 64, 1000, 2**31 - 1])
def test_partition_for_matches_aiokafka(partitions: int) -> None:
    for key in sample_keys():
        assert partition_for(key, partitions) == aiokafka_partition(key, partitions), key


def test_known_partitions() -> None:
    # (murmur2 & 0x7fffffff) % n, worked out from the Java vectors
    assert partition_for(b"21", 10) == (-973932308 & 0x7FFFFFFF) % 10
    assert partition_for(b"abc", 3) == 479470107 % 3
    assert partition_for(b"foobar", 1) == 0


def test_rejects_zero_partitions() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        partition_for(b"x", 0)
    with pytest.raises(ValueError, match="at least one partition"):
        KeyPartitioner(0)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=2**31 - 1))
def test_property_matches_aiokafka(key: bytes, partitions: int) -> None:
    assert murmur2(key) == to_signed(aiokafka_murmur2(key))
    expected = aiokafka_partition(key, partitions)
    assert partition_for(key, partitions) == expected
    assert 0 <= expected < partitions
    partitioner = KeyPartitioner(partitions)
    assert partitioner(key) == expected
    assert partitioner(key) == expected  # from the cache


@given(
    st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=60),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=0, max_value=1000),
)
def test_property_partition_batch(keys: list[bytes | None], partitions: int, start: int) -> None:
    result = partition_batch(keys, partitions, start)
    assert len(result) == len(keys)
    assert all(0 <= p < partitions for p in result)
    unkeyed = 0
    for key, partition in zip(keys, result, strict=True):
        if key is None:
            assert partition == (start + unkeyed) % partitions
            unkeyed += 1
        else:
            assert partition == aiokafka_partition(key, partitions)


@given(st.lists(st.binary(max_size=40), max_size=200))
def test_property_murmur2_many_hashes_as_one_at_a_time(keys: list[bytes]) -> None:
    assert murmur2_many(keys) == [murmur2(key) & 0xFFFFFFFF for key in keys]


def test_murmur2_many_on_a_batch_of_many_lengths() -> None:
    rng = random.Random(7)
    keys = [rng.randbytes(rng.randrange(64)) for _ in range(5_000)]
    assert murmur2_many(keys) == [aiokafka_murmur2(key) for key in keys]


def test_partition_batch_round_robin() -> None:
    keys: list[bytes | None] = [None, b"abc", None, None, b"21", None]
    partitioner = KeyPartitioner(3)
    assert partitioner.partition_batch(keys, start=2) == [
        2,
        479470107 % 3,
        0,
        1,
        (-973932308 & 0x7FFFFFFF) % 3,
        2,
    ]
    assert partitioner.partition_batch([None] * 4) == [0, 1, 2, 0]
    assert partitioner.partition_batch([]) == []
    assert partition_batch(keys, 3, 2) == partitioner.partition_batch(keys, 2)


def test_cache_is_bounded_and_stays_correct() -> None:
    partitioner = KeyPartitioner(16, cache_size=100)
    keys = [b"key-%d" % i for i in range(1000)]
    for key in keys:
        assert partitioner(key) == partition_for(key, 16)
        assert 0 < partitioner.cached() <= 100
    assert partitioner.partition_batch(keys) == [partition_for(k, 16) for k in keys]
    assert partitioner.cached() <= 100
    # a hot key set smaller than the cache is served from it
    hot = KeyPartitioner(16, cache_size=100)
    hot.partition_batch(keys[:50])
    assert hot.cached() == 50
    assert hot.partition_batch(keys[:50] * 3) == [partition_for(k, 16) for k in keys[:50] * 3]
    assert hot.cached() == 50


def test_default_cache_size() -> None:
    partitioner = KeyPartitioner(4)
    assert partitioner.cache_size == 100_000
