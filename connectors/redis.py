"""Redis Streams: a source that reads a stream through a consumer group, acknowledging each
entry once it is on the log, and a sink that appends entries in one transaction per flush.
Both need redis-py (``pip install 'headwater[redis]'``).

**RedisStreamSource** reads with ``XREADGROUP`` as consumer ``consumer`` of group ``group``
(created at the start of the stream, with the stream, when it is missing). An entry stays in
the group's pending entries list until the runtime asks for the batch after the one that held
it, which it does only once that batch is durable on the log: then the source acknowledges it
(``XACK``). On start it first reads its consumer's pending entries again (``XREADGROUP`` from
id ``0``), so entries delivered to a run that crashed before their batch reached the log are
emitted again: at-least-once, like the other sources (a crash between the log and the ``XACK``
re-emits that batch). The group, not the stored position, says where reading resumes; the
position (the id of the batch's last entry) is for information. ``headwater reset`` does not
move the group: to read the stream again from its start, ``XGROUP SETID <stream> <group> 0``
(or ``XGROUP DESTROY``) before the next run.

**RedisStreamSink** appends each value as one entry (``XADD <stream> * ...``). ``flush`` sends
everything buffered as one ``MULTI``/``EXEC`` transaction, retried as a whole when the
connection drops: a flush that fails adds nothing. Delivery is at-least-once: a replay after a
crash (whose input offsets were not committed yet) appends the same values again, and so does
a flush whose ``EXEC`` went through but whose answer was lost. Consumers should be idempotent;
``add_id=True`` gives every entry a ``headwater-id`` field (``<topic>:<partition>:<offset>`` of
the input record) that is the same when the record is written again, to drop repeats by.

Connections: ``url`` is a ``redis://[:password@]host:port/db`` URL (``rediss://`` for TLS), by
default the ``HEADWATER_REDIS_URL`` environment variable. A refused or dropped connection, a
timeout or a server loading its data is retried with doubling backoff and jitter for up to
``retry_for`` seconds, then is a :class:`~pipelines.errors.ConnectorError`; a wrong password, a
key that holds something else than a stream, are errors at once. Messages never show the
password.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

from connectors._backoff import Backoff
from connectors._json import json_default
from connectors._urls import redacted
from connectors.base import (
    Position,
    Sink,
    SinkContext,
    SinkWriter,
    Source,
    SourceBatch,
    UnwritableValue,
)
from pipelines.batch import Batch
from pipelines.errors import ConnectorError

__all__ = ["ID_FIELD", "URL_VARIABLE", "RedisStreamSink", "RedisStreamSource"]

URL_VARIABLE = "HEADWATER_REDIS_URL"
"""Where the connectors find their URL when ``url=`` is not given."""

ID_FIELD = "headwater-id"
"""The field ``RedisStreamSink(add_id=True)`` gives each entry: its input record's
``<topic>:<partition>:<offset>`` (``#n`` after it for the n-th further record of one offset)."""

T = TypeVar("T")

_TRANSIENT = (
    redis_errors.ConnectionError,  # refused, reset, closed; BusyLoadingError (LOADING) too
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica, during a failover
    asyncio.TimeoutError,
    OSError,
)
# subclasses of ConnectionError that retrying cannot help
_REFUSED = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)

_CONNECT_TIMEOUT = 10.0
_REPLY_TIMEOUT = 30.0
"""Seconds a command may take, connecting included (a blocking read: its block time plus
this), before it is tried again on a new connection."""


