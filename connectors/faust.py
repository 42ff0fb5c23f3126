"""Serdes and topics to share a broker with Faust apps (faust-streaming): read what their agents
write, write what their agents read, and join their tables.

The formats here are Faust's defaults, written out by hand so that this module needs no Faust
installed (a pipeline that moves off Faust should not have to keep it):

- **Values** are JSON (Faust's ``json`` codec). A ``faust.Record`` is a JSON object of its
  fields plus a *blessed key*, ``"__faust": {"ns": "<namespace>"}``, naming the Record class
  (``<module>.<ClassName>`` unless the class sets ``namespace=``). Datetimes are ISO 8601
  strings (a UTC one ends in ``Z``, a naive one has no offset) and decimals are strings
  (``"12.50"``), which is also how pydantic writes them in JSON, and how it reads them back.
  :class:`FaustRecord` reads such an object into the user's pydantic model (the blessed key is
  dropped, at every depth), and writes the model with the blessed key on top, so a Faust agent
  reading the topic gets its Record. A Faust agent whose topic has a ``value_type`` builds that
  type whatever the namespace says; ``Record.loads``, an agent without a ``value_type`` and
  polymorphic fields look the namespace up, and fail on one they do not know: name the Faust
  Record's namespace (``FaustRecord(Order, namespace="shop.Order")``).
- **Keys** of topics are raw bytes by default (``key_serializer="raw"``, a ``str`` key written
  as UTF-8), and so are the keys of the repartition topic a ``group_by`` writes: that is
  Headwater's default key serde, :class:`~pipelines.serde.Str`. An app configured with
  ``key_serializer="json"`` writes JSON keys: :class:`FaustJson`.
- **Tables**. A Faust table's changelog is the topic ``<app id>-<table>-changelog``: each
  record sets a key to a value, a tombstone deletes it. Its keys are JSON whatever the app's key
  serializer (``"c1"``, quotes included), its values JSON (a Record with its blessed key). A
  windowed table's key is ``[key, [start, end]]``, the window's bounds in epoch seconds, floats,
  ``end`` being the next window's start minus 0.1. :func:`faust_table` declares the topic.

Two things differ from Headwater's own tables, and the changelog key serdes say so:

- *Partitioning.* Faust writes a table change to the partition of the event being processed,
  not to the partition of the changelog key's bytes, so the changelog is partitioned like the
  topic that feeds the table (a ``group_by`` topic, keyed by raw text), while its keys are
  JSON. :attr:`FaustTableKey.partitioning` is that of the source's key serde, so a stream
  re-keyed with ``key_by`` (text keys) is co-partitioned with the table, as it really is.
- *Rows.* Rows are kept by the key as :class:`FaustJson` writes it (a Faust without orjson
  escapes non-ASCII text, one with orjson does not), and the rows of a **windowed** table are
  folded by key: a stream record keyed ``"c1"`` joins the most recent window of ``c1`` (the
  greatest start) as a :class:`FaustWindowed` (value, start, end). An update of an older window
  leaves the row alone, and the expiry of a window (its tombstone) deletes the row only if that
  window is the row's. This is the window a Faust agent reads with ``table[key].now()`` when
  events come in order; to join each record with the window of its own event time instead,
  compare ``row.start`` with the record's time in ``merge``.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Generic, NamedTuple, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from pipelines.errors import InvalidRecord, PipelineDefinitionError
from pipelines.serde import Serde, Str, _describe
from pipelines.topic import Topic

__all__ = [
    "FaustJson",
    "FaustRecord",
    "FaustTableKey",
    "FaustWindowKey",
    "FaustWindowed",
    "FaustWindowedTableKey",
    "faust_changelog",
    "faust_table",
]

M = TypeVar("M", bound=BaseModel)

BLESSED_KEY = "__faust"
"""The key of the object in which Faust names a Record's class."""

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z
"""As Faust writes JSON: keys that are not strings allowed, UTC datetimes ending in ``Z``."""


