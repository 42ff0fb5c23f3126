"""RedisStreamSource and RedisStreamSink against a real Redis server: entries read as values
with keys and event times, acknowledged only once the next batch is asked for, read again
after a crash and after an answer lost with its connection; entries appended as JSON or as
fields, trimmed, refused values that leave nothing behind, a flush that fails half-way through
its transaction adding nothing and keeping its entries; errors that say what to do without the
password; and a pipeline from one stream to another through ``headwater run``.

The server is the one ``bash scripts/redis.sh start`` runs, at the URL it prints, exported as
``HEADWATER_TEST_REDIS``; without it these tests fail (they never skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.typing import EncodableT, FieldT
from support.cli import clean_env, headwater
from support.connectors import STAMP, Follower, read_to_end, sink_batch, started, values_of

from connectors import SinkContext
from connectors.base import SourceBatch, UnwritableValue
from connectors.redis import ID_FIELD, URL_VARIABLE, RedisStreamSink, RedisStreamSource
from pipelines.errors import ConnectorError

CONTEXT = SinkContext("redis-tests", "sink.redis", 0)
"""Where the writers of these tests run."""

TEST_URL_VARIABLE = "HEADWATER_TEST_REDIS"
GROUP = "tests"


def redis_url() -> str:
    """The test server's URL; a test that needs it fails (never skips) without one."""
    url = os.environ.get(TEST_URL_VARIABLE)
    if not url:
        pytest.fail(
            f"{TEST_URL_VARIABLE} is not set: run `bash scripts/redis.sh start` and export the "
            f'URL it prints, e.g. export {TEST_URL_VARIABLE}="$(bash scripts/redis.sh start)"',
            pytrace=False,
        )
    return url


def with_port(url: str, port: int, password: str | None = None) -> str:
    """``url`` on another port of the same host (and with another password, if given)."""
    parts = urlsplit(url)
    secret = parts.password if password is None else password
    auth = f":{secret}@" if secret is not None else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{parts.hostname}:{port}"))


def stream_name() -> str:
    """A stream name no other test uses."""
    return f"hw-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def db() -> AsyncIterator[aioredis.Redis]:
    """A client of the test server, for the test's own commands."""
    client = aioredis.Redis.from_url(redis_url())
    yield client
    await client.aclose()


@pytest.fixture
async def stream(db: aioredis.Redis) -> AsyncIterator[str]:
    """A fresh stream name; the stream is deleted afterwards."""
    name = stream_name()
    yield name
    await db.delete(name)


def as_text(data: Any) -> str:
    """An answer's bytes as text."""
    return data.decode() if isinstance(data, bytes) else str(data)


def redis_fields(entry: dict[str, str]) -> dict[FieldT, EncodableT]:
    """``entry`` as redis-py types the fields of ``XADD``."""
    return {name: value for name, value in entry.items()}


def stream_entries(answer: Any) -> list[tuple[str, dict[str, str]]]:
    """An ``XRANGE`` answer: each entry's id and its fields, as text."""
    return [
        (
            as_text(entry_id),
            {as_text(name): as_text(value) for name, value in (fields or {}).items()},
        )
        for entry_id, fields in answer or []
    ]


async def add(db: aioredis.Redis, stream: str, *entries: dict[str, str]) -> list[str]:
    """Append ``entries``; their ids."""
    return [as_text(await db.xadd(stream, redis_fields(entry))) for entry in entries]


async def pending(db: aioredis.Redis, stream: str, group: str = GROUP) -> list[str]:
    """The ids of the group's pending entries (delivered, not acknowledged)."""
    rows = await db.xpending_range(stream, group, min="-", max="+", count=10_000)
    return [as_text(row["message_id"]) for row in rows]