@dataclass(slots=True)
class _Connector:
    """What a source or a writer connects to, and how long it retries."""

    url: str | None
    name: str  # "RedisStreamSource 'orders'", for messages
    retry_for: float
    reply_timeout: float = _REPLY_TIMEOUT
    shown_url: str | None = None  # the URL connected to, without its password
    url_password: str | None = None  # the password in it

    @property
    def what(self) -> str:
        """The connector and its server, for messages."""
        return self.name if self.shown_url is None else f"{self.name} at {self.shown_url}"

    def resolved_url(self) -> str:
        """``url``, else the environment's."""
        url = self.url or os.environ.get(URL_VARIABLE)
        if not url:
            raise ConnectorError(
                f"{self.name} has no Redis server to connect to: pass url= or set "
                f"{URL_VARIABLE}=redis://:password@host:port/0"
            )
        return url

    def client(self) -> aioredis.Redis:
        """A client for the URL (it connects on its first command). It neither retries nor
        times out by itself: :meth:`call` does both, for everything.

        (With a ``socket_timeout``, redis-py sends each command under ``asyncio.wait_for``,
        which on Python 3.11 loses a cancellation that comes as the send completes: a source
        task cancelled at shutdown then reads on forever. ``asyncio.timeout`` does not.)"""
        url = self.resolved_url()
        self.shown_url = redacted(url)
        self.url_password = urlsplit(url).password
        try:
            return aioredis.Redis.from_url(
                url,
                socket_connect_timeout=_CONNECT_TIMEOUT,
                socket_timeout=None,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
        except ValueError as error:  # another scheme, a port that is not a number...
            raise ConnectorError(
                f"{self.what}: not a Redis URL ({error}); give redis://:password@host:port/db"
            ) from None

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``await attempt()``, given ``reply_timeout`` seconds, again with doubling backoff
        and jitter while it fails on a transient error (a timeout too), for up to
        ``retry_for`` seconds; then :class:`ConnectorError`. A refused password is an error
        at once."""
        backoff = Backoff(self.retry_for)
        while True:
            try:
                async with asyncio.timeout(self.reply_timeout):
                    result = await attempt()
            except _REFUSED as error:
                if self.url_password is None:
                    raise ConnectorError(
                        f"{self.what}: the server needs a password; give it in the URL, as "
                        "redis://:password@host:port/db"
                    ) from None
                raise ConnectorError(
                    f"{self.what}: the server refused the password in the URL ({error}); "
                    "give the right one, as redis://:password@host:port/db"
                ) from None
            except _TRANSIENT as error:
                if not await backoff.wait():
                    raise ConnectorError(
                        f"{self.what}: {type(error).__name__}: {error or 'no answer'} (retried "
                        f"for {self.retry_for:g} s); is the server up and the URL right?"
                    ) from error
            except redis_errors.ResponseError as error:
                raise ConnectorError(f"{self.what}: the server answered: {error}") from error
            else:
                _check_cancelled()
                return result


def _check_cancelled() -> None:
    """Raise the cancellation of this task if something below swallowed it (a pending
    request nobody took back: ``asyncio.wait_for`` on Python 3.11 can drop one)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode(errors="replace")


def _entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of the one stream in an ``XREADGROUP`` answer, each an id and its fields
    (none for an entry deleted since it was delivered). redis-py gives ``[[stream, entries]]``
    (RESP2) or ``{stream: [entries]}`` (RESP3, with ``?protocol=3`` in the URL)."""
    if not response:
        return []
    if isinstance(response, dict):
        (nested,) = response.values()
        entries = nested[0] if nested else []
    else:
        ((_, entries),) = response
    return [
        (_as_bytes(entry_id), {_as_bytes(n): _as_bytes(v) for n, v in (fields or {}).items()})
        for entry_id, fields in entries
    ]


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _millis(entry_id: bytes) -> int:
    """The time part of an entry id (``<ms>-<seq>``)."""
    return int(entry_id.partition(b"-")[0])


# -- the source --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cursor:
    """Where the next ``XREADGROUP`` reads: this consumer's pending entries after ``after``, or
    (``pending`` false) entries never delivered to the group (``>``)."""

    pending: bool = True
    after: bytes = b"0"

    def restart(self) -> None:
        """Read the pending entries from the first again: an answer lost with a connection
        leaves its entries delivered to this consumer, and only a pending read gets them."""
        self.pending, self.after = True, b"0"


class RedisStreamSource(Source):
    """The entries of the Redis stream ``stream``, read as consumer ``consumer`` of the
    consumer group ``group``, in batches of up to ``batch_size``.

    **Values.** An entry whose only field is ``value_field`` (``value``: what
    :class:`RedisStreamSink` writes) holds JSON: its value is that JSON, decoded. The
    ``headwater-id`` field and ``key_field`` do not count. If that field is not valid JSON, its
    bytes go to the topic as they are, and the workers route the record by the error policy
    (to the dead-letter topic by default) as a malformed one. Every other entry becomes a dict
    of its fields, names and values as text (invalid UTF-8 as U+FFFD).
    ``value_field=None`` makes every entry a dict.

    **Keys and event times.** ``key_field`` names the field whose text is the record's key
    (``None`` for an entry without it); the field stays in a dict value too. An entry's event
    time is the millisecond part of its id: when it was added, unless its producer gave ids.

    **Reading.** ``follow=True`` waits for new entries, ``block_ms`` at a time, forever;
    ``follow=False`` ends once the group has no entry left that it did not deliver. Each entry
    is acknowledged once the batch that held it is on the log, and entries of a crashed run
    are read again first (see the module docstring): at-least-once. ``group`` is required: two
    pipelines that read a stream through the same group share its entries out between them,
    each getting some; give each pipeline its own group to get all of them. The group is
    created at the start of the stream when missing.
    """

    name = "redis"

    def __init__(
        self,
        stream: str,
        *,
        group: str,
        consumer: str = "headwater",
        url: str | None = None,
        batch_size: int = 1000,
        block_ms: int = 1000,
        key_field: str | None = None,
        value_field: str | None = "value",
        follow: bool = True,
        retry_for: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if block_ms < 1:
            raise ValueError(f"block_ms must be at least 1 (ms), got {block_ms}")
        if not group or not consumer:
            raise ValueError("group and consumer must be names, not empty")
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.url = url
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.key_field = key_field
        self.value_field = value_field
        self.follow = follow
        self.retry_for = retry_for

    def __repr__(self) -> str:
        return f"RedisStreamSource({self.stream!r}, group={self.group!r})"

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Batches of entries: first this consumer's pending ones, then new ones; each
        acknowledged when the next batch is asked for. ``position`` is not used: the group
        knows where to go on."""
        connector = _Connector(
            self.url,
            f"RedisStreamSource {self.stream!r}",
            self.retry_for,
            reply_timeout=self.block_ms / 1000 + _REPLY_TIMEOUT,
        )
        client = connector.client()
        try:
            await self._create_group(connector, client)
            cursor = _Cursor()
            while True:
                entries = await self._next(connector, client, cursor)
                if not entries:
                    if cursor.pending:
                        cursor.pending = False  # every pending entry was emitted again
                        continue
                    if not self.follow:
                        return
                    continue
                if cursor.pending:
                    cursor.after = entries[-1][0]
                batch = self._batch(entries)
                if batch is not None:
                    yield batch
                # Resumed: the batch is durable on the log (closing the generator instead,
                # after a failure, leaves its entries pending for the next run).
                await self._ack(connector, client, [entry_id for entry_id, _ in entries])
        finally:
            await client.aclose()

    async def _ack(self, connector: _Connector, client: aioredis.Redis, ids: list[bytes]) -> None:
        """Acknowledge entries (again, after a failure: an ``XACK`` twice is harmless)."""
        await connector.call(lambda: client.xack(self.stream, self.group, *ids))

    async def _create_group(self, connector: _Connector, client: aioredis.Redis) -> None:
        async def create() -> None:
            try:
                await client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except redis_errors.ResponseError as error:
                if str(error).startswith("BUSYGROUP"):
                    return  # it exists: go on where it is
                if str(error).startswith("WRONGTYPE"):
                    kind = _text(await client.type(self.stream))
                    raise ConnectorError(
                        f"{connector.what}: key {self.stream!r} holds a {kind}, not a stream; "
                        "name a stream, or delete the key"
                    ) from None
                raise

        await connector.call(create)

    async def _next(
        self, connector: _Connector, client: aioredis.Redis, cursor: _Cursor
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The next entries to emit, from where ``cursor`` says."""

        async def attempt() -> list[tuple[bytes, dict[bytes, bytes]]]:
            try:
                if cursor.pending:
                    response = await client.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: cursor.after},
                        count=self.batch_size,
                    )
                else:
                    response = await client.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: ">"},
                        count=self.batch_size,
                        block=self.block_ms if self.follow else None,
                    )
            except _TRANSIENT:
                cursor.restart()
                raise
            except redis_errors.ResponseError as error:
                if str(error).startswith("NOGROUP"):
                    raise ConnectorError(
                        f"{connector.what}: the stream or its consumer group {self.group!r} "
                        "was deleted while the source read it; run the pipeline again to "
                        "create them again (from the start of the stream)"
                    ) from None
                raise
            return _entries(response)

        return await connector.call(attempt)

    def _batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> SourceBatch | None:
        """The entries as a batch (those deleted since they were delivered are left out), or
        None when none is left."""
        key_name = None if self.key_field is None else self.key_field.encode()
        values: list[Any] = []
        keys: list[str | None] = []
        stamps: list[int] = []
        last = b""
        for entry_id, fields in entries:
            if not fields:
                continue
            values.append(self._value(fields, key_name))
            if key_name is not None:
                key = fields.get(key_name)
                keys.append(None if key is None else key.decode(errors="replace"))
            stamps.append(_millis(entry_id))
            last = entry_id
        if not values:
            return None
        return SourceBatch(
            values,
            position=last.decode(),
            keys=None if key_name is None else keys,
            timestamps=stamps,
        )

    def _value(self, fields: dict[bytes, bytes], key_name: bytes | None) -> Any:
        if self.value_field is not None:
            name = self.value_field.encode()
            data = fields.get(name)
            if data is not None:
                others = {n for n in fields if n not in (name, key_name, _ID_NAME)}
                if not others:
                    try:
                        return orjson.loads(data)
                    except orjson.JSONDecodeError:
                        return data  # as it is: the workers dead-letter it as malformed
        return {n.decode(errors="replace"): v.decode(errors="replace") for n, v in fields.items()}


_ID_NAME = ID_FIELD.encode()


# -- the sink ----------------------------------------------------------------------------------

_Entry = dict[FieldT, EncodableT]


class RedisStreamSink(Sink):
    """A sink that appends each value as one entry to the Redis stream ``stream``.

    With ``fields=False`` (the default) an entry has one field, ``field``, holding the value's
    JSON (orjson; pydantic models with their own serializer): what :class:`RedisStreamSource`
    decodes again. With ``fields=True`` a value must be a dict (or a pydantic model, dumped as
    JSON would) and each item is a field: strings and bytes as they are, numbers as their text,
    ``True``/``False`` as ``true``/``false``, lists, dicts and other values as JSON, and
    ``None`` leaves the field out. A value the sink cannot write that way (``bytes`` or a
    ``set`` as JSON, a list with ``fields=True``, a dict with no field left) is refused by
    ``write`` (:class:`~connectors.base.UnwritableValue`: the sink step's error policy applies
    to its record). Keys are not written; put what a consumer needs into the value.

    ``maxlen`` trims the stream to about that many entries as entries are added (``MAXLEN ~``:
    Redis removes whole internal nodes, so it keeps at least ``maxlen`` and some more).

    Each flush is one ``MULTI``/``EXEC`` transaction of ``XADD`` commands: all of it is
    added or none. Delivery is at-least-once (see the module docstring); ``add_id=True`` adds
    the field ``headwater-id`` (replacing a field of that name in the value) naming the input
    record, the same for the same record written again, for consumers to drop repeats by.
    Records a step emits on a timer (windows closing) come from no input record and get none.
    """

    name = "redis"

    def __init__(
        self,
        stream: str,
        *,
        url: str | None = None,
        field: str = "value",
        fields: bool = False,
        maxlen: int | None = None,
        add_id: bool = False,
        retry_for: float = 30.0,
    ) -> None:
        if maxlen is not None and (isinstance(maxlen, bool) or maxlen < 1):
            raise ValueError(f"maxlen must be a number of entries, at least 1, got {maxlen!r}")
        if not field:
            raise ValueError("field must be a field name, not empty")
        self.stream = stream
        self.url = url
        self.field = field
        self.fields = fields
        self.maxlen = maxlen
        self.add_id = add_id
        self.retry_for = retry_for

    def __repr__(self) -> str:
        return f"RedisStreamSink({self.stream!r})"

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer for one worker; it connects in :meth:`SinkWriter.start`."""
        return _RedisStreamWriter(self, ctx)


def _cell(value: Any) -> EncodableT | None:
    """A value of a dict's item as a field value (None: leave the field out)."""
    if value is None or isinstance(value, str | bytes):
        return value
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return value
    return orjson.dumps(value, default=json_default)


class _RedisStreamWriter(SinkWriter):
    """One worker's client and the entries it has not flushed yet."""

    def __init__(self, sink: RedisStreamSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._connector = _Connector(
            sink.url, f"RedisStreamSink {sink.stream!r} (step {ctx.step_id!r})", sink.retry_for
        )
        self._client: aioredis.Redis | None = None
        self._pending: list[_Entry] = []
        self._flushing = asyncio.Lock()

    async def start(self) -> None:
        """Connect, and check that the stream is a stream (or not there yet)."""
        client = self._connect()
        kind = _text(await self._connector.call(lambda: client.type(self._sink.stream)))
        if kind not in ("stream", "none"):
            raise ConnectorError(
                f"{self._connector.what}: key {self._sink.stream!r} holds a {kind}, not a "
                "stream; name a stream, or delete the key"
            )

    def _connect(self) -> aioredis.Redis:
        if self._client is None:
            self._client = self._connector.client()
        return self._client

    # -- write: entries out of values, all of a batch or none -----------------------------

    def write(self, batch: Batch) -> None:
        encode = self._fields if self._sink.fields else self._json
        try:
            entries = [encode(value) for value in batch.values]
        except (TypeError, ValueError) as error:
            raise UnwritableValue(
                f"{self._connector.what}: a value cannot be written as JSON ({error}); map the "
                "stream to dicts, lists, strings, numbers or pydantic models before this sink"
            ) from error
        if self._sink.add_id:
            self._add_ids(batch, entries)
        self._pending += entries

    def _json(self, value: Any) -> _Entry:
        if isinstance(value, BaseModel):
            return {self._sink.field: value.__pydantic_serializer__.to_json(value)}
        return {self._sink.field: orjson.dumps(value, default=json_default)}

    def _fields(self, value: Any) -> _Entry:
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if not isinstance(value, dict):
            raise UnwritableValue(
                f"{self._connector.what}: fields=True writes dicts (or pydantic models) as "
                f"fields, got a {type(value).__name__}; map the stream to dicts, or pass "
                "fields=False to write each value as JSON in one field"
            )
        entry: _Entry = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise UnwritableValue(
                    f"{self._connector.what}: field names must be strings, got "
                    f"{type(name).__name__} {name!r:.40}"
                )
            cell = _cell(item)
            if cell is not None:
                entry[name] = cell
        if not entry:
            raise UnwritableValue(
                f"{self._connector.what}: a dict with no field (or only None) cannot be a "
                "stream entry: Redis needs at least one field"
            )
        return entry

    @staticmethod
    def _add_ids(batch: Batch, entries: list[_Entry]) -> None:
        """``headwater-id`` fields, for the records of ``batch`` read from the log."""
        fetched = batch.fetched
        prefix = f"{fetched.topic}:{fetched.partition}:"
        previous, repeat = -1, 0
        for i, entry in enumerate(entries):
            offset = batch.offset_at(i)
            if offset < 0:
                continue
            repeat = repeat + 1 if offset == previous else 0
            previous = offset
            entry[ID_FIELD] = f"{prefix}{offset}#{repeat}" if repeat else f"{prefix}{offset}"

    # -- flush: one transaction --------------------------------------------------------------

    async def flush(self) -> None:
        """Add the buffered entries in one transaction, retried as a whole while the
        connection fails; on failure nothing is added and the buffer is kept."""
        async with self._flushing:
            if not self._pending:
                return
            entries = list(self._pending)
            client = self._connect()
            await self._connector.call(lambda: self._commit(client, entries))
            del self._pending[: len(entries)]

    async def _commit(self, client: aioredis.Redis, entries: list[_Entry]) -> None:
        sink = self._sink
        pipe = client.pipeline(transaction=True)
        for entry in entries:
            pipe.xadd(sink.stream, entry, maxlen=sink.maxlen, approximate=True)
        try:
            await pipe.execute()
        except redis_errors.ExecAbortError as error:
            raise ConnectorError(
                f"{self._connector.what}: the server refused the transaction of "
                f"{len(entries):,} entries: {error}"
            ) from error
        except redis_errors.ResponseError as error:
            # redis-py names the command (with its values) before the server's words
            if "WRONGTYPE" in str(error):
                raise ConnectorError(
                    f"{self._connector.what}: key {sink.stream!r} is no longer a stream; "
                    "delete the key, or name another stream"
                ) from None
            raise

    async def close(self) -> None:
        """Flush, then close the client."""
        try:
            await self.flush()
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