def _faust_default(value: Any) -> Any:
    """What orjson cannot write itself, as Faust writes it: decimals as strings, pydantic
    models as their JSON fields, sets as lists."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not serialisable as Faust JSON: {value!r}")


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise InvalidRecord(f"malformed JSON: {error}") from error


def _without_blessed_keys(value: Any) -> Any:
    """``value`` without Faust's blessed key in any object, however deep (a Record's nested
    Records carry theirs)."""
    if isinstance(value, dict):
        return {k: _without_blessed_keys(v) for k, v in value.items() if k != BLESSED_KEY}
    if isinstance(value, list):
        return [_without_blessed_keys(v) for v in value]
    return value


class FaustJson(Serde):
    """Faust's ``json`` codec: table values and keys, keys of apps with ``key_serializer="json"``
    and values that are not Records. Writes compact JSON as Faust with orjson does (decimals as
    strings, UTC datetimes ending in ``Z``); reads any JSON."""

    def serialize(self, value: Any) -> bytes:
        return orjson.dumps(value, default=_faust_default, option=_OPTIONS)

    def deserialize(self, data: bytes) -> Any:
        return _loads(data)


class FaustRecord(Serde, Generic[M]):
    """A ``faust.Record`` as the pydantic model ``model``: read from what a Faust agent writes
    (the blessed key dropped), written as a Faust agent reads it (with the blessed key).

    ``namespace`` is the Faust Record's name, which Faust looks classes up by: by default the
    model's ``<module>.<qualified name>``, the name Faust gives a Record class of the same
    module and name. Name it as the Faust app does whenever the modules differ.
    """

    def __init__(self, model: type[M], *, namespace: str | None = None) -> None:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise PipelineDefinitionError(
                f"FaustRecord needs a pydantic model class, got {model!r}"
            )
        if namespace is None:
            namespace = f"{model.__module__}.{model.__qualname__}"
        if not isinstance(namespace, str) or not namespace:
            raise PipelineDefinitionError(
                f"FaustRecord({model.__name__}): namespace must be a non-empty str (the Faust "
                f"Record's name, e.g. 'shop.Order'), got {namespace!r}"
            )
        self.model = model
        self.namespace = namespace
        self._blessing = {"ns": namespace}

    def __repr__(self) -> str:
        return f"FaustRecord({self.model.__name__}, namespace={self.namespace!r})"

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, Mapping):
            try:
                value = self.model.model_validate(value)
            except ValidationError as error:
                problem = _describe(self.model, error)
                raise TypeError(f"cannot write a Faust record: {problem}") from error
        if not isinstance(value, BaseModel):
            raise TypeError(
                f"FaustRecord({self.model.__name__}) writes a {self.model.__name__} or a dict "
                f"of its fields, got {type(value).__name__} {value!r}"
            )
        fields = value.model_dump(mode="json")
        fields[BLESSED_KEY] = self._blessing
        return orjson.dumps(fields, option=_OPTIONS)

    def deserialize(self, data: bytes) -> M:
        fields = _loads(data)
        if not isinstance(fields, dict):
            raise InvalidRecord(
                f"a Faust record of {self.model.__name__} is a JSON object, got "
                f"{type(fields).__name__} {data[:80]!r}"
            )
        try:
            return self.model.model_validate(_without_blessed_keys(fields))
        except ValidationError as error:
            raise InvalidRecord(_describe(self.model, error)) from error


class FaustWindowKey(NamedTuple):
    """The key of a record of a Faust windowed table's changelog: the table key and the bounds
    of its window, in epoch seconds (``end`` is the next window's ``start`` minus 0.1)."""

    key: Any
    start: float
    end: float


class FaustWindowed(NamedTuple):
    """A row of a Faust windowed table, as ``join_table`` gives it to ``merge``: the value of
    the key's most recent window, and that window's bounds (epoch seconds, as in the key)."""

    value: Any
    start: float
    end: float


class FaustTableKey(Serde):
    """The keys of a Faust table's changelog: the table key as ``key`` writes it (JSON by
    default: :class:`FaustJson`; ``FaustRecord(Model)`` for Record keys), in a topic partitioned
    like its source, whose keys ``source`` writes (raw text by default, as a ``group_by`` writes
    them). Rows are kept by the key as ``key`` writes it (see the module docstring)."""

    def __init__(self, key: Serde | None = None, *, source: Serde | None = None) -> None:
        self.key = key or FaustJson()
        self.source = source or Str()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, source={self.source!r})"

    @property
    def partitioning(self) -> str:
        return self.source.partitioning

    def serialize(self, value: Any) -> bytes:
        return self.key.serialize(value)

    def deserialize(self, data: bytes) -> Any:
        return self.key.deserialize(data)

    def table_row(
        self, raw_key: bytes, key: Any, value: Any, rows: Mapping[bytes, Any]
    ) -> tuple[bytes, Any]:
        return self.key.serialize(key), value