async def entries(db: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    """The stream's entries' fields, as text."""
    return [fields for _, fields in stream_entries(await db.xrange(stream))]


def generator(reading: AsyncIterator[SourceBatch]) -> AsyncGenerator[SourceBatch, None]:
    """A source's batches, as the async generator they come from (to close it)."""
    assert isinstance(reading, AsyncGenerator)
    return reading


async def next_batch(reading: AsyncIterator[SourceBatch]) -> SourceBatch:
    """The next batch of ``reading`` (a coroutine, for a task)."""
    return await anext(reading)


def source(stream: str, **options: Any) -> RedisStreamSource:
    """A source of ``stream`` in group ``tests`` on the test server, ending when read."""
    options.setdefault("url", redis_url())
    options.setdefault("follow", False)
    return RedisStreamSource(stream, group=GROUP, **options)


class Proxy:
    """A TCP proxy in front of the test server that a test can break: cut every connection
    after some more bytes from the client, refuse connections, or drop the next answer."""

    def __init__(self, url: str) -> None:
        """A proxy to the server of ``url`` (not listening yet)."""
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self._target = (parts.hostname, parts.port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._budget: int | None = None  # bytes to pass from clients before cutting all
        self._drop_answer = False
        self.port = 0
        self.url = url

    async def start(self) -> None:
        """Listen (on the same port as before, after a :meth:`stop`)."""
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = with_port(self.url, self.port)

    def stop(self) -> None:
        """Close every connection and refuse new ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def cut_after(self, count: int) -> None:
        """Pass ``count`` more bytes from clients to the server, then :meth:`stop`."""
        self._budget = count

    def drop_next_answer(self) -> None:
        """Close the connection the server's next answer comes on, without passing it on."""
        self._drop_answer = True

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pass one client's bytes both ways, breaking them as asked."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        ends = {writer, up_writer}
        self._links |= ends

        def close() -> None:
            """Abort both ends of the link."""
            for end in ends:
                end.transport.abort()
                self._links.discard(end)

        async def upstream() -> None:
            """Client to server, cut after the byte budget if one is set."""
            while data := await reader.read(65536):
                if self._budget is not None:
                    data, self._budget = data[: self._budget], self._budget - len(data)
                up_writer.write(data)
                await up_writer.drain()
                if self._budget is not None and self._budget <= 0:
                    self._budget = None
                    self.stop()
                    return

        async def downstream() -> None:
            """Server to client, dropping the next answer if asked."""
            while data := await up_reader.read(65536):
                if self._drop_answer:
                    self._drop_answer = False
                    return
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        close()
        for pump in pumps:
            pump.cancel()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    """A running :class:`Proxy` in front of the test server."""
    running = Proxy(redis_url())
    await running.start()
    yield running
    running.stop()


# -- RedisStreamSource -------------------------------------------------------------------------


async def test_the_source_reads_entries_as_values_with_keys_and_event_times(
    db: aioredis.Redis, stream: str
) -> None:
    """Fields become a dict, a lone ``value`` field its JSON; the key field gives the key, the id
    the event time, the last id of a batch its position."""
    await db.xadd(stream, {"user": "u1", "page": "/a"}, id=f"{STAMP}-0")
    await db.xadd(stream, {"value": '{"n": [1, 2]}'}, id=f"{STAMP}-1")
    await db.xadd(stream, {"user": "u2", "value": '"text"'}, id=f"{STAMP + 5}-0")
    await db.xadd(stream, {"value": "3", ID_FIELD: "t:0:7"}, id=f"{STAMP + 9}-0")
    await db.xadd(stream, {"value": "1", "other": "x"}, id=f"{STAMP + 9}-1")
    batches = await read_to_end(source(stream, key_field="user", batch_size=2))
    assert [len(b.values) for b in batches] == [2, 2, 1]
    assert values_of(batches) == [
        {"user": "u1", "page": "/a"},  # fields: a dict of text
        {"n": [1, 2]},  # the lone value field holds JSON
        "text",  # ... beside the key field
        3,  # ... or beside RedisStreamSink's id
        {"value": "1", "other": "x"},  # not alone: a dict
    ]
    assert [k for b in batches for k in b.keys or []] == ["u1", None, "u2", None, None]
    stamps = [t for b in batches for t in b.timestamps or []]
    assert stamps == [STAMP, STAMP, STAMP + 5, STAMP + 9, STAMP + 9]
    assert [b.position for b in batches] == [f"{STAMP}-1", f"{STAMP + 9}-0", f"{STAMP + 9}-1"]
    assert not any(b.raw for b in batches)


async def test_value_field_none_makes_every_entry_a_dict_and_bad_json_is_passed_on_as_bytes(
    db: aioredis.Redis, stream: str
) -> None:
    """A ``value`` field that is not JSON reaches the topic as bytes (the workers dead-letter
    it); ``value_field=None`` reads every entry as a dict."""
    await add(db, stream, {"value": "[1"}, {"value": "2"})
    assert values_of(await read_to_end(source(stream))) == [b"[1", 2]
    again = RedisStreamSource(
        stream, group="other", url=redis_url(), follow=False, value_field=None
    )
    assert values_of(await read_to_end(again)) == [{"value": "[1"}, {"value": "2"}]


async def test_entries_are_acknowledged_only_when_the_next_batch_is_asked_for(
    db: aioredis.Redis, stream: str
) -> None:
    """A batch's entries stay pending (XPENDING) until the runtime asks for the next batch, which
    it does once the batch is on the log."""
    ids = await add(db, stream, *({"n": str(n)} for n in range(5)))
    reading = aiter(source(stream, batch_size=2).read(None))
    first = await anext(reading)
    assert [v["n"] for v in first.values] == ["0", "1"]
    assert await pending(db, stream) == ids[:2]  # on the log? not known yet
    second = await anext(reading)  # asked for: the first batch is durable
    assert [v["n"] for v in second.values] == ["2", "3"]
    assert await pending(db, stream) == ids[2:4]
    await anext(reading)
    assert await pending(db, stream) == ids[4:]
    with pytest.raises(StopAsyncIteration):
        await anext(reading)
    assert await pending(db, stream) == []


async def test_a_batch_never_asked_past_stays_pending_and_is_read_again(
    db: aioredis.Redis, stream: str
) -> None:
    """A run that dies with a batch not yet on the log: its entries are emitted again by the
    next run, before the new ones; an entry deleted meanwhile is acknowledged, not emitted."""
    ids = await add(db, stream, *({"n": str(n)} for n in range(6)))
    reading = generator(source(stream, batch_size=3).read(None))
    crashed = await anext(reading)
    await reading.aclose()  # the run stops without asking for more
    assert await pending(db, stream) == ids[:3]
    await db.xdel(stream, ids[1])
    batches = await read_to_end(source(stream, batch_size=3))
    assert values_of(batches) == [crashed.values[0], crashed.values[2]] + [
        {"n": str(n)} for n in range(3, 6)
    ]
    assert batches[0].position == ids[2]
    assert await pending(db, stream) == []


async def test_without_follow_the_source_ends_and_the_group_remembers_what_it_read(
    db: aioredis.Redis, stream: str
) -> None:
    """``follow=False`` ends when nothing is new; the next read goes on where the group is,
    whatever position it is given."""
    await add(db, stream, *({"n": str(n)} for n in range(3)))
    assert len(values_of(await read_to_end(source(stream)))) == 3
    assert await read_to_end(source(stream), f"{STAMP}-0") == []  # the position is not used
    await add(db, stream, {"n": "3"})
    assert values_of(await read_to_end(source(stream))) == [{"n": "3"}]


async def test_a_missing_stream_is_created_empty_with_its_group(
    db: aioredis.Redis, stream: str
) -> None:
    """Reading a stream that does not exist creates it with the group at its start."""
    assert await read_to_end(source(stream)) == []
    groups = await db.xinfo_groups(stream)
    assert [(g["name"], g["last-delivered-id"]) for g in groups] == [(GROUP.encode(), b"0-0")]


async def test_a_following_source_waits_for_new_entries(db: aioredis.Redis, stream: str) -> None:
    """``follow=True`` keeps reading: entries added later arrive."""
    follower = Follower(source(stream, follow=True, block_ms=50))
    try:
        await add(db, stream, {"n": "0"})
        assert await follower.wait_for(1) == [{"n": "0"}]
        await asyncio.sleep(0.2)  # a few empty blocking reads
        await add(db, stream, {"n": "1"}, {"n": "2"})
        assert await follower.wait_for(3) == [{"n": str(n)} for n in range(3)]
    finally:
        await follower.stop()


async def test_a_cancellation_swallowed_below_the_source_still_stops_it(
    stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's ``asyncio.wait_for`` (redis-py sends commands under it when a socket
    timeout is set) drops a cancellation that comes as the command completes; the source sees
    the request still pending and stops anyway, instead of reading on forever."""
    original: Any = aioredis.Redis.xreadgroup

    async def swallowing(self: aioredis.Redis, *args: Any, **kwargs: Any) -> Any:
        """``XREADGROUP``, with a cancellation turned into an empty answer."""
        try:
            return await original(self, *args, **kwargs)
        except asyncio.CancelledError:
            return []  # the command "completed": what a lost cancellation looks like

    monkeypatch.setattr(aioredis.Redis, "xreadgroup", swallowing)
    follower = Follower(source(stream, follow=True, block_ms=1000))
    await asyncio.sleep(0.3)  # in a blocking read
    await asyncio.wait_for(follower.stop(), timeout=5)


async def blocked_readers(db: aioredis.Redis) -> int:
    """How many clients wait in a blocking XREADGROUP."""
    clients = await db.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""))


async def test_entries_whose_answer_was_lost_with_the_connection_are_read_again(
    db: aioredis.Redis, stream: str, proxy: Proxy
) -> None:
    """The server delivered the entries to the consumer (they are pending) but the connection
    dropped before its answer arrived: the source reconnects and reads its pending entries."""
    reading = generator(source(stream, url=proxy.url, follow=True, block_ms=5000).read(None))
    waiting = asyncio.create_task(next_batch(reading))
    try:
        async with asyncio.timeout(5):
            while not await blocked_readers(db):
                await asyncio.sleep(0.02)
        proxy.drop_next_answer()
        adding = db.pipeline(transaction=True)  # both at once: one answer holds both
        adding.xadd(stream, {"n": "0"})
        adding.xadd(stream, {"n": "1"})
        ids = [as_text(entry_id) for entry_id in await adding.execute()]
        batch = await asyncio.wait_for(waiting, timeout=10)
        assert batch.values == [{"n": "0"}, {"n": "1"}]
        assert await pending(db, stream) == ids
        waiting = asyncio.create_task(next_batch(reading))  # acknowledges them
        async with asyncio.timeout(5):
            while await pending(db, stream):
                await asyncio.sleep(0.02)
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await reading.aclose()


async def test_the_source_names_a_key_that_is_not_a_stream(db: aioredis.Redis, stream: str) -> None:
    """A key of another type is an error that names it."""
    await db.set(stream, "x")
    with pytest.raises(ConnectorError, match=f"key '{stream}' holds a string, not a stream"):
        await read_to_end(source(stream))


# -- connections ---------------------------------------------------------------------------------


async def test_a_wrong_password_is_an_error_that_does_not_show_it(stream: str) -> None:
    """A wrong password, or none, is an error at once that says what to do, without the password."""
    url = with_port(redis_url(), urlsplit(redis_url()).port or 0, password="s3cret")
    with pytest.raises(ConnectorError, match="refused the password in the URL") as caught:
        await read_to_end(source(stream, url=url))
    assert "s3cret" not in str(caught.value) and ":***@" in str(caught.value)
    with pytest.raises(ConnectorError, match="refused the password in the URL") as caught:
        await started(RedisStreamSink(stream, url=url), CONTEXT)
    assert "s3cret" not in str(caught.value)
    parts = urlsplit(redis_url())
    nothing = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))
    with pytest.raises(ConnectorError, match="the server needs a password; give it in the URL"):
        await read_to_end(source(stream, url=nothing))


async def test_a_server_that_is_down_is_retried_then_named(stream: str) -> None:
    """A refused connection is retried for ``retry_for`` seconds, then named (password hidden)."""
    url = with_port(redis_url(), 9)  # the discard port: nothing listens there
    with pytest.raises(ConnectorError, match=r"retried for 0.5 s\); is the server up") as caught:
        await read_to_end(source(stream, url=url, retry_for=0.5))
    message = str(caught.value)
    assert "127.0.0.1:9" in message and ":***@" in message and "headwater@" not in message
    with pytest.raises(ConnectorError, match=r"retried for 0.5 s\)"):
        await started(RedisStreamSink(stream, url=url, retry_for=0.5), CONTEXT)


async def test_no_url_anywhere_says_where_to_put_one(
    stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``url=`` the environment variable is used; without either, the error names both."""
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    with pytest.raises(ConnectorError, match=f"pass url= or set {URL_VARIABLE}="):
        await read_to_end(RedisStreamSource(stream, group=GROUP, follow=False))
    with pytest.raises(ConnectorError, match=f"pass url= or set {URL_VARIABLE}="):
        await started(RedisStreamSink(stream), CONTEXT)
    monkeypatch.setenv(URL_VARIABLE, redis_url())
    assert await read_to_end(RedisStreamSource(stream, group=GROUP, follow=False)) == []
    await (await started(RedisStreamSink(stream), CONTEXT)).close()


async def test_an_url_of_another_kind_is_refused() -> None:
    """An URL of another scheme is an error that says what a Redis URL looks like."""
    with pytest.raises(ConnectorError, match="not a Redis URL"):
        await started(RedisStreamSink("s", url="http://:pw@127.0.0.1:1/"), CONTEXT)


# -- RedisStreamSink -----------------------------------------------------------------------------


class ItemOrder(BaseModel):
    """A value with its own serializer."""

    id: int
    item: str


async def test_values_arrive_as_json_in_one_field_only_when_flushed(
    db: aioredis.Redis, stream: str
) -> None:
    """Each value is one entry, its JSON in field ``value``, added by the flush; the source reads
    the values back."""
    writer = await started(RedisStreamSink(stream, url=redis_url()), CONTEXT)
    writer.write(sink_batch([{"a": 1}, [1, "2"], "x", None, ItemOrder(id=7, item="pen")]))
    assert await db.exists(stream) == 0  # write only buffers
    await writer.flush()
    assert await entries(db, stream) == [
        {"value": '{"a":1}'},
        {"value": '[1,"2"]'},
        {"value": '"x"'},
        {"value": "null"},
        {"value": '{"id":7,"item":"pen"}'},
    ]
    await writer.close()
    assert values_of(await read_to_end(source(stream))) == [
        {"a": 1},
        [1, "2"],
        "x",
        None,
        {"id": 7, "item": "pen"},
    ]


async def test_fields_true_writes_each_item_as_a_field(db: aioredis.Redis, stream: str) -> None:
    """``fields=True``: a dict's items (a model's fields) are the fields; None is left out."""
    writer = await started(RedisStreamSink(stream, url=redis_url(), fields=True), CONTEXT)
    value = {"s": "x", "i": 3, "f": 0.5, "b": True, "n": None, "l": [1], "d": {"k": "v"}}
    writer.write(sink_batch([value, ItemOrder(id=1, item="ink")]))
    await writer.close()
    assert await entries(db, stream) == [
        {"s": "x", "i": "3", "f": "0.5", "b": "true", "l": "[1]", "d": '{"k":"v"}'},
        {"id": "1", "item": "ink"},
    ]


async def test_add_id_names_the_input_record_of_each_entry(db: aioredis.Redis, stream: str) -> None:
    """``add_id=True``: each entry names its input record; repeats of an offset are numbered;
    records made on a timer get none."""
    writer = await started(RedisStreamSink(stream, url=redis_url(), add_id=True), CONTEXT)
    writer.write(
        sink_batch(
            ["a", "b", "c", "d"], first=10, origins=[0, 1, 1, -1], topic="orders", partition=2
        )
    )  # a flat_map's two of 11
    await writer.close()
    assert [e.get(ID_FIELD) for e in await entries(db, stream)] == [
        "orders:2:10",
        "orders:2:11",
        "orders:2:11#1",
        None,  # made on a timer: no input record
    ]


async def test_maxlen_trims_the_stream_to_about_that_many(db: aioredis.Redis, stream: str) -> None:
    """``maxlen`` trims approximately: at least ``maxlen`` entries stay, the newest."""
    writer = await started(RedisStreamSink(stream, url=redis_url(), maxlen=100), CONTEXT)
    for start in range(0, 1000, 250):
        writer.write(sink_batch([{"n": n} for n in range(start, start + 250)]))
        await writer.flush()
    await writer.close()
    length = await db.xlen(stream)
    assert 100 <= length < 200  # whole nodes of 100 entries are trimmed (MAXLEN ~)
    last = orjson.loads((await entries(db, stream))[-1]["value"])
    assert last == {"n": 999}


@pytest.mark.parametrize(
    ("options", "value", "says"),
    [
        ({}, {1, 2}, "a value cannot be written as JSON"),
        ({}, b"raw", "a value cannot be written as JSON"),
        ({"fields": True}, [1, 2], "fields=True writes dicts"),
        ({"fields": True}, {"n": None}, "a dict with no field"),
        ({"fields": True}, {"s": {1, 2}}, "a value cannot be written as JSON"),
    ],
)
async def test_a_value_the_sink_cannot_write_is_refused_and_nothing_of_its_batch_is_kept(
    db: aioredis.Redis, stream: str, options: dict[str, Any], value: Any, says: str
) -> None:
    """``write`` refuses a batch with a value it cannot encode, keeping none of it."""
    writer = await started(RedisStreamSink(stream, url=redis_url(), **options), CONTEXT)
    with pytest.raises(UnwritableValue, match=says):
        writer.write(sink_batch([{"n": 1}, value]))
    writer.write(sink_batch([{"n": 2}]))
    await writer.close()
    assert len(await entries(db, stream)) == 1
    assert (await entries(db, stream))[0] in ({"value": '{"n":2}'}, {"n": "2"})


async def test_a_flush_cut_off_half_way_adds_nothing_and_keeps_its_entries(
    db: aioredis.Redis, stream: str, proxy: Proxy
) -> None:
    """A connection cut while the transaction is on its way, and a server that cannot be reached:
    the flush fails after its retries, nothing of it is in the stream, and the next flush
    writes every entry once."""
    writer = await started(RedisStreamSink(stream, url=proxy.url, retry_for=0.5), CONTEXT)
    writer.write(sink_batch([{"n": n} for n in range(100)]))
    proxy.cut_after(300)  # MULTI and a few XADDs reach the server, not the EXEC
    with pytest.raises(ConnectorError, match=r"retried for 0.5 s\); is the server up"):
        await writer.flush()
    assert await db.exists(stream) == 0  # the transaction was discarded as a whole
    await proxy.start()
    writer.write(sink_batch([{"n": 100}]))
    await writer.close()
    values = [orjson.loads(e["value"])["n"] for e in await entries(db, stream)]
    assert values == list(range(101))


async def test_a_connection_lost_between_flushes_is_opened_again(
    db: aioredis.Redis, stream: str, proxy: Proxy
) -> None:
    """A connection closed between flushes is opened again by the next flush."""
    writer = await started(RedisStreamSink(stream, url=proxy.url), CONTEXT)
    writer.write(sink_batch([1]))
    await writer.flush()
    proxy.stop()  # the writer's connection is closed...
    await proxy.start()  # ... and the server can be reached again
    writer.write(sink_batch([2]))
    await writer.close()
    assert await entries(db, stream) == [{"value": "1"}, {"value": "2"}]


async def test_the_sink_names_a_key_that_is_not_a_stream(db: aioredis.Redis, stream: str) -> None:
    """A key of another type is an error at start that names it."""
    await db.set(stream, "x")
    with pytest.raises(ConnectorError, match=f"key '{stream}' holds a string, not a stream"):
        await started(RedisStreamSink(stream, url=redis_url()), CONTEXT)


async def test_a_flush_the_server_refuses_keeps_its_entries(
    db: aioredis.Redis, stream: str
) -> None:
    """A key replaced by a string: the flush fails saying so, and keeps its entries for the next
    flush."""
    writer = await started(RedisStreamSink(stream, url=redis_url()), CONTEXT)
    await db.set(stream, "x")  # replaced by a string after the writer started
    writer.write(sink_batch([{"secret": "s3cret"}]))
    with pytest.raises(ConnectorError, match=f"key '{stream}' is no longer a stream") as caught:
        await writer.flush()
    assert "s3cret" not in str(caught.value)  # the values of the command are not shown
    await db.delete(stream)
    await writer.close()
    assert await entries(db, stream) == [{"value": '{"secret":"s3cret"}'}]


def test_bad_options_are_refused_at_once() -> None:
    """Options that cannot work are refused when the connector is made."""
    with pytest.raises(ValueError, match="maxlen must be a number of entries"):
        RedisStreamSink("s", maxlen=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        RedisStreamSource("s", group="g", batch_size=0)
    with pytest.raises(ValueError, match="group and consumer must be names"):
        RedisStreamSource("s", group="")


# -- through headwater run ---------------------------------------------------------------------

MODULE = """
from connectors.redis import RedisStreamSink, RedisStreamSource
from pipelines import Pipeline, Topic


def priced(order):
    return {{**order, "total": int(order["qty"]) * int(order["price"])}}


pipeline = (
    Pipeline("redis-orders")
    .source(
        RedisStreamSource(
            "{source}", group="orders", key_field="customer", follow=False, batch_size=100
        ),
        into=Topic("orders", partitions=3),
    )
    .map("priced", priced)
    .sink(RedisStreamSink("{sink}", add_id=True), step_id="to-redis")
)
"""


@pytest.fixture
def streams() -> Iterator[tuple[str, str]]:
    """An input and an output stream; both deleted afterwards."""
    names = (stream_name(), stream_name())
    yield names
    client = redis.Redis.from_url(redis_url())
    client.delete(*names)
    client.close()


def order_fields(count: int, first: int = 0) -> list[dict[str, str]]:
    """``count`` orders as stream fields, ids from ``first``."""
    return [
        {"id": str(i), "customer": f"c{i % 13}", "qty": str(i % 5 + 1), "price": str(i % 7)}
        for i in range(first, first + count)
    ]


def as_multiset(values: list[dict[str, Any]]) -> Counter[bytes]:
    """Values as a multiset, comparable whatever their order."""
    return Counter(orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in values)


def test_a_pipeline_reads_one_stream_and_writes_another_through_headwater_run(
    tmp_path: Path, streams: tuple[str, str]
) -> None:
    """``headwater run``: every order of the input stream lands in the output stream, priced,
    once (as a multiset), with unique ids; every entry is acknowledged, and a second run reads
    only the entries added since."""
    source_stream, sink_stream = streams
    (tmp_path / "shop.py").write_text(MODULE.format(source=source_stream, sink=sink_stream))
    client = redis.Redis.from_url(redis_url())
    try:
        given = order_fields(1500)
        for order in given:
            client.xadd(source_stream, redis_fields(order))
        env = {URL_VARIABLE: redis_url()}
        done = headwater("run", "shop.py", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        written = stream_entries(client.xrange(sink_stream))
        values = [orjson.loads(fields["value"]) for _, fields in written]
        expected = [{**o, "total": int(o["qty"]) * int(o["price"])} for o in given]
        assert as_multiset(values) == as_multiset(expected)
        ids = [fields[ID_FIELD] for _, fields in written]
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"orders:[0-2]:\d+", i) for i in ids), ids[:5]
        assert client.xpending(source_stream, "orders")["pending"] == 0

        more = order_fields(200, first=1500)
        for order in more:
            client.xadd(source_stream, redis_fields(order))
        again = headwater("run", "shop.py", cwd=tmp_path, env=env)
        assert again.returncode == 0, again.stderr
        written = stream_entries(client.xrange(sink_stream))
        values = [orjson.loads(fields["value"]) for _, fields in written]
        expected += [{**o, "total": int(o["qty"]) * int(o["price"])} for o in more]
        assert as_multiset(values) == as_multiset(expected)  # only the new ones were read
    finally:
        client.close()


def test_wrong_credentials_in_headwater_run_are_one_paragraph_without_the_password(
    tmp_path: Path, streams: tuple[str, str]
) -> None:
    """A wrong password stops ``headwater run`` with status 2 and one paragraph, without it."""
    (tmp_path / "shop.py").write_text(MODULE.format(source=streams[0], sink=streams[1]))
    port = urlsplit(redis_url()).port or 0
    url = with_port(redis_url(), port, password="s3cret")
    done = headwater("run", "shop.py", cwd=tmp_path, env={URL_VARIABLE: url})
    # a source meets the server once the run has started: after a progress line
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr, done.stderr
    (error,) = re.findall(r"^headwater: .*", done.stderr, re.MULTILINE | re.DOTALL)
    paragraph = " ".join(error.split())
    assert "the server refused the password in the URL" in paragraph, paragraph
    assert ":***@" in paragraph and "(step 'orders')" in paragraph, paragraph


def wait_for_entries(
    client: redis.Redis, stream: str, count: int, run: subprocess.Popen[bytes]
) -> None:
    """Until ``stream`` holds ``count`` entries (fails if the run ends first, or after 60 s)."""
    deadline = time.monotonic() + 60
    while client.xlen(stream) < count:
        assert run.poll() is None, f"the run ended with status {run.returncode}"
        assert time.monotonic() < deadline, f"{stream} never got {count} entries"
        time.sleep(0.05)


def test_ctrl_c_stops_a_run_that_follows_its_stream(
    tmp_path: Path, streams: tuple[str, str]
) -> None:
    """A following source blocks in XREADGROUP when the stream is idle; Ctrl-C still ends the
    run at once (on Python 3.11, a cancellation lost inside redis-py would keep it reading)."""
    source_stream, sink_stream = streams
    module = MODULE.replace("follow=False", "follow=True, block_ms=100")
    (tmp_path / "shop.py").write_text(module.format(source=source_stream, sink=sink_stream))
    client = redis.Redis.from_url(redis_url())
    given = order_fields(500)
    with (tmp_path / "run.stderr").open("wb") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "run", "shop.py"],
            cwd=tmp_path,
            env=clean_env({URL_VARIABLE: redis_url()}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        for first in (0, 300):
            for order in given[first : first + 300]:
                client.xadd(source_stream, redis_fields(order))
            wait_for_entries(client, sink_stream, min(first + 300, 500), run)
        time.sleep(0.3)  # idle: the source waits in its blocking read
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 128 + signal.SIGINT, (tmp_path / "run.stderr").read_text()
        written = stream_entries(client.xrange(sink_stream))
        values = [orjson.loads(fields["value"]) for _, fields in written]
        expected = [{**o, "total": int(o["qty"]) * int(o["price"])} for o in given]
        assert as_multiset(values) == as_multiset(expected)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=10)
        client.close()
