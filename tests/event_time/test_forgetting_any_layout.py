"""Dedupe and an aggregation's ``ttl=`` forget by event time as references computed from the
input alone say, whatever the partitions, workers and batch sizes.

Both steps forget by their task's event-time mark (:mod:`operators._expiry`): dedupe forgets a
passed record at ``t`` once the mark is ``t + horizon`` or more; ``count(ttl=)`` forgets a key
once the mark is ``latest + ttl`` or more, ``latest`` the largest event time of the key's records
counted. The mark moves between batches, and a step that reads a source's topic (as here: the
steps key by the record key, with no repartition) has as mark the largest event time read from
its partition, never ahead of the largest event time before a record in the input. The
references (:func:`event_time.oracles.dedupe_passes`, :func:`~event_time.oracles.ttl_counts`)
forget as soon as that largest time is a horizon past; the input is built so that every record's
fate is decided whatever the layout:

- **Remembered.** Records whose key the largest event time before them is less than a horizon
  (ttl) past: no mark can have reached it, in any batches.
- **Forgotten.** After the first part, the source writes a *pacer* (a record of a key of its
  own) to every partition, a horizon (ttl) past every event time so far, then holds the rest back
  until every pacer has reached the sink. A task has then processed its pacer's batch, and moved
  its mark (between that batch and the next) to the pacer's time, so what the rest meets of the
  first part is forgotten.

Event times are set by the source (``timestamp=``), in milliseconds, in 2100: an input quiet
for ``idle`` while its worker has nothing to fetch follows the wall clock, which is then behind
every event time and moves no mark.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import connectors
from event_time.oracles import dedupe_passes, newest_before, ttl_counts
from event_time.test_joins_and_dedupe_any_layout import run_layout, with_copies
from event_time.test_windows_any_layout import topic_values
from pipelines import Pipeline, Topic
from pipelines.partitioner import partition_for

FUTURE_MS = 4_102_444_800_000  # 2100-01-01: later than the wall clock (see the docstring)
WAIT_S = 20.0  # for the pacers to reach the sink while the source holds the rest back

LAYOUTS = {
    "partitions": st.sampled_from([1, 6, 12]),
    "workers": st.sampled_from([1, 3]),
    "batch": st.integers(1, 200),
    "max_batch": st.sampled_from([10, 100, 2000]),
}
EXAMPLES = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    # no shrinking: each step costs a run, and hypothesis gives up shrinking only after 5
    # minutes, the tests' timeout; a failure reports the example as generated
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def pacers(partitions: int, stamp: int) -> list[dict[str, Any]]:
    """One record per partition at ``stamp``, each of a key of its own placed on that partition
    (Kafka's partitioner over the key's UTF-8 bytes, the topic's default key serde)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        key = f"pacer{n}"
        found.setdefault(partition_for(key.encode(), partitions), key)
        n += 1
    return [{"k": key, "t": stamp} for _, key in sorted(found.items())]


class Phased:
    """The input as a source: the first part and the pacers, then, once every pacer has reached
    ``out``, the rest. Each record is ``{"n": position in the input, "k": key, "t": time}``."""

    def __init__(
        self,
        first: list[dict[str, Any]],
        paced: list[dict[str, Any]],
        rest: list[dict[str, Any]],
    ) -> None:
        self.order = [{**r, "n": n} for n, r in enumerate([*first, *paced, *rest])]
        """The input in the order the source gives it."""
        self.split = len(first) + len(paced)
        self.pacer_keys = {r["k"] for r in paced}
        self.out = connectors.Collect()

    async def records(self) -> AsyncIterator[dict[str, Any]]:
        for index, record in enumerate(self.order[: self.split]):
            if index % 10 == 0:
                await asyncio.sleep(0)
            yield record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not self.pacer_keys <= set(self.out.keys):
            assert loop.time() < deadline, f"the pacers did not reach the sink in {WAIT_S:.0f} s"
            await asyncio.sleep(0.002)
        for record in self.order[self.split :]:
            yield record

    def source(self, batch: int) -> connectors.Iterable:
        return connectors.Iterable(
            self.records,
            batch_size=batch,
            key=lambda r: r["k"],
            timestamp=lambda r: r["t"],
            max_delay=0.001,
        )

    def pairs(self) -> list[tuple[str, int]]:
        """The input as ``(key, event time)``, what the references take."""
        return [(r["k"], r["t"]) for r in self.order]


def run_phased(
    phased: Phased,
    step: Callable[[Pipeline], Pipeline],
    *,
    partitions: int,
    workers: int,
    batch: int,
    max_batch: int,
) -> None:
    pipeline = step(
        Pipeline("forget").source(phased.source(batch), into=Topic("events", partitions=partitions))
    ).sink(phased.out, step_id="out")
    log = run_layout(pipeline, workers=workers, max_batch=max_batch)
    assert topic_values(log, "forget.dead-letters") == []


# -- dedupe ----------------------------------------------------------------------------------------


@EXAMPLES
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 400),
    step=st.integers(0, 200),
    disorder=st.integers(0, 3_000),
    slack=st.integers(1, 1_000),
    **LAYOUTS,
)
def test_dedupe_drops_copies_within_the_horizon_and_passes_them_once_forgotten(
    seed: int,
    count: int,
    step: int,
    disorder: int,
    slack: int,
    partitions: int,
    workers: int,
    batch: int,
    max_batch: int,
) -> None:
    """Events of a disorder ``D``, each sent one to four times with the copies no more than
    ``D`` behind the latest event before them, deduplicated by key with a horizon
    ``H = D + slack``: every copy is less than ``H`` from the largest time before it, so its
    event is remembered and it is dropped. Then the pacers, ``H`` past the latest event, and
    once they are through, another copy of some of the events: forgotten, they pass again.

    The passed records equal :func:`~event_time.oracles.dedupe_passes` over the input; the
    test also checks the construction decided each: the reference passes exactly each event's
    first record, the pacers and the late copies."""
    rng = random.Random(seed)
    horizon = disorder + slack
    events = [
        {"k": f"e{i}", "t": FUTURE_MS + i * step - rng.randint(0, disorder)} for i in range(count)
    ]
    first = [dict(r) for r in with_copies(rng, [{**e, "ts": e["t"]} for e in events], disorder)]
    latest = max((e["t"] for e in events), default=FUTURE_MS)
    paced = pacers(partitions, latest + horizon)
    again = [dict(e) for e in rng.sample(events, rng.randint(0, count))]
    phased = Phased(first, paced, again)

    expected = dedupe_passes(phased.pairs(), horizon)
    firsts = {r["k"]: r["n"] for r in reversed(phased.order[: len(first)])}
    decided = sorted([*firsts.values(), *range(len(first), len(phased.order))])
    assert expected == decided, "the construction left a record's fate to the layout"

    def dedupe(chain: Pipeline) -> Pipeline:
        return chain.dedupe("once", timedelta(milliseconds=horizon))

    run_phased(
        phased,
        dedupe,
        partitions=partitions,
        workers=workers,
        batch=batch,
        max_batch=max_batch,
    )
    assert sorted(r["n"] for r in phased.out.values) == expected


