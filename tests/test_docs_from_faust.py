"""docs/from-faust.md runs. Its ``py`` blocks are the Faust app: they are declared with Faust
installed (a ``faust.App`` connects to nothing until a worker starts it), which gives the test
the app's real ``faust.Record`` class. Its ``python`` blocks, put together in one module, are
the Headwater side: the module is imported (every block runs), and its pipelines run in
memory on a log holding what the Faust app would have written: orders written by the Faust
Record class, and the changelogs of its table and windowed table, keyed and partitioned as
Faust keys and partitions them. What the pipelines write is compared with a reference
computed from those orders and table changes; large orders are read back by the Faust class.
``per_minute`` is declared and compiled, not run: its windows close on the wall clock of an
idle input, which a test should not wait for."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import orjson
import pytest
from faust.serializers import codecs
from support.docs import DOCS, code_blocks

from pipelines.log.base import RawBatch, TopicPartition
from pipelines.log.memory import MemoryLog
from pipelines.partitioner import partition_for
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watermarks import split_markers
from pipelines.topic import Topic

DOC = DOCS / "from-faust.md"
PARTITIONS = 3
MINUTE = 60.0


@pytest.fixture(scope="module")
def faust_app() -> dict[str, Any]:
    """The namespace of the page's Faust app, declared."""
    namespace: dict[str, Any] = {"__name__": "faust_shop"}
    exec(compile("\n\n".join(code_blocks(DOC, "py")), f"{DOC.name} (py)", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def shop_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The page's Headwater blocks as one imported module."""
    path = tmp_path_factory.mktemp("from-faust") / "from_faust_shop.py"
    path.write_text("\n\n".join(code_blocks(DOC, "python")))
    spec = importlib.util.spec_from_file_location("from_faust_shop", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def make_shop_orders() -> list[dict[str, Any]]:
    rng = random.Random(5)
    customers = ["ana", "bob", "Zoë", "李", "eve"]
    return [
        {"id": f"o-{i}", "customer": rng.choice(customers), "amount": rng.randint(1, 20_000) / 100}
        for i in range(300)
    ]


def window(ts: float) -> tuple[float, float]:
    start = ts // MINUTE * MINUTE
    return start, start + MINUTE - 0.1


def minute_changes(shop_orders: list[dict[str, Any]]) -> list[tuple[str, tuple[float, float], Any]]:
    """What a windowed Faust table of orders per customer per minute writes to its changelog:
    counts in two minutes per customer, the older one updated last (a late order), and a third,
    older minute expiring (a tombstone)."""
    changes: list[tuple[str, tuple[float, float], Any]] = []
    for customer in sorted({o["customer"] for o in shop_orders}):
        n = sum(o["customer"] == customer for o in shop_orders)
        changes += [
            (customer, window(1000.0), 1),
            (customer, window(1100.0), n),
            (customer, window(1000.0), 2),
            (customer, window(900.0), None),
        ]
    return changes


async def put(log: MemoryLog, topic: Topic, records: list[tuple[bytes, bytes | None, int]]) -> None:
    """Append (key, value, partition) records to ``topic``, in order."""
    await log.create_topics([topic.spec])
    producer = log.producer()
    by_partition: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for key, value, partition in records:
        by_partition[partition].append((key, value))
    for partition, pairs in by_partition.items():
        keys: list[bytes | None] = [k for k, _ in pairs]
        values = [v for _, v in pairs]
        await producer.send(topic.name, partition, RawBatch(keys, values, [0] * len(pairs)))
    await producer.flush()


async def contents(log: MemoryLog, name: str) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every data record of topic ``name``, partition by partition."""
    found: list[tuple[bytes | None, bytes | None]] = []
    for partition in range(log.spec(name).partitions):
        tp = TopicPartition(name, partition)
        end = (await log.end_offsets([tp]))[tp]
        data = split_markers(await log.read(tp, 0, end))[0].records
        found += list(zip(data.keys, data.values, strict=True))
    return found


Written = dict[str, list[tuple[bytes | None, bytes | None]]]


async def run_the_pages_pipelines(
    faust_app: dict[str, Any], shop_module: ModuleType, shop_orders: list[dict[str, Any]]
) -> Written:
    """Put on a memory log what the Faust app would have written, run the page's pipelines on
    it, and give what they wrote."""
    log = MemoryLog()
    faust_order = faust_app["Order"]
    await put(
        log,
        shop_module.orders,
        [
            (o["id"].encode(), faust_order(**o).dumps(serializer="json"), p(o["id"]))
            for o in shop_orders
        ],
    )
    # a table change goes to the partition of the group_by record: its customer's raw text
    await put(
        log,
        shop_module.customer_totals,
        [
            (codecs.dumps("json", c), codecs.dumps("json", t), p(c))
            for c, t in totals_of(shop_orders).items()
        ],
    )
    await put(
        log,
        shop_module.minutes,
        [
            (codecs.dumps("json", (c, w)), None if n is None else codecs.dumps("json", n), p(c))
            for c, w, n in minute_changes(shop_orders)
        ],
    )
    for pipeline in (shop_module.large_orders, shop_module.totals, shop_module.enriched):
        await run_in_process(compile_pipeline(pipeline), log)
    outputs = ("large-orders", "customer-totals", "enriched-orders")
    return {name: await contents(log, name) for name in outputs}


@pytest.fixture(scope="module")
def shop_orders() -> list[dict[str, Any]]:
    return make_shop_orders()


@pytest.fixture(scope="module")
def written(
    faust_app: dict[str, Any], shop_module: ModuleType, shop_orders: list[dict[str, Any]]
) -> Written:
    return asyncio.run(run_the_pages_pipelines(faust_app, shop_module, shop_orders))


def totals_of(shop_orders: list[dict[str, Any]]) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for o in shop_orders:
        totals[o["customer"]] += o["amount"]
    return totals


def p(key: str) -> int:
    return partition_for(key.encode(), PARTITIONS)


def test_the_pages_faust_app_is_a_faust_app(faust_app: dict[str, Any]) -> None:
    assert faust_app["Order"]._options.namespace == "shop.Order"
    assert set(faust_app["app"].agents) >= {"faust_shop.flag_large", "faust_shop.keep_totals"}


def test_large_orders_are_faust_records_the_faust_app_reads(
    written: Written, faust_app: dict[str, Any], shop_orders: list[dict[str, Any]]
) -> None:
    large = written["large-orders"]
    assert all(value and b'"__faust":{"ns":"shop.Order"}' in value for _, value in large)
    read = [faust_app["Order"].loads(value, serializer="json") for _, value in large]
    assert sorted((o.id, o.customer, o.amount) for o in read) == sorted(
        (o["id"], o["customer"], o["amount"]) for o in shop_orders if o["amount"] > 100
    )


def test_totals_end_at_each_customers_sum(
    written: Written, shop_orders: list[dict[str, Any]]
) -> None:
    latest = {key: orjson.loads(value) for key, value in written["customer-totals"] if value}
    expected = totals_of(shop_orders)
    assert latest.keys() == {c.encode() for c in expected}
    assert all(abs(latest[c.encode()] - t) < 1e-6 for c, t in expected.items())


def test_enriched_orders_join_the_faust_tables(
    written: Written, shop_module: ModuleType, shop_orders: list[dict[str, Any]]
) -> None:
    totals = totals_of(shop_orders)
    counts = Counter(o["customer"] for o in shop_orders)
    found = sorted(
        (orjson.loads(value) for _, value in written["enriched-orders"] if value),
        key=lambda row: row["id"],
    )
    expected = sorted(
        (
            {
                **o,
                "customer_total": totals[o["customer"]],
                "orders_this_minute": counts[o["customer"]],  # the latest minute's count
                "minute_start": window(1100.0)[0],
            }
            for o in shop_orders
        ),
        key=lambda row: row["id"],
    )
    assert found == expected
    compile_pipeline(shop_module.per_minute)  # declared as well
