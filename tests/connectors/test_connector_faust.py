"""connectors/faust.py against faust-streaming itself, no broker: what a ``faust.Record`` writes
(``Record.dumps``) reads into the pydantic model, what ``FaustRecord`` writes is what Faust reads
back (``Record.loads``, and the path an agent with a ``value_type`` takes), keys as Faust's
codecs write them, windowed changelog keys, and a Faust table's changelog read as a table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import faust
import pytest
from faust.serializers import codecs
from faust.serializers.registry import Registry
from faust.utils.json import JSONEncoder
from pydantic import BaseModel

from connectors.faust import (
    FaustJson,
    FaustRecord,
    FaustTableKey,
    FaustWindowed,
    FaustWindowedTableKey,
    FaustWindowKey,
    faust_changelog,
    faust_table,
)
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic
from pipelines.errors import InvalidRecord, PipelineDefinitionError
from pipelines.log.base import RawBatch
from pipelines.log.memory import MemoryLog
from pipelines.serde import Json, Str
from pipelines.state.table import TableStore
from pipelines.steps import TableJoinStep

# -- the Faust side ----------------------------------------------------------------------------


class FaustItem(faust.Record):
    sku: str
    qty: int


class FaustOrder(faust.Record, coerce=True, namespace="unit.Order"):
    id: str
    customer: str
    amount: Decimal
    at: datetime
    items: list[FaustItem]
    note: str | None = None


# -- the Headwater side ------------------------------------------------------------------------


class Item(BaseModel):
    sku: str
    qty: int


class Order(BaseModel):
    id: str
    customer: str
    amount: Decimal
    at: datetime
    items: list[Item]
    note: str | None = None


class StrictItem(Item, extra="forbid"):
    pass


class Strict(Order, extra="forbid"):
    items: list[StrictItem]


ORDERS = [
    {
        "id": "o-1",
        "customer": "Zoë",
        "amount": Decimal("12.50"),
        "at": datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}],
        "note": "gift",
    },
    {
        "id": "o-2",
        "customer": "Ana",
        "amount": Decimal("0.10"),
        "at": datetime(2024, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=2))),
        "items": [],
    },
    {
        "id": "o-3",
        "customer": "李",
        "amount": Decimal("1E+3"),
        "at": datetime(2024, 1, 2, 6, 30),  # noqa: DTZ001 - naive: Faust writes no offset
        "items": [{"sku": "c", "qty": 7}],
    },
]


def faust_order(fields: dict[str, object]) -> FaustOrder:
    items = [FaustItem(**item) for item in fields["items"]]  # type: ignore[attr-defined]
    return FaustOrder(**{**fields, "items": items})


def faust_fields(order: FaustOrder) -> dict[str, object]:
    """A Faust order as plain fields, to compare with the input."""
    fields = {name: getattr(order, name) for name in FaustOrder._options.fields}
    fields["items"] = [{"sku": i.sku, "qty": i.qty} for i in order.items]
    if fields["note"] is None:
        del fields["note"]
    return fields


def plain(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v is not None}


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", ORDERS, ids=lambda f: str(f["id"]))
def test_what_a_faust_record_writes_reads_as_the_model(fields: dict[str, object]) -> None:
    written = faust_order(fields).dumps(serializer="json")
    assert b'"__faust":{"ns":"unit.Order"}' in written  # what we strip is really there
    assert written.count(b'"__faust"') == 1 + len(fields["items"])  # type: ignore[arg-type]
    order = FaustRecord(Order, namespace="unit.Order").deserialize(written)
    assert order == Order.model_validate(fields)
    assert plain(order.model_dump()) == plain(fields)
    assert isinstance(order.amount, Decimal) and order.at == fields["at"]


def test_nested_blessed_keys_are_stripped_for_a_model_that_forbids_extra_fields() -> None:
    written = faust_order(ORDERS[0]).dumps(serializer="json")
    strict = FaustRecord(Strict).deserialize(written)
    assert strict == Strict.model_validate(ORDERS[0])


@pytest.mark.parametrize("fields", ORDERS, ids=lambda f: str(f["id"]))
def test_what_faust_record_writes_reads_back_in_faust(fields: dict[str, object]) -> None:
    serde = FaustRecord(Order, namespace="unit.Order")
    written = serde.serialize(Order.model_validate(fields))
    assert written == serde.serialize(fields)  # a dict of the fields writes the same
    assert json_object(written)["__faust"] == {"ns": "unit.Order"}
    # Record.loads looks the namespace up, as an agent without a value_type does
    loaded = FaustOrder.loads(written, serializer="json")
    assert type(loaded) is FaustOrder
    assert faust_fields(loaded) == plain(fields)
    assert isinstance(loaded.amount, Decimal) and isinstance(loaded.at, datetime)
    assert all(isinstance(item, FaustItem) for item in loaded.items)
    # an agent with value_type=FaustOrder
    agent = Registry().loads_value(FaustOrder, written)
    assert faust_fields(agent) == plain(fields)
    # and Faust writes it again byte for byte as we did
    assert loaded.dumps(serializer="json") == faust_order(fields).dumps(serializer="json")


def test_an_unknown_namespace_fails_in_faust_so_it_must_be_named() -> None:
    unnamed = FaustRecord(Order)  # defaults to this module's name for Order
    assert unnamed.namespace == f"{__name__}.Order"
    assert FaustItem._options.namespace == f"{__name__}.FaustItem"  # the same convention
    written = unnamed.serialize(Order.model_validate(ORDERS[1]))
    with pytest.raises(KeyError, match=f"{__name__}.Order"):
        FaustOrder.loads(written, serializer="json")
    assert faust_fields(Registry().loads_value(FaustOrder, written)) == plain(ORDERS[1])


def test_records_that_are_not_orders_are_invalid_and_say_why() -> None:
    serde = FaustRecord(Order, namespace="unit.Order")
    with pytest.raises(InvalidRecord, match="malformed JSON"):
        serde.deserialize(b'{"id": "o-1"')
    with pytest.raises(InvalidRecord, match="is a JSON object, got list"):
        serde.deserialize(b"[1, 2]")
    with pytest.raises(InvalidRecord, match="does not validate as Order: amount"):
        serde.deserialize(b'{"id":"o","customer":"c","amount":"much","at":"2024-01-01","items":[]}')
    with pytest.raises(TypeError, match=r"cannot write a Faust record: .*customer"):
        serde.serialize({"id": "o"})
    with pytest.raises(TypeError, match="writes a Order or a dict"):
        serde.serialize(42)
    with pytest.raises(PipelineDefinitionError, match="namespace must be a non-empty str"):
        FaustRecord(Order, namespace="")
    with pytest.raises(PipelineDefinitionError, match="needs a pydantic model class"):
        FaustRecord(dict)  # type: ignore[type-var]


# -- keys --------------------------------------------------------------------------------------

KEYS = ["c1", "Zoë", 42, 1.5, ["a", 1], {"k": "v"}]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_json_keys_are_written_as_faust_writes_them_and_read_back(key: object) -> None:
    faust_bytes = codecs.dumps("json", key)
    assert FaustJson().serialize(key) == faust_bytes
    assert FaustJson().deserialize(faust_bytes) == key
    assert codecs.loads("json", FaustJson().serialize(key)) == key


def test_raw_keys_of_faust_are_headwaters_text_keys() -> None:
    assert codecs.dumps("raw", "Zoë") == Str().serialize("Zoë")
    assert Registry(key_serializer="raw").loads_key(str, Str().serialize("Zoë")) == "Zoë"


def test_faust_json_writes_decimals_and_datetimes_as_faust_does() -> None:
    value = {"amount": Decimal("12.50"), "at": datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC)}
    assert FaustJson().serialize(value) == codecs.dumps("json", value)
    assert FaustJson().serialize(value) == b'{"amount":"12.50","at":"2024-01-02T03:04:05.000006Z"}'


def test_windowed_keys_read_and_write_as_faust_writes_them() -> None:
    window = (1796533020.0, 1796533079.9)
    faust_bytes = codecs.dumps("json", ("c1", window))  # how a windowed table keys its changelog
    assert faust_bytes == b'["c1",[1796533020.0,1796533079.9]]'
    serde = FaustWindowedTableKey()
    assert serde.deserialize(faust_bytes) == FaustWindowKey("c1", *window)
    assert serde.serialize(FaustWindowKey("c1", *window)) == faust_bytes
    assert serde.serialize("c1") == b'"c1"'  # a stream key: looks up the row of "c1"
    with pytest.raises(InvalidRecord, match="not the key of a Faust windowed table"):
        serde.deserialize(b'"c1"')
    with pytest.raises(InvalidRecord, match="not the key of a Faust windowed table"):
        serde.deserialize(b'["c1", 12.0]')


# -- tables ------------------------------------------------------------------------------------


async def table_of(topic: Topic, records: list[tuple[bytes, bytes | None]]) -> TableStore:
    """The store of partition 0 of ``topic`` holding ``records``, bootstrapped as a join does."""
    log = MemoryLog()
    await log.create_topics([topic.spec])
    producer = log.producer()
    keys, values = [k for k, _ in records], [v for _, v in records]
    await producer.send(topic.name, 0, RawBatch(keys, values, [0] * len(records)))
    await producer.flush()
    store = TableStore(topic, 0)
    assert await store.bootstrap(log) == len(records)
    return store


def stdlib_json(value: object) -> bytes:
    """JSON as a Faust without orjson writes it (the standard library, ASCII only)."""
    return json.dumps(value, cls=JSONEncoder, separators=(",", ":")).encode()


async def test_a_faust_table_changelog_joins_by_the_key_whichever_json_wrote_it() -> None:
    topic = faust_table("shop", "totals", partitions=1)
    assert topic.name == faust_changelog("shop", "totals") == "shop-totals-changelog"
    assert topic.compacted
    store = await table_of(
        topic,
        [
            (codecs.dumps("json", "Zoë"), b"1"),
            (stdlib_json("Zoë"), b"2"),  # b'"Zo\\u00eb"': the same key, another writer
            (stdlib_json("李"), b"5"),
            (codecs.dumps("json", "gone"), b"3"),
            (codecs.dumps("json", "gone"), None),
        ],
    )
    assert stdlib_json("Zoë") != codecs.dumps("json", "Zoë")
    assert {k: store.get(k) for k in ("Zoë", "李", "gone", "nobody")} == {
        "Zoë": 2,
        "李": 5,
        "gone": None,
        "nobody": None,
    }


async def test_a_table_of_records_reads_its_values_as_the_model() -> None:
    topic = faust_table("shop", "last-order", partitions=1, value=Order)
    written = faust_order(ORDERS[0]).dumps(serializer="json")
    store = await table_of(topic, [(codecs.dumps("json", "Zoë"), written)])
    assert store.get("Zoë") == Order.model_validate(ORDERS[0])


def window_of(ts: float, size: float) -> tuple[float, float]:
    """The tumbling window of ``ts`` as a Faust windowed table bounds it."""
    start = float(int(ts // size * size))
    return start, start + size - 0.1


async def test_a_windowed_table_joins_the_most_recent_window_of_each_key() -> None:
    topic = faust_table("shop", "per-minute", partitions=1, windowed=True)
    w1, w2, w3 = window_of(60.0, 60), window_of(130.0, 60), window_of(200.0, 60)

    def key(k: str, window: tuple[float, float]) -> bytes:
        return codecs.dumps("json", (k, window))

    store = await table_of(
        topic,
        [
            (key("a", w1), b"1"),
            (key("a", w2), b"1"),
            (key("a", w1), b"2"),  # a late update of an older window: the row keeps w2
            (key("a", w1), None),  # the older window expires: the row keeps w2
            (key("b", w1), b"4"),
            (key("b", w2), b"1"),
            (key("b", w2), None),  # the row's own window expires: the row goes
            (key("c", w3), b"7"),
            (key("c", w2), b"9"),  # an older window, first seen after a newer one
        ],
    )
    assert store.get("a") == FaustWindowed(1, *w2)
    assert store.get("b") is None
    assert store.get("c") == FaustWindowed(7, *w3)
    assert len(store) == 2


def test_a_faust_table_is_co_partitioned_with_a_stream_keyed_by_text() -> None:
    counts = faust_table("shop", "counts", partitions=4)
    assert counts.key_serde.partitioning == Str().partitioning
    orders = Pipeline("p").source(LogTopic(Topic("orders", partitions=4, value=Order)))
    by_customer = orders.key_by("by-customer", lambda order: order.customer)
    joined = by_customer.join_table("with-count", counts, lambda order, count: (order, count))
    join = joined.step("with-count")
    assert isinstance(join, TableJoinStep) and join.table is counts
    by_json = orders.key_by("by-json", lambda order: order.customer, key=Json())
    with pytest.raises(PipelineDefinitionError, match="keyed alike"):
        by_json.join_table("with-count", counts, lambda order, count: (order, count))
    json_source = faust_table("shop", "counts", partitions=4, source=Json())
    by_json.join_table("with-count", json_source, lambda order, count: (order, count))


def test_faust_table_refuses_what_is_not_a_serde() -> None:
    with pytest.raises(PipelineDefinitionError, match="value must be a pydantic model class"):
        faust_table("shop", "counts", partitions=1, value=int)  # type: ignore[arg-type]
    assert isinstance(faust_table("shop", "c", partitions=1).key_serde, FaustTableKey)


def json_object(data: bytes) -> dict[str, object]:
    loaded = json.loads(data)
    assert isinstance(loaded, dict)
    return loaded