# -- count(ttl=) -----------------------------------------------------------------------------------


def part(rng: random.Random, count: int, *, users: int, step: int, disorder: int) -> list[Any]:
    """``(user, relative time)`` of ``count`` records advancing ``step`` ms each, each up to
    ``disorder`` ms early."""
    return [(f"u{rng.randrange(users)}", i * step - rng.randint(0, disorder)) for i in range(count)]


def ttl_needed(records: list[tuple[str, int]]) -> int:
    """The smallest ttl with which no key of ``records`` can be forgotten between two of its
    records: more than how far the largest time before a record is past the latest time of
    its key's records before it."""
    latest: dict[str, int] = {}
    need = 0
    for (key, stamp), newest in zip(records, newest_before(records), strict=True):
        if key in latest and newest is not None:
            need = max(need, newest - latest[key] + 1)
        latest[key] = max(latest.get(key, stamp), stamp)
    return need


def counts_by_key(keys: list[str], counts: list[int]) -> dict[str, list[int]]:
    """Each key's counts, in the order they came."""
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, n in zip(keys, counts, strict=True):
        per_key[key].append(n)
    return dict(per_key)


@EXAMPLES
@given(
    seed=st.integers(0, 2**32),
    counts=st.tuples(st.integers(1, 400), st.integers(0, 400)),
    users=st.integers(1, 8),
    step=st.integers(0, 200),
    disorder=st.integers(0, 3_000),
    slack=st.integers(0, 1_000),
    **LAYOUTS,
)
def test_a_count_with_a_ttl_restarts_exactly_the_keys_forgotten(
    seed: int,
    counts: tuple[int, int],
    users: int,
    step: int,
    disorder: int,
    slack: int,
    partitions: int,
    workers: int,
    batch: int,
    max_batch: int,
) -> None:
    """A count by user with ``ttl`` over two parts of a stream of disorder ``D``, the ttl more
    than any key's records are apart in either part (how far the largest time before a record
    is past the latest of its key): within a part no key can be forgotten. Between them, the
    pacers, a ttl past the first part, and once they are through, the second part (times from
    the pacers' on): every key of the first part is forgotten, and its count starts again.

    Each user's counts, in order, equal :func:`~event_time.oracles.ttl_counts` over the input;
    the test also checks the construction decided each: the reference counts each part on its
    own."""
    rng = random.Random(seed)
    first_rel = part(rng, counts[0], users=users, step=step, disorder=disorder)
    rest_rel = part(rng, counts[1], users=users, step=step, disorder=disorder)
    ttl = max(ttl_needed(first_rel), ttl_needed(rest_rel), 1) + slack
    first = [{"k": k, "t": FUTURE_MS + t} for k, t in first_rel]
    pace_at = max(r["t"] for r in first) + ttl
    # the second part no earlier than the pacers: they hold no key of it back
    rest = [{"k": k, "t": pace_at + disorder + t} for k, t in rest_rel]
    phased = Phased(first, pacers(partitions, pace_at), rest)

    pairs = phased.pairs()
    expected = ttl_counts(pairs, ttl)
    split = len(first)
    one_by_one = ttl_counts(pairs[:split], 10**15) + ttl_counts(pairs[split:], 10**15)
    assert expected == one_by_one, "the construction left a key's fate to the layout"

    def count(chain: Pipeline) -> Pipeline:
        return chain.count("n", ttl=timedelta(milliseconds=ttl))

    run_phased(
        phased,
        count,
        partitions=partitions,
        workers=workers,
        batch=batch,
        max_batch=max_batch,
    )
    got = counts_by_key(phased.out.keys, phased.out.values)
    assert got == counts_by_key([k for k, _ in pairs], expected)
