"""Joins: stream-table and stream-stream, against plain-Python reference computations."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from connectors.base import SinkContext
from connectors.memory import Collect, Iterable
from connectors.topic import LogTopic
from operators._timing import TIME, WATERMARK
from operators.joins import JOINED, StreamJoin
from pipelines import Pipeline, PipelineDefinitionError, Topic
from pipelines.log import EmbeddedLog, MemoryLog
from pipelines.log.base import LogBackend, RawBatch, TopicPartition
from pipelines.record import Record, from_millis
from pipelines.runtime.engine import prepare_topics
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.outbox import Outbox
from pipelines.runtime.task import Task
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.worker import WorkerReport
from pipelines.state.store import encode_key
from pipelines.testing import Checkpoint, OperatorHarness, TestResult, run_pipeline

T0 = 1_700_000_000_000  # event times in the past, so an idle partition's watermark passes them


def canonical(values: list[Any]) -> Counter[bytes]:
    """A multiset of values (results come from several partitions in any interleaving)."""
    return Counter(orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in values)


async def run(pipeline: Pipeline, log: LogBackend, *, workers: int = 1) -> None:
    await run_in_process(compile_pipeline(pipeline), log, workers=workers)


async def write_table(log: LogBackend, table: Topic, rows: list[Record], name: str) -> None:
    """Write ``rows`` to ``table`` the way any producer would (partitioned by key bytes)."""
    await run(Pipeline(name).source(Iterable(rows), into=table), log)


# -- stream-table -----------------------------------------------------------------------------

USERS = [f"u{n}" for n in range(12)]


def table_history(seed: int) -> list[Record]:
    """Inserts, updates and deletes (``None``) of user rows, in the order they were written."""
    rng = random.Random(seed)
    history = [(user, {"tier": f"t{n}-v0"}) for n, user in enumerate(USERS[:10])]
    for version in range(1, 40):
        user = rng.choice(USERS)
        deleted = rng.random() < 0.25
        history.append((user, None if deleted else {"tier": f"{user}-v{version}"}))
    return [Record(key=k, value=v, timestamp=from_millis(T0)) for k, v in history]


def table_after(history: list[Record]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for record in history:
        if record.value is None:
            table.pop(record.key, None)
        else:
            table[record.key] = record.value
    return table


def orders(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"n": n, "user": rng.choice(USERS), "at": T0 + n * 10 + rng.randint(-30, 30)}
        for n in range(count)
    ]


def enrich(order: dict[str, Any], user: dict[str, Any] | None) -> dict[str, Any]:
    return {"n": order["n"], "user": order["user"], "tier": None if user is None else user["tier"]}


def shop(users: Topic, how: str, out: Collect, items: list[dict[str, Any]]) -> Pipeline:
    return (
        Pipeline("shop")
        .source(Iterable(items, timestamp=lambda o: o["at"]), into=Topic("orders", partitions=2))
        .key_by("by-user", lambda o: o["user"], partitions=users.partitions)
        .join_table("enrich", users, enrich, how=how)  # type: ignore[arg-type]
        .sink(out, step_id="out")
    )


def enriched_reference(items: list[dict[str, Any]], table: dict[str, Any], how: str) -> list[Any]:
    return [
        enrich(order, table.get(order["user"]))
        for order in items
        if how == "left" or order["user"] in table
    ]


@pytest.mark.parametrize("how", ["inner", "left"])
@pytest.mark.parametrize("workers", [1, 2])
async def test_stream_table_join_equals_the_reference(how: str, workers: int) -> None:
    users = Topic("users", partitions=3, compacted=True)
    history = table_history(seed=7)
    items = orders(400, seed=8)
    log = MemoryLog()
    await write_table(log, users, history, "load-users")  # the table is written first

    out = Collect()
    await run(shop(users, how, out, items), log, workers=workers)

    expected = enriched_reference(items, table_after(history), how)
    assert canonical(out.values) == canonical(expected)
    # one key is one task: each user's results keep the stream's order, key and timestamps
    for user in USERS:
        mine = [r for r in out.records if r.key == user]
        assert [r.value for r in mine] == [v for v in expected if v["user"] == user]
        joined = how == "left" or user in table_after(history)
        stamps = [o["at"] for o in items if o["user"] == user and joined]
        assert [int(r.timestamp.timestamp() * 1000) for r in mine] == stamps


async def test_stream_table_join_gives_the_same_result_with_one_or_two_workers() -> None:
    users = Topic("users", partitions=4, compacted=True)
    history = table_history(seed=11)
    items = orders(600, seed=12)
    results = []
    for workers in (1, 2):
        log = MemoryLog()
        await write_table(log, users, history, "load-users")
        out = Collect()
        await run(shop(users, "left", out, items), log, workers=workers)
        results.append(canonical(out.values))
    assert results[0] == results[1]
    assert sum(results[0].values()) == len(items)


def test_a_table_join_dead_letters_records_without_a_key() -> None:
    users = Topic("users", compacted=True)
    pipeline = (
        Pipeline("shop")
        .source(Iterable([{"n": 1}]), into=Topic("orders"))
        .join_table("enrich", users, lambda o, u: o, how="left")
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.values("out") == []
    [dead] = result.dead_letters
    assert dict(dead.headers)["headwater.step"] == b"enrich"
    assert b"key_by" in dict(dead.headers)["headwater.error"]


def _append_rows(log: MemoryLog, tp: TopicPartition, rows: list[tuple[str, Any]]) -> None:
    log.append(
        tp,
        RawBatch(
            [k.encode() for k, _ in rows],
            [None if v is None else orjson.dumps(v) for _, v in rows],
            [T0] * len(rows),
        ),
    )


async def test_table_records_arriving_as_input_apply_in_order_after_the_bootstrap() -> None:
    """A task fed batch by batch: the bootstrap reads the table to its end, table records
    below that end are not applied again when they arrive as input, later ones apply in order
    (updates and deletes), and each stream record sees the table as of that moment."""
    users = Topic("users", partitions=1, compacted=True)
    out = Collect()
    pipeline = (
        Pipeline("shop")
        .source(LogTopic(Topic("orders", partitions=1)))
        .join_table("enrich", users, lambda o, u: [o["user"], u and u["tier"]], how="left")
        .sink(out, step_id="out")
    )
    topology = compile_pipeline(pipeline)
    log = MemoryLog()
    await prepare_topics(log, topology)
    table_tp, orders_tp = TopicPartition("users", 0), TopicPartition("orders", 0)
    _append_rows(log, table_tp, [("ann", {"tier": "gold"}), ("ann", {"tier": "silver"})])
    _append_rows(log, table_tp, [("bob", {"tier": "bronze"})])

    sub = topology.by_topic["orders"]
    writers = {"out": out.open(SinkContext("shop", "out", 0))}
    task = Task(topology, sub, 0, Outbox(log.producer()), writers, {}, None)
    await task.restore(log, {})
    assert len(task.state.tables["enrich"]) == 2

    def feed(tp: TopicPartition, offset: int, count: int) -> None:
        task.process(log.read_now(tp, offset, count))

    def ask(*who: str) -> list[Any]:
        out.clear()
        start = len(log.read_now(orders_tp, 0, 1 << 30).records)
        _append_rows(log, orders_tp, [(name, {"user": name}) for name in who])
        feed(orders_tp, start, len(who))
        return list(out.values)

    assert ask("ann", "bob", "cy") == [["ann", "silver"], ["bob", "bronze"], ["cy", None]]
    feed(table_tp, 0, 1)  # ann=gold again, as input: the bootstrap applied it already
    assert ask("ann") == [["ann", "silver"]]
    feed(table_tp, 1, 2)
    _append_rows(log, table_tp, [("cy", {"tier": "iron"}), ("ann", None), ("bob", {"tier": "tin"})])
    feed(table_tp, 3, 1)  # cy appears
    assert ask("ann", "bob", "cy") == [["ann", "silver"], ["bob", "bronze"], ["cy", "iron"]]
    feed(table_tp, 4, 2)  # ann deleted, bob updated
    assert ask("ann", "bob", "cy") == [["ann", None], ["bob", "tin"], ["cy", "iron"]]
    _append_rows(log, table_tp, [("ann", {"tier": "back"})])
    feed(table_tp, 6, 1)
    assert ask("ann") == [["ann", "back"]]
    assert task.state.tables["enrich"].bootstrapped_to == 3


async def test_stream_table_join_continues_after_a_restart_on_the_embedded_log(
    tmp_path: Path,
) -> None:
    users = Topic("users", partitions=2, compacted=True)
    history = table_history(seed=21)
    items = orders(300, seed=22)
    first, second = items[:150], items

    log = EmbeddedLog(tmp_path)
    await write_table(log, users, history[:30], "load-users")
    out = Collect()
    await run(shop(users, "left", out, first), log, workers=2)
    assert canonical(out.values) == canonical(
        enriched_reference(first, table_after(history[:30]), "left")
    )
    await log.close()

    log = EmbeddedLog(tmp_path)  # a new run: more table rows, more orders
    await write_table(log, users, history, "load-users")
    out = Collect()
    await run(shop(users, "left", out, second), log, workers=2)
    await log.close()
    assert canonical(out.values) == canonical(
        enriched_reference(items[150:], table_after(history), "left")
    )


# -- declaration checks -----------------------------------------------------------------------


def rekeyed(name: str, partitions: int, **key_by: Any) -> Pipeline:
    return (
        Pipeline("p")
        .source(Iterable([]), into=Topic(name, partitions=1))
        .key_by(f"{name}-by-key", lambda v: v["k"], partitions=partitions, **key_by)
    )


def test_a_table_join_of_differently_partitioned_topics_is_refused() -> None:
    stream = rekeyed("orders", 4)
    with pytest.raises(PipelineDefinitionError) as caught:
        stream.join_table("enrich", Topic("users", partitions=2), enrich)
    message = str(caught.value)
    assert caught.value.step == "enrich"
    assert "'p.orders-by-key' (4 partitions)" in message
    assert "'users' (2 partitions)" in message
    assert "key_by(..., partitions=2)" in message
    assert "co-partitioned" in message


def test_a_stream_join_of_differently_partitioned_streams_is_refused() -> None:
    clicks = rekeyed("clicks", 3)
    views = clicks.source(Iterable([]), into=Topic("views", partitions=2))
    with pytest.raises(PipelineDefinitionError) as caught:
        clicks.join_stream("pair", views, timedelta(seconds=1), lambda a, b: a)
    message = str(caught.value)
    assert caught.value.step == "pair"
    assert "'p.clicks-by-key' (3 partitions)" in message
    assert "'views' (2 partitions)" in message
    assert "key_by(..., partitions=N)" in message


def test_joins_refuse_keys_serialised_differently_on_two_sides() -> None:
    stream = rekeyed("orders", 2, key=dict)
    with pytest.raises(PipelineDefinitionError, match="keyed alike") as caught:
        stream.join_table("enrich", Topic("users", partitions=2), enrich)
    assert "Json()" in str(caught.value)
    assert "Str()" in str(caught.value)


def test_other_join_declaration_mistakes_are_refused() -> None:
    clicks = rekeyed("clicks", 2)
    views = clicks.source(Iterable([]), into=Topic("views", partitions=1)).key_by(
        "views-by-key", lambda v: v["k"], partitions=2
    )
    hour = timedelta(hours=1)
    with pytest.raises(PipelineDefinitionError, match="two different streams"):
        clicks.join_stream("self", clicks, hour, lambda a, b: a)
    with pytest.raises(PipelineDefinitionError, match="'inner' or 'left'"):
        clicks.join_stream("j", views, hour, lambda a, b: a, how="outer")  # type: ignore[arg-type]
    with pytest.raises(PipelineDefinitionError, match="cannot join a chain of pipeline 'q'"):
        clicks.join_stream("j", Pipeline("q").source(Iterable([]), into=Topic("x")), hour, max)
    with pytest.raises(PipelineDefinitionError, match="negative"):
        clicks.join_stream("j", views, -hour, lambda a, b: a)
    with pytest.raises(PipelineDefinitionError, match="needs a function"):
        clicks.join_table("j", Topic("users", partitions=2), "merge")  # type: ignore[arg-type]
    with pytest.raises(PipelineDefinitionError, match="already reads topic 'views'"):
        views.join_table("j", Topic("views", partitions=1, key=bytes), enrich)


def test_a_join_compiles_into_one_sub_topology_with_its_table_or_other_stream() -> None:
    users = Topic("users", partitions=2)
    enriched = rekeyed("orders", 2).join_table("enrich", users, enrich)
    topology = compile_pipeline(enriched)
    sub = topology.by_topic["users"]
    assert sub is topology.by_topic["p.orders-by-key"]
    assert "enrich" not in topology.changelogs  # the table topic is its own changelog

    clicks = rekeyed("clicks", 2)
    views = clicks.source(Iterable([]), into=Topic("views")).key_by(
        "views-by-key", lambda v: v["k"], partitions=2
    )
    joined = compile_pipeline(clicks.join_stream("pair", views, timedelta(1), lambda a, b: a))
    assert joined.by_topic["p.clicks-by-key"] is joined.by_topic["p.views-by-key"]
    assert joined.changelog_topic("pair").partitions == 2
    assert joined.late_topic("pair").name == "p.pair.late"


# -- stream-stream: the operator, batch by batch ----------------------------------------------


Event = tuple[int, str, int, dict[str, Any]]  # side, key, time, value


def join_events(seed: int, count: int, *, disorder: int, stragglers: float) -> list[Event]:
    """Events of both sides on a few keys, out of order by up to ``disorder`` ms, with some
    records far behind (late)."""
    rng = random.Random(seed)
    events: list[Event] = []
    for n in range(count):
        stamp = T0 + n * 20 + rng.randint(-disorder, disorder)
        if rng.random() < stragglers:
            stamp -= rng.randint(200, 2000)
        side = rng.randint(0, 1)
        events.append((side, f"k{rng.randint(0, 4)}", stamp, {"id": n, "side": side}))
    return events


def pair(left: dict[str, Any], right: dict[str, Any] | None) -> list[Any]:
    return [left["id"], None if right is None else right["id"]]


def brute_force(
    chunks: list[list[Event]], within: int, grace: int, how: str
) -> tuple[list[Any], list[Any]]:
    """(results, late values) when the events come in ``chunks``: the watermark before a chunk
    is the largest time of the chunks before it (none before the first), and a record is late
    when its time + grace is behind it; every other pair of sides with equal keys within
    ``within`` joins."""
    watermark: int | None = None
    kept: list[Event] = []
    late: list[Any] = []
    for chunk in chunks:
        for event in chunk:
            _, _, stamp, value = event
            if watermark is not None and stamp + grace < watermark:
                late.append(value)
            else:
                kept.append(event)
        stamps = [e[2] for e in chunk] + ([] if watermark is None else [watermark])
        watermark = max(stamps, default=None)
    lefts = [e for e in kept if e[0] == 0]
    rights = [e for e in kept if e[0] == 1]
    results: list[Any] = []
    for _, key, stamp, value in lefts:
        partners = [r for r in rights if r[1] == key and abs(r[2] - stamp) <= within]
        results += [pair(value, r[3]) for r in partners]
        if how == "left" and not partners:
            results.append(pair(value, None))
    return results, late


def as_chunks(events: list[Event], rng: random.Random) -> list[list[Event]]:
    """Consecutive records of one side, in arrival order, cut into chunks of 1-5."""
    chunks: list[list[Event]] = []
    at = 0
    while at < len(events):
        side, size, end = events[at][0], rng.randint(1, 5), at
        while end < len(events) and events[end][0] == side and end - at < size:
            end += 1
        chunks.append(events[at:end])
        at = end
    return chunks


class Feeder:
    """Feeds chunks to a join as the runtime would: each chunk (one side's records) as a batch
    on its side's input, and after each, the mark (the largest event time so far)."""

    def __init__(self) -> None:
        self.mark: int | None = None

    def feed(self, join: OperatorHarness, chunk: list[Event]) -> tuple[list[Any], list[Any]]:
        """(what processing the chunk emitted, what the mark moving after it emitted)."""
        processed = join.send(
            [e[3] for e in chunk],
            keys=[e[1] for e in chunk],
            timestamps=[e[2] for e in chunk],
            input=chunk[0][0],
        ).values
        self.mark = max([e[2] for e in chunk] + ([] if self.mark is None else [self.mark]))
        return processed, join.advance(self.mark).values


def stream_join(
    how: str, within: int, grace: int, checkpoint: Checkpoint | None = None
) -> OperatorHarness:
    """A stream join of step ``pair`` (restored from ``checkpoint``, if given)."""
    return OperatorHarness(
        lambda: StreamJoin("pair", pair, how=how, within_ms=within, grace_ms=grace),  # type: ignore[arg-type]
        checkpoint=checkpoint,
    )


@pytest.mark.parametrize("how", ["inner", "left"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("restart", [False, True])
def test_stream_join_equals_a_brute_force_reference(how: str, seed: int, restart: bool) -> None:
    within, grace = 60, 40
    events = join_events(seed, 400, disorder=30, stragglers=0.05)
    chunks = as_chunks(events, random.Random(seed))
    expected, expected_late = brute_force(chunks, within, grace, how)

    join = stream_join(how, within, grace)
    feeder = Feeder()
    results: list[Any] = []
    late: list[Any] = []
    for number, chunk in enumerate(chunks):
        if restart and number == len(chunks) // 2:  # a crash: a new operator, a restored store
            late += [r.value for r in join.late]
            join = stream_join(how, within, grace, join.checkpoint())
        processed, expired = feeder.feed(join, chunk)
        results += processed + expired
        assert len(join.state(JOINED)) <= 60  # records expire as the watermark passes them
    results += join.finish().values  # the end of input
    late += [r.value for r in join.late]

    assert expected_late and late == expected_late
    assert sorted(results, key=str) == sorted(expected, key=str)
    assert join.rejected == []
    assert join.pending == 0
    assert list(join.state(JOINED).items()) == [] and list(join.store.items()) == []


def test_the_brute_force_judges_a_chunk_against_the_watermark_before_it() -> None:
    events: list[Event] = [
        (0, "a", T0 + 100, {"id": "L"}),
        (1, "a", T0 + 50, {"id": "R"}),  # 50 ms behind L: late with a grace of 49
    ]
    assert brute_force([events], 50, 49, "inner") == ([["L", "R"]], [])
    assert brute_force([events[:1], events[1:]], 50, 49, "inner") == ([], [{"id": "R"}])
    assert brute_force([events[:1], events[1:]], 50, 50, "inner") == ([["L", "R"]], [])


def test_stream_join_emits_pairs_once_whichever_side_comes_first() -> None:
    join = stream_join("left", 100, 0)
    events: list[Event] = [
        (0, "a", T0, {"id": "L1"}),
        (1, "a", T0 + 50, {"id": "R1"}),  # joins L1, which came first
        (0, "a", T0 + 150, {"id": "L2"}),  # joins R1 (exactly 100 ms apart), not L-to-L
        (1, "b", T0 + 160, {"id": "R2"}),
        (0, "a", T0 + 400, {"id": "L3"}),  # expires L1 and L2 (matched), no partner itself
        (1, "a", T0 + 501, {"id": "R3"}),  # 101 ms after L3: no pair; L3 expires unmatched
    ]
    feeder = Feeder()
    out = [feeder.feed(join, [event]) for event in events[:-1]]
    assert out == [([], []), ([["L1", "R1"]], []), ([["L2", "R1"]], []), ([], []), ([], [])]
    assert join.pending == 1  # L3 waits for its partners' time to pass
    # R3 joins nothing; the mark it brings, 501, is past L3's 400 + 100: L3 expires alone
    assert feeder.feed(join, events[-1:]) == ([], [["L3", None]])
    assert join.pending == 0


def test_stream_join_bounds_are_inclusive_on_both_sides() -> None:
    join = stream_join("inner", 100, 100)
    events: list[Event] = [
        (0, "a", T0 + 100, {"id": "L1"}),
        (1, "a", T0, {"id": "R1"}),  # 100 ms before L1 (within the grace): joins
        (1, "a", T0 + 200, {"id": "R2"}),  # 100 ms after: joins
        (1, "a", T0 + 201, {"id": "R3"}),  # 101 ms after: does not
        (0, "a", T0 + 101, {"id": "L2"}),  # joins R2 and R3; not late: 101 + 100 >= 201
        (1, "a", T0 - 2, {"id": "R4"}),  # late: -2 + 100 < 201
    ]
    feeder = Feeder()
    results = []
    for event in events:  # one record per batch: the watermark moves after each
        processed, expired = feeder.feed(join, [event])
        results += processed + expired
    assert results == [["L1", "R1"], ["L1", "R2"], ["L2", "R2"], ["L2", "R3"]]
    assert [r.value for r in join.late] == [{"id": "R4"}]
    assert brute_force([[e] for e in events], 100, 100, "inner") == (results, [{"id": "R4"}])


class Click(BaseModel):
    user: str
    page: str


def test_stream_join_gives_merge_models_on_a_model_typed_side_also_after_a_restore() -> None:
    seen: list[tuple[type, type]] = []

    def merge(click: Any, view: Any) -> str:
        seen.append((type(click), type(view)))
        return f"{click.page}/{view['page']}"

    def operator() -> StreamJoin:
        return StreamJoin(
            "pair", merge, how="inner", within_ms=10, grace_ms=0, models=(Click, None)
        )

    join = OperatorHarness(operator)
    assert join.send([Click(user="ann", page="/a")], keys=["ann"], timestamps=[T0]).values == []
    assert join.send([{"page": "/b"}], keys=["ann"], timestamps=[T0 + 5], input=1).values == [
        "/a//b"
    ]
    join = OperatorHarness(operator, checkpoint=join.checkpoint())  # the click: a Click again
    assert join.send([{"page": "/c"}], keys=["ann"], timestamps=[T0 + 8], input=1).values == [
        "/a//c"
    ]
    assert seen == [(Click, dict), (Click, dict)]


# -- stream-stream: whole pipelines -------------------------------------------------------------


def two_streams(
    events: list[Event],
    how: str,
    within: timedelta,
    out: Collect,
    *,
    grace: timedelta,
    idle: timedelta = timedelta(seconds=1),
    rights: Iterable | None = None,
) -> Pipeline:
    """Left and right events from two sources, re-keyed, joined; ``rights`` replaces the
    source of the right side."""

    def source(side: int) -> Iterable:
        values = [dict(e[3], key=e[1], at=e[2]) for e in events if e[0] == side]
        return Iterable(values, timestamp=lambda v: v["at"], batch_size=50)

    lefts = (
        Pipeline("pairs")
        .source(source(0), into=Topic("lefts", partitions=2))
        .key_by("lefts-by-key", lambda v: v["key"], partitions=3)
    )
    right_side = (
        lefts.source(rights or source(1), into=Topic("rights", partitions=1))
        .filter("rights-only", lambda v: True)
        .key_by("rights-by-key", lambda v: v["key"], partitions=3)
    )
    return lefts.join_stream(
        "pair",
        right_side,
        within,
        pair,
        how=how,  # type: ignore[arg-type]
        grace=grace,
        idle=idle,
    ).sink(out, step_id="out")


@pytest.mark.parametrize("how", ["inner", "left"])
@pytest.mark.parametrize("workers", [1, 2])
async def test_stream_join_pipeline_equals_a_brute_force_reference(how: str, workers: int) -> None:
    # two topics are polled in any order, so the grace covers the whole input: nothing late
    events = join_events(31, 500, disorder=60, stragglers=0)
    expected, late = brute_force([events], 45, 1 << 40, how)
    assert late == []
    out = Collect()
    pipeline = two_streams(events, how, timedelta(milliseconds=45), out, grace=timedelta(hours=1))
    await run(pipeline, MemoryLog(), workers=workers)
    assert sorted(out.values, key=str) == sorted(expected, key=str)
    stamps = {e[3]["id"]: e[2] for e in events}
    keys = {e[3]["id"]: e[1] for e in events}
    for record in out.records:
        left, right = record.value
        assert record.key == keys[left]
        at = stamps[left] if right is None else max(stamps[left], stamps[right])
        assert int(record.timestamp.timestamp() * 1000) == at


WATERMARK_BYTES = encode_key(WATERMARK, TIME)


def changelog_watermark(log: MemoryLog, changelog: str) -> int | None:
    """The watermark a step last committed to its changelog (None before it has one)."""
    watermark = None
    for partition in range(log.spec(changelog).partitions):
        raw = log.read_now(TopicPartition(changelog, partition), 0, 1 << 30).records
        for key, value in zip(raw.keys, raw.values, strict=True):
            if key == WATERMARK_BYTES and value is not None:
                watermark = orjson.loads(value)
    return watermark


async def test_records_behind_the_watermark_by_more_than_the_grace_go_to_the_late_topic() -> None:
    events = [
        {"side": "L", "k": "a", "at": T0 + 10_000, "id": 1},
        {"side": "R", "k": "a", "at": T0 + 9_990, "id": 2},  # within the grace: joins 1
        {"side": "R", "k": "a", "at": T0, "id": 3},  # 10 s behind, grace 1 s: late
    ]
    log = MemoryLog()
    changelog = "p.pair.changelog"

    async def arriving() -> AsyncIterator[dict[str, Any]]:
        yield events[0]
        yield events[1]
        # the watermark moves between batches: the straggler comes once the join has been
        # told the mark of the first two (they were read, re-keyed, and the re-keying task's
        # marker read after them) and committed it
        for _ in range(1000):
            watermark = changelog_watermark(log, changelog)
            if watermark is not None and watermark >= T0 + 10_000:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the join's watermark never reached the first two records")
        yield events[2]

    keyed_events = (
        Pipeline("p")
        .source(
            Iterable(arriving, timestamp=lambda e: e["at"], batch_size=2, max_delay=0.001),
            into=Topic("events"),
        )
        .key_by("by-k", lambda e: e["k"])
    )
    lefts = keyed_events.filter("lefts", lambda e: e["side"] == "L")
    rights = keyed_events.filter("rights", lambda e: e["side"] == "R")
    out = Collect()
    pipeline = lefts.join_stream(
        "pair",
        rights,
        timedelta(milliseconds=20),
        lambda left, right: [left["id"], right["id"]],
        grace=timedelta(seconds=1),
    ).sink(out, step_id="out")
    topology = compile_pipeline(pipeline)
    assert topology.changelog_topic("pair").name == changelog
    await run_in_process(topology, log)

    assert out.values == [[1, 2]]
    result = TestResult(sinks={"out": out}, log=log, pipeline=pipeline)
    [late] = result.topic("p.pair.late")
    assert orjson.loads(late.value)["id"] == 3
    assert dict(late.headers)["headwater.late"] == b"pair"


async def test_stream_join_state_survives_a_restart_on_the_embedded_log(tmp_path: Path) -> None:
    events = join_events(41, 300, disorder=40, stragglers=0)
    within = timedelta(milliseconds=50)
    expected, _ = brute_force([events], 50, 1 << 40, "inner")
    assert expected
    lefts_only = [e for e in events if e[0] == 0]
    hour = timedelta(hours=1)

    async def not_yet() -> AsyncIterator[dict[str, Any]]:
        await asyncio.Event().wait()  # cancelled when the run stops
        yield {}

    # first run: only the left side has records, and the right source has not ended (once
    # every source ends, the end of time expires every waiting record), so the lefts wait in
    # the join's state when the run is stopped
    log = EmbeddedLog(tmp_path)
    out = Collect()
    stop = asyncio.Event()

    def stop_when_the_lefts_are_in(report: WorkerReport) -> None:
        if report.steps.get("pair", [0])[0] >= len(lefts_only):
            stop.set()

    pipeline = two_streams(
        lefts_only, "inner", within, out, grace=hour, idle=hour, rights=Iterable(not_yet)
    )
    await asyncio.wait_for(
        run_in_process(
            compile_pipeline(pipeline), log, stop=stop, on_report=stop_when_the_lefts_are_in
        ),
        timeout=30,
    )
    assert stop.is_set()
    assert out.values == []
    await log.close()

    log = EmbeddedLog(tmp_path)  # second run: the right side; the lefts wait in restored state
    out = Collect()
    await run(two_streams(events, "inner", within, out, grace=hour, idle=hour), log, workers=2)
    await log.close()
    assert sorted(out.values, key=str) == sorted(expected, key=str)