class FaustWindowedTableKey(FaustTableKey):
    """The keys of a Faust *windowed* table's changelog, ``[key, [start, end]]``, read as
    :class:`FaustWindowKey`. The rows of a key's windows fold into one, its most recent window,
    looked up by the table key alone (see the module docstring). Writes a
    :class:`FaustWindowKey` as Faust does; any other value is a table key, written as ``key``
    writes it, which is how a stream key looks its row up."""

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, FaustWindowKey):
            window = [value.key, [value.start, value.end]]
            return orjson.dumps(window, default=_faust_default, option=_OPTIONS)
        return self.key.serialize(value)

    def deserialize(self, data: bytes) -> FaustWindowKey:
        decoded = _loads(data)
        match decoded:
            case [key, [int() | float() as start, int() | float() as end]]:
                inner = self.key.deserialize(orjson.dumps(key, option=_OPTIONS))
                return FaustWindowKey(inner, float(start), float(end))
        raise InvalidRecord(
            f"not the key of a Faust windowed table, [key, [window start, window end]]: "
            f"{data[:80]!r}"
        )

    def table_row(
        self, raw_key: bytes, key: Any, value: Any, rows: Mapping[bytes, Any]
    ) -> tuple[bytes, Any]:
        row = self.key.serialize(key.key)
        held: FaustWindowed | None = rows.get(row)
        if value is None:  # a window expired: the row goes if it was that window
            return row, None if held is None or held.start == key.start else held
        if held is not None and held.start > key.start:  # a late update of an older window
            return row, held
        return row, FaustWindowed(value, key.start, key.end)


def faust_changelog(app_id: str, table: str) -> str:
    """The name of the changelog topic of table ``table`` of the Faust app ``app_id``."""
    return f"{app_id}-{table}-changelog"


def faust_table(
    app_id: str,
    table: str,
    *,
    partitions: int,
    value: Serde | type[BaseModel] | None = None,
    key: Serde | None = None,
    source: Serde | None = None,
    windowed: bool = False,
) -> Topic:
    """The changelog of table ``table`` of the Faust app ``app_id``, as a topic to give
    ``join_table``: the latest value of each key (of each key's most recent window if
    ``windowed``; the table is ``app.Table(...).tumbling(...)`` or ``.hopping(...)``).

    ``partitions`` is the table's (Faust's ``topic_partitions`` unless the table sets its own).
    ``value`` reads the values: a pydantic model for a table of Records (a
    :class:`FaustRecord`), :class:`FaustJson` by default. ``key`` reads the table's keys
    (:class:`FaustJson` by default) and ``source`` is the key serde of the topic that feeds the
    table (raw text, :class:`~pipelines.serde.Str`, by default, as a ``group_by`` writes it):
    re-key the stream with ``key_by`` and that key serde to join it.
    """
    if isinstance(value, type) and issubclass(value, BaseModel):
        value = FaustRecord(value)
    if value is not None and not isinstance(value, Serde):
        raise PipelineDefinitionError(
            f"faust_table({app_id!r}, {table!r}): value must be a pydantic model class or a "
            f"Serde, got {value!r}"
        )
    keys = FaustWindowedTableKey if windowed else FaustTableKey
    return Topic(
        faust_changelog(app_id, table),
        partitions=partitions,
        value=value or FaustJson(),
        key=keys(key, source=source),
        compacted=True,
    )
