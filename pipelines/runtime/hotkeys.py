"""Hot keys: which keys carry the load of a partition, sampled where a task reads it.

A task runs a partition's records on one core, so one key with most of a partition's records
makes that task the bottleneck however many workers run. Each task keeps a
:class:`TopKeys` sketch per input partition, fed with the raw key bytes of every
:data:`SAMPLE_EVERY`-th batch it reads (a ``collections.Counter`` of the batch, counted in C,
then folded into the sketch: about 85 ns a sampled record, so about 1% of a task's time); the
workers report each partition's top keys and shares (:class:`PartitionKeys`) and the runner
shows them and warns once per key and partition (:func:`hot_keys_over`).

The sketch is the Misra-Gries summary in its mergeable form (Agarwal et al., "Mergeable
summaries", 2012), which is space-saving's twin: k counters, and a batch's counts merged in by
adding them up and, when more than k keys are counted, subtracting the (k+1)-th largest count
from every counter and dropping those left at zero or below. Each subtraction of ``t`` takes
``t`` from at least k+1 counters, and no more than the total weight ``n`` added can ever be
taken, so the subtractions sum to at most ``n / (k + 1)``; a key loses at most that sum. Hence,
for every key, ``estimate <= true count <= estimate + error`` with
``error <= n / (k + 1)``: any key with more than ``n / (k + 1)`` records is in the sketch, and
a share estimated from it is at most ``1 / (k + 1)`` below the true one (3% with k = 32).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HOT_KEY_MIN_RECORDS",
    "HOT_KEY_SHARE",
    "SAMPLE_EVERY",
    "KeySampler",
    "PartitionKeys",
    "TopKeys",
    "display_key",
    "hot_keys_over",
]

SAMPLE_EVERY = 8
"""A task samples one batch in this many per input partition (the first one included)."""
SKETCH_SIZE = 32
"""Counters per sketch (k): shares are at most 1/(k+1) below the truth."""
REPORTED = 5
"""Top keys per partition a worker reports."""
HOT_KEY_SHARE = 0.5
"""The share of a partition's records above which one key is reported as hot
(``headwater run --hot-key-share``)."""
HOT_KEY_MIN_RECORDS = 1000
"""Records a partition must have had before one of its keys can be reported as hot."""
_SHOWN_KEY = 40


class TopKeys:
    """The heaviest keys of a stream of weighted keys, in ``size`` counters (see the module
    docstring for the algorithm and its error bound)."""

    __slots__ = ("counts", "error", "size", "total")

    def __init__(self, size: int = SKETCH_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a sketch needs at least 1 counter, not {size}")
        self.size = size
        self.counts: dict[Any, int] = {}
        """Per key kept: its estimated count, never above the true one."""
        self.total = 0
        """The weight added so far (``n``)."""
        self.error = 0
        """What was subtracted from every counter so far: a key's true count is at most its
        estimate plus this, which is at most ``total / (size + 1)``."""

    def add(self, counts: Mapping[Any, int]) -> None:
        """Merge in the counts of a batch (key -> positive weight)."""
        merged = dict(counts)
        get = merged.get
        for key, count in self.counts.items():
            merged[key] = get(key, 0) + count
        self.total += sum(counts.values())
        if len(merged) > self.size:
            cut = heapq.nlargest(self.size + 1, merged.values())[-1]
            merged = {key: count - cut for key, count in merged.items() if count > cut}
            self.error += cut
        self.counts = merged

    def top(self, n: int) -> list[tuple[Any, int]]:
        """The ``n`` keys with the largest estimates, with them, largest first."""
        return heapq.nlargest(n, self.counts.items(), key=lambda item: item[1])


@dataclass(slots=True)
class PartitionKeys:
    """A partition's top keys as a worker reports them."""

    topic: str
    partition: int
    records: int
    """Records the task read from the partition (all of them, not only the sampled)."""
    top: list[tuple[str, float]] = field(default_factory=list)
    """The top keys (decoded, shortened) and their estimated share of the partition's records,
    largest first."""


class KeySampler:
    """The key load of one input partition of a task: every :data:`SAMPLE_EVERY`-th batch's
    raw keys go into a :class:`TopKeys` sketch; records without a key are not counted."""

    __slots__ = ("_batches", "records", "sketch")

    def __init__(self) -> None:
        self.sketch = TopKeys()
        self.records = 0
        self._batches = 0

    def sample(self, keys: Sequence[bytes | None]) -> None:
        """Count a batch's records, and sample its keys if its turn has come."""
        self.records += len(keys)
        turn = self._batches % SAMPLE_EVERY == 0
        self._batches += 1
        if not turn:
            return
        counts = Counter(keys)
        counts.pop(None, None)
        if counts:
            self.sketch.add(counts)

    def report(self, topic: str, partition: int) -> PartitionKeys:
        """The partition's top keys and their shares, for the runner."""
        sampled = self.sketch.total
        top = [(display_key(key), count / sampled) for key, count in self.sketch.top(REPORTED)]
        return PartitionKeys(topic, partition, self.records, top)


def display_key(key: object) -> str:
    """A key for people: raw bytes decoded (undecodable bytes replaced), at most 40 chars."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
    return text if len(text) <= _SHOWN_KEY else text[: _SHOWN_KEY - 1] + "…"


SKEWED = 1.5
"""How many times its topic's mean load a partition must carry for its top key to be hot."""


def hot_keys_over(
    loads: Iterable[PartitionKeys], share: float, min_records: int = HOT_KEY_MIN_RECORDS
) -> list[tuple[PartitionKeys, str, float]]:
    """The (partition, key, share) where one key carries more than ``share`` of a partition
    that has had at least ``min_records`` records and :data:`SKEWED` times the mean load of
    its topic's partitions. A key alone on its partition is no problem while every partition
    carries as much: few keys spread evenly make no hot key, and a topic of one partition
    has one task whatever its keys."""
    loads = list(loads)
    totals: dict[str, list[int]] = {}
    for load in loads:
        totals.setdefault(load.topic, []).append(load.records)
    return [
        (load, key, part)
        for load in loads
        if load.records >= min_records
        and load.records >= SKEWED * sum(totals[load.topic]) / len(totals[load.topic])
        for key, part in load.top
        if part > share
    ]
