"""Serdes: round trips (property-based), per-record error reporting and the topic mapping."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pipelines.errors import InvalidRecord, PipelineDefinitionError
from pipelines.serde import Bytes, Json, Model, Serde, Str, compacted, serde_for

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)

json_values = st.recursive(
    st.none() | st.booleans() | INT64 | FINITE | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)

MALFORMED_JSON = [
    b'{"user": ',
    b"",
    b"nope",
    b"[1, 2",
    b"[1",
    b"2]",
    b"\xff",
    b'{"a" 1}',
    b"'single'",
    b"NaN",
    b"01",
]


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (``1 == 1.0`` is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# -- round trips ---------------------------------------------------------------------------------


@given(json_values)
def test_json_round_trips_any_json_value(value: Any) -> None:
    serde = Json()
    data = serde.serialize(value)
    assert isinstance(data, bytes)
    assert same(serde.deserialize(data), value)


@given(st.lists(json_values, max_size=10))
def test_json_deserialize_many_round_trips_a_batch(values: list[Any]) -> None:
    serde = Json()
    decoded, errors = serde.deserialize_many(serde.serialize_many(values))
    assert errors == {}
    assert len(decoded) == len(values)
    assert all(same(d, v) for d, v in zip(decoded, values, strict=True))


@given(st.text())
def test_str_round_trips_any_text(text: str) -> None:
    serde = Str()
    data = serde.serialize(text)
    assert data == text.encode("utf-8")
    assert serde.deserialize(data) == text


@given(st.lists(st.text(), max_size=10))
def test_str_deserialize_many_round_trips_a_batch(texts: list[str]) -> None:
    serde = Str()
    assert serde.deserialize_many(serde.serialize_many(texts)) == (texts, {})


@given(st.binary())
def test_bytes_is_the_identity(data: bytes) -> None:
    serde = Bytes()
    assert serde.serialize(data) == data
    assert serde.serialize(bytearray(data)) == data
    assert type(serde.serialize(bytearray(data))) is bytes
    assert serde.serialize(memoryview(data)) == data
    assert serde.deserialize(data) == data


@given(st.lists(st.none() | st.binary(), max_size=10))
def test_bytes_deserialize_many_is_the_identity(items: list[bytes | None]) -> None:
    assert Bytes().deserialize_many(items) == (items, {})


class ShopOrder(BaseModel):
    order_id: int
    customer: str
    amount: float
    tags: list[str] = []
    note: str | None = None


orders = st.builds(
    ShopOrder,
    order_id=INT64,
    customer=st.text(),
    amount=FINITE,
    tags=st.lists(st.text(), max_size=5),
    note=st.none() | st.text(),
)


@given(orders)
def test_model_round_trips_a_model_instance(order: ShopOrder) -> None:
    serde = Model(ShopOrder)
    decoded = serde.deserialize(serde.serialize(order))
    assert isinstance(decoded, ShopOrder)
    assert decoded == order


@given(orders)
def test_model_reads_what_json_wrote_from_a_plain_dict(order: ShopOrder) -> None:
    data = Model(ShopOrder).serialize(order.model_dump())
    assert Model(ShopOrder).deserialize(data) == order
    assert Model(ShopOrder).deserialize(Json().serialize(order)) == order  # Json dumps models too


# -- malformed records are reported by index ---------------------------------------------------


items = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), json_values),
        st.tuples(st.just("bad"), st.sampled_from(MALFORMED_JSON)),
        st.just(("null", None)),
    ),
    max_size=12,
)


@given(items)
def test_json_deserialize_many_reports_malformed_items_by_index(
    spec: list[tuple[str, Any]],
) -> None:
    serde = Json()
    data = [
        serde.serialize(item) if kind == "ok" else item for kind, item in spec
    ]  # "bad" items are raw bytes, "null" items are None
    decoded, errors = serde.deserialize_many(data)

    bad = {i for i, (kind, _) in enumerate(spec) if kind == "bad"}
    assert set(errors) == bad
    assert len(decoded) == len(spec)
    for index, (kind, item) in enumerate(spec):
        if kind == "ok":
            assert same(decoded[index], item), index
        else:
            assert decoded[index] is None
    for error in errors.values():
        assert isinstance(error, InvalidRecord)
        assert error.message.startswith("malformed JSON")


def test_json_does_not_merge_neighbouring_fragments_into_valid_values() -> None:
    decoded, errors = Json().deserialize_many([b"[1", b"2]", b"3"])
    assert sorted(errors) == [0, 1]
    assert decoded == [None, None, 3]


def test_str_deserialize_many_reports_invalid_utf8_by_index() -> None:
    decoded, errors = Str().deserialize_many([b"ok", b"\xff\xfe", None, "é".encode(), b"\xc3"])
    assert decoded == ["ok", None, None, "é", None]
    assert sorted(errors) == [1, 4]
    assert all("not UTF-8" in e.message for e in errors.values())


def test_model_deserialize_many_reports_invalid_items_by_index() -> None:
    good = b'{"order_id": 1, "customer": "ann", "amount": 2.5}'
    decoded, errors = Model(ShopOrder).deserialize_many(
        [good, b'{"order_id": ', b'{"order_id": "x", "customer": "bob", "amount": 1}', good]
    )
    expected = ShopOrder(order_id=1, customer="ann", amount=2.5)
    assert decoded == [expected, None, None, expected]
    assert sorted(errors) == [1, 2]
    assert "order_id" in errors[2].message


def test_model_validation_failure_names_the_field() -> None:
    serde = Model(ShopOrder)
    with pytest.raises(InvalidRecord) as caught:
        serde.deserialize(b'{"order_id": "seven", "customer": "ann", "amount": 1.0}')
    message = caught.value.message
    assert message.startswith("does not validate as ShopOrder:")
    assert "order_id:" in message
    assert "integer" in message
    assert isinstance(caught.value.__cause__, ValidationError)


def test_model_validation_failure_names_nested_and_missing_fields() -> None:
    with pytest.raises(InvalidRecord) as caught:
        Model(ShopOrder).deserialize(b'{"order_id": 1, "amount": 1.0, "tags": ["a", 2]}')
    message = caught.value.message
    assert "customer: Field required" in message
    assert "tags.1:" in message


def test_model_of_something_that_is_not_an_object_says_root() -> None:
    with pytest.raises(InvalidRecord, match="<root>"):
        Model(ShopOrder).deserialize(b"[1, 2]")


# -- serializing the wrong type -------------------------------------------------------------------


@pytest.mark.parametrize("value", [42, 4.2, b"bytes", None, ["a"]])
def test_str_serialize_of_a_non_str_raises_a_helpful_type_error(value: object) -> None:
    with pytest.raises(TypeError) as caught:
        Str().serialize(value)
    message = str(caught.value)
    assert type(value).__name__ in message
    assert repr(value) in message
    assert "return a str from the key function" in message
    assert "key serde" in message


def test_bytes_serialize_of_a_non_bytes_raises_type_error() -> None:
    with pytest.raises(TypeError, match="needs bytes, got str"):
        Bytes().serialize("text")


def test_json_serialize_of_an_unsupported_value_raises_type_error() -> None:
    with pytest.raises(TypeError):
        Json().serialize({1, 2})


# -- serde_for -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind"),
    [(bytes, Bytes), (str, Str), (dict, Json), (list, Json), (ShopOrder, Model)],
)
def test_serde_for_maps_types_to_serdes(spec: type[Any], kind: type[Serde]) -> None:
    serde = serde_for(spec, default=Bytes())
    assert type(serde) is kind


def test_serde_for_a_model_keeps_the_model_class() -> None:
    serde = serde_for(ShopOrder, default=Json())
    assert isinstance(serde, Model)
    assert serde.model is ShopOrder
    assert repr(serde) == "Model(ShopOrder)"


def test_serde_for_none_is_the_default_and_a_serde_is_itself() -> None:
    default = Str()
    given_serde = Json()
    assert serde_for(None, default=default) is default
    assert serde_for(given_serde, default=default) is given_serde


@pytest.mark.parametrize("spec", [int, float, object, "json"])
def test_serde_for_anything_else_is_a_definition_error(spec: Any) -> None:
    with pytest.raises(PipelineDefinitionError, match="no serde for"):
        serde_for(spec, default=Json())


def test_compacted_copies_hold_only_their_bytes() -> None:
    blobs: list[bytes | None] = [orjson.dumps({"n": n}) if n % 3 else None for n in range(3000)]
    tracemalloc.start()
    try:
        copies = compacted(blobs)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert copies == blobs
    assert all(c is None or c is not b for c, b in zip(copies, blobs, strict=True))
    assert held < 300_000  # the 2,000 results of dumps hold ~4 KiB each: ~8 MB
    assert compacted([]) == []
    assert compacted([None, None]) == [None, None]
    one = orjson.dumps({"n": 1})
    [copy] = compacted([None, one, None])[1:2]
    assert copy == one and copy is not one
