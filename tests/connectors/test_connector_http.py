"""HttpSource and WebhookSink over real sockets on 127.0.0.1.

HttpSource: its ``read()`` is driven by hand, as ``run_source`` drives it (a request is
answered once the runtime asks for the batch after the one holding its records), and a client
(aiohttp) posts JSON and NDJSON to it; the refusals (401, 413, 415, 400 with the line, 429 with
Retry-After), the 503s at a stop, keys and timestamps; and one run of ``headwater run`` with the
source feeding a JSON Lines file, 10,000 records posted and every acknowledged one found in the
output.

WebhookSink: a receiver served by aiohttp in the test records every POST and answers from a
script (statuses, Retry-After, dropped connections, slow answers): batched and per-record
bodies, retries and their limits, permanent refusals, the concurrency limit, and idempotency
keys that are the same when the same records are sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import textwrap
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from pydantic import BaseModel
from support.cli import Cli, background, wait_until
from support.connectors import STAMP, sink_batch, started
from support.network import free_port
from support.values import sorted_json

from connectors.base import SinkContext, SourceBatch, UnwritableValue
from connectors.http import JSON, NDJSON, TOKEN_VARIABLE, HttpSource, WebhookSink
from pipelines.errors import ConnectorError

CONTEXT = SinkContext("pipe", "sink.webhook", 0)

WAIT = 10.0
"""Seconds a test waits for something that should take milliseconds."""


def ndjson(values: list[Any]) -> bytes:
    return b"".join(orjson.dumps(value) + b"\n" for value in values)


# -- HttpSource: driving read() by hand ----------------------------------------------------------


class Reader:
    """An HttpSource whose ``read()`` is driven by hand: :meth:`ask` asks for the next batch,
    as ``run_source`` does once the previous batch is durable on the log."""

    def __init__(self, source: HttpSource, position: Any = None) -> None:
        self.source = source
        self.batches = source.read(position)
        self.asking: asyncio.Task[SourceBatch] | None = None
        """The batch asked for and not taken yet."""
        self.last: asyncio.Task[SourceBatch] | None = None

    def ask(self) -> asyncio.Task[SourceBatch]:
        """Ask for the next batch (in a task: it waits for records); this tells the source
        that the batch before is durable on the log."""
        assert self.asking is None, "the batch asked for was not taken with next()"
        self.asking = asyncio.create_task(anext(self.batches))  # type: ignore[arg-type]
        self.last = self.asking
        return self.asking

    async def next(self) -> SourceBatch:
        """The batch asked for (asking for it now if it was not)."""
        task = self.asking if self.asking is not None else self.ask()
        batch = await asyncio.wait_for(asyncio.shield(task), WAIT)
        self.asking = None
        return batch

    @property
    def url(self) -> str:
        assert self.source.address is not None
        host, port = self.source.address
        return f"http://{host}:{port}{self.source.path}"

    async def start(self) -> None:
        """Ask for the first batch, which starts the server; return once it listens."""
        task = self.ask()
        deadline = time.monotonic() + WAIT
        while self.source.address is None:
            if task.done():
                task.result()
                raise AssertionError("read() returned a batch before anything was posted")
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.last is not None and not self.last.done():
            self.last.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.last
        await self.batches.aclose()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def serving(source: HttpSource, position: Any = None) -> AsyncIterator[Reader]:
    """A started :class:`Reader`, closed at the end of the block."""
    reader = Reader(source, position)
    await reader.start()
    try:
        yield reader
    finally:
        await reader.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


async def post(
    client: aiohttp.ClientSession,
    url: str,
    body: bytes,
    kind: str = NDJSON,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = {"Content-Type": kind, **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with client.post(url, data=body, headers=sent) as response:
        return Answer(response.status, orjson.loads(await response.read()), dict(response.headers))


def posting(
    client: aiohttp.ClientSession, url: str, body: bytes, kind: str = NDJSON, **kw: Any
) -> asyncio.Task[Answer]:
    """:func:`post` in a task: its answer may wait for the records to reach the log."""
    return asyncio.create_task(post(client, url, body, kind, **kw))


async def still_waiting(task: asyncio.Task[Answer], seconds: float = 0.2) -> bool:
    """Whether ``task`` is still without an answer after ``seconds``."""
    await asyncio.sleep(seconds)
    return not task.done()


async def test_a_json_object_a_json_array_and_ndjson_are_taken(
    client: aiohttp.ClientSession,
) -> None:
    """One object is one record, an array one per element, NDJSON one per non-blank line (CRLF
    too); the batch holds all of them in the order they came, and each request is answered 200
    with its count once the next batch is asked for."""
    async with serving(HttpSource(port=0)) as reader:
        one = posting(client, reader.url, orjson.dumps({"a": 1}), JSON)
        assert await still_waiting(one, 0.1)
        many = posting(client, reader.url, orjson.dumps([{"b": 1}, {"b": 2}]), JSON)
        assert await still_waiting(many, 0.1)
        lines = posting(client, reader.url, b'{"c": 1}\r\n\n  \n[1, 2]\n"text"')
        assert await still_waiting(lines, 0.1)
        batch = await reader.next()
        while len(batch.values) < 6:  # the first batch may have been cut before the rest came
            reader.ask()
            more = await reader.next()
            batch = SourceBatch(batch.values + more.values, more.position)
        assert sorted(orjson.dumps(v) for v in batch.values) == sorted(
            orjson.dumps(v) for v in [{"a": 1}, {"b": 1}, {"b": 2}, {"c": 1}, [1, 2], "text"]
        )
        assert batch.position == 6
        assert batch.keys is None and batch.timestamps is None and not batch.raw
        reader.ask()
        answers = await asyncio.gather(one, many, lines)
        assert [(a.status, a.body) for a in answers] == [
            (200, {"accepted": 1}),
            (200, {"accepted": 2}),
            (200, {"accepted": 3}),
        ]


async def test_the_answer_waits_until_the_batch_is_durable(client: aiohttp.ClientSession) -> None:
    """A request's 200 comes only when the runtime asks for the batch after the one holding its
    records (which it does once that batch is on the log), not when the batch is taken."""
    async with serving(HttpSource(port=0)) as reader:
        request = posting(client, reader.url, ndjson([{"n": 1}, {"n": 2}]))
        batch = await reader.next()
        assert batch.values == [{"n": 1}, {"n": 2}]
        assert batch.position == 2
        assert await still_waiting(request, 0.3), "answered before the batch was durable"
        reader.ask()  # run_source asks for the next batch: the first one is on the log
        answer = await asyncio.wait_for(request, WAIT)
        assert (answer.status, answer.body) == (200, {"accepted": 2})


async def test_a_request_split_over_batches_is_answered_after_its_last_batch(
    client: aiohttp.ClientSession,
) -> None:
    """With ``batch_size=2`` five records take three batches; the request is answered after
    the third, and the positions count the records."""
    async with serving(HttpSource(port=0, batch_size=2)) as reader:
        request = posting(client, reader.url, ndjson([{"n": n} for n in range(5)]))
        batches = [await reader.next()]
        for _ in range(2):
            reader.ask()
            assert await still_waiting(request, 0.1)
            batches.append(await reader.next())
        assert [b.values for b in batches] == [
            [{"n": 0}, {"n": 1}],
            [{"n": 2}, {"n": 3}],
            [{"n": 4}],
        ]
        assert [b.position for b in batches] == [2, 4, 5]
        assert await still_waiting(request, 0.1)
        reader.ask()
        assert (await asyncio.wait_for(request, WAIT)).body == {"accepted": 5}


async def test_the_position_counts_on_from_the_stored_one(client: aiohttp.ClientSession) -> None:
    """A source resumed at position 10 (records that reached the log in an earlier run)
    counts on from it: HTTP input has nothing to replay."""
    async with serving(HttpSource(port=0), position=10) as reader:
        request = posting(client, reader.url, ndjson([1, 2, 3]))
        assert (await reader.next()).position == 13
        reader.ask()
        assert (await request).status == 200
    with pytest.raises(ConnectorError, match="a count of accepted records"):
        await anext(HttpSource(port=0).read("not a count"))


async def test_a_token_is_required_when_set(
    client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a token, a POST without ``Authorization``, with a wrong token or another scheme is
    refused with 401 and ``WWW-Authenticate`` and nothing is taken; the right one is taken.
    Without ``token=`` the ``HEADWATER_HTTP_TOKEN`` environment variable is the token; health
    checks need none."""
    monkeypatch.setenv(TOKEN_VARIABLE, "from-the-environment")
    for source, token in (
        (HttpSource(port=0, token="s3cret"), "s3cret"),
        (HttpSource(port=0), "from-the-environment"),
    ):
        async with serving(source) as reader:
            body = ndjson([{"n": 1}])
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Bearer {token}x"},
                {"Authorization": f"Basic {token}"},
            ):
                refused = await post(client, reader.url, body, headers=headers)
                assert refused.status == 401, headers
                assert refused.headers["WWW-Authenticate"].startswith("Bearer")
                assert "Authorization: Bearer" in refused.body["error"]
            async with client.get(reader.url) as health:
                assert health.status == 200
            request = posting(client, reader.url, body, token=token)
            batch = await reader.next()
            assert batch.values == [{"n": 1}]  # only the authorised request's record
            reader.ask()
            assert (await request).status == 200


async def test_a_body_over_max_body_is_413(client: aiohttp.ClientSession) -> None:
    """A body over ``max_body`` bytes is refused with 413, whether its length is declared or
    it comes chunked; a body of exactly ``max_body`` bytes is taken."""
    async with serving(HttpSource(port=0, max_body=100)) as reader:
        exact = orjson.dumps({"pad": "x" * 90})
        assert len(exact) == 100
        over = orjson.dumps({"pad": "x" * 91})
        refused = await post(client, reader.url, over, JSON)
        assert refused.status == 413
        assert "100 bytes" in refused.body["error"]

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(over), 10):
                yield over[start : start + 10]

        async with client.post(
            reader.url, data=chunked(), headers={"Content-Type": JSON}
        ) as response:
            assert response.status == 413
        request = posting(client, reader.url, exact, JSON)
        assert (await reader.next()).values == [{"pad": "x" * 90}]
        reader.ask()
        assert (await request).status == 200


async def test_a_bad_line_is_400_with_its_number_and_nothing_is_taken(
    client: aiohttp.ClientSession,
) -> None:
    """A request with a malformed NDJSON line is refused with 400 naming the line (counted
    with blank lines) and the parser's error, and none of its good lines is taken; so is
    malformed JSON, a JSON body that is neither an object nor an array, and another content
    type (415). The next good request is the only one in the batch."""
    async with serving(HttpSource(port=0)) as reader:
        bad = await post(client, reader.url, b'{"n": 1}\n\n{"n": 2}\n{"n": 3,,}\n{"n": 4}\n')
        assert bad.status == 400
        assert bad.body["line"] == 4
        assert bad.body["error"].startswith("line 4 is not JSON: ")
        assert "column" in bad.body["error"]
        assert "nothing of this request was taken" in bad.body["error"]
        invalid_utf8 = await post(client, reader.url, b'{"n": 1}\n"\xff"\n')
        assert (invalid_utf8.status, invalid_utf8.body["line"]) == (400, 2)
        malformed = await post(client, reader.url, b'{"n":\n 1', JSON)
        assert malformed.status == 400
        assert malformed.body["line"] == 2
        assert malformed.body["error"].startswith("malformed JSON at line 2, column 3: ")
        scalar = await post(client, reader.url, b"42", JSON)
        assert scalar.status == 400
        assert scalar.body["error"].startswith("the JSON body is 42, not an object")
        assert NDJSON in scalar.body["error"]
        unsupported = await post(client, reader.url, b"n=1", "application/x-www-form-urlencoded")
        assert unsupported.status == 415
        assert JSON in unsupported.body["error"]
        good = posting(client, reader.url, ndjson([{"n": 9}]))
        batch = await reader.next()
        assert (batch.values, batch.position) == ([{"n": 9}], 1)
        reader.ask()
        assert (await good).status == 200


async def test_more_than_max_pending_waiting_records_is_429_with_retry_after(
    client: aiohttp.ClientSession,
) -> None:
    """While ``max_pending`` records wait to reach the log, a request that would add to them is
    refused with 429 and ``Retry-After``, and nothing of it is taken; once the log caught up it
    is taken. A request larger than ``max_pending`` alone is still taken when nothing waits."""
    source = HttpSource(port=0, max_pending=5, batch_size=100, retry_after=3)
    async with serving(source) as reader:
        first = posting(client, reader.url, ndjson(list(range(4))))
        await asyncio.sleep(0.1)
        # 4 are waiting: one more fits, two do not
        refused = await post(client, reader.url, ndjson([10, 11]))
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "3"
        assert "waiting to reach the log" in refused.body["error"]
        assert (await reader.next()).values == [0, 1, 2, 3]  # taken, not yet durable
        second = posting(client, reader.url, ndjson([4]))
        await asyncio.sleep(0.1)
        async with client.get(reader.url) as health:
            assert orjson.loads(await health.read())["pending"] == 5
        assert (await post(client, reader.url, ndjson([12]))).status == 429
        reader.ask()  # the first batch is durable
        assert (await first).status == 200
        batch = await reader.next()
        assert (batch.values, batch.position) == ([4], 5)  # nothing of the refused requests
        reader.ask()
        assert (await second).status == 200
        big = posting(client, reader.url, ndjson(list(range(20))))
        assert len((await reader.next()).values) == 20
        reader.ask()
        assert (await big).body == {"accepted": 20}


async def test_health_answers_get_on_the_path_and_on_health(
    client: aiohttp.ClientSession,
) -> None:
    """GET on the ingest path and on /health is 200 with the records pending and accepted."""
    async with serving(HttpSource(port=0, path="/in")) as reader:
        request = posting(client, reader.url, ndjson([1, 2]))
        await reader.next()
        base = reader.url.removesuffix("/in")
        for url in (reader.url, base + "/health"):
            async with client.get(url) as health:
                assert health.status == 200
                assert orjson.loads(await health.read()) == {
                    "status": "ok",
                    "pending": 2,
                    "accepted": 0,
                }
        reader.ask()
        await request
        async with client.get(base + "/health") as health:
            assert orjson.loads(await health.read())["accepted"] == 2


async def test_a_stop_answers_waiting_requests_with_503(client: aiohttp.ClientSession) -> None:
    """The runtime stops a source by cancelling its task, here while the task is flushing a
    batch (the generator suspended at its yield, not running): the request whose records are
    in that batch, and one queued behind it, get 503 with Retry-After at once, not when the
    generator is collected; then the port is closed."""
    source = HttpSource(port=0)
    flushing = asyncio.Event()

    async def run_source() -> None:
        async for _ in source.read(None):
            flushing.set()
            await asyncio.sleep(3600)  # a flush that never ends

    task = asyncio.create_task(run_source())
    deadline = time.monotonic() + WAIT
    while source.address is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{source.address[1]}/ingest"
    in_flight = posting(client, url, ndjson([1]))
    await asyncio.wait_for(flushing.wait(), WAIT)
    queued = posting(client, url, ndjson([2]))
    assert await still_waiting(queued, 0.1)
    task.cancel()
    answers = await asyncio.wait_for(asyncio.gather(in_flight, queued), WAIT)
    for answer in answers:
        assert answer.status == 503
        assert answer.headers["Retry-After"] == "1"
        assert "send them again" in answer.body["error"]
    with contextlib.suppress(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + WAIT
    while True:  # the server goes away
        try:
            async with client.get(url):
                pass
        except aiohttp.ClientConnectionError:
            break
        assert time.monotonic() < deadline, "the server still answers"
        await asyncio.sleep(0.05)


async def test_closing_the_iterator_answers_503_and_frees_the_port(
    client: aiohttp.ClientSession,
) -> None:
    """Closing the iterator while it waits for records answers the request taken in the
    previous, not yet durable batch with 503 and releases the port for another read()."""
    source = HttpSource(port=0)
    reader = Reader(source)
    await reader.start()
    url = reader.url
    assert source.address is not None
    port = source.address[1]
    request = posting(client, url, ndjson([1]))
    await reader.next()
    reader.ask()  # confirms nothing new: the request was answered...
    assert (await request).status == 200
    request = posting(client, url, ndjson([2]))
    await reader.next()  # ...this one's batch is taken but never confirmed
    await reader.close()
    assert (await asyncio.wait_for(request, WAIT)).status == 503
    assert source.address is None
    async with serving(HttpSource(port=port)) as again:
        assert again.url == url


async def test_a_port_in_use_is_a_connector_error() -> None:
    """A second endpoint on a port that is in use fails with what to do."""
    async with serving(HttpSource(port=0)) as reader:
        assert reader.source.address is not None
        port = reader.source.address[1]
        with pytest.raises(ConnectorError, match=rf"cannot listen on 127\.0\.0\.1:{port}.*port="):
            await anext(HttpSource(port=port).read(None))


async def test_keys_and_timestamps_come_from_the_functions(client: aiohttp.ClientSession) -> None:
    """``key`` gives each record's key and ``timestamp`` its event time (a datetime, an ISO
    string or epoch milliseconds); a record either function fails on (a missing field, a naive
    datetime) refuses its request with 400 naming the record and its line."""

    def stamp(value: dict[str, Any]) -> datetime | str | int:
        at = value["at"]
        return datetime.fromtimestamp(at / 1000, UTC) if value.get("as") == "dt" else at

    source = HttpSource(port=0, key=lambda value: value["user"], timestamp=stamp)
    async with serving(source) as reader:
        values = [
            {"user": "ann", "at": STAMP},
            {"user": "bob", "at": "2023-11-14T22:13:20.001+00:00"},
            {"user": "cy", "at": STAMP + 2, "as": "dt"},
        ]
        missing = await post(client, reader.url, ndjson([*values, {"at": 1}]))
        assert missing.status == 400
        assert missing.body["line"] == 4
        assert "record 4 (line 4): the key function" in missing.body["error"]
        assert "KeyError" in missing.body["error"]
        naive = await post(client, reader.url, ndjson([{"user": "d", "at": "2023-11-14T22:13"}]))
        assert naive.status == 400
        assert "timestamp function" in naive.body["error"]
        array = await post(client, reader.url, orjson.dumps([{"user": "e"}]), JSON)
        assert array.status == 400 and "line" not in array.body
        request = posting(client, reader.url, ndjson(values))
        batch = await reader.next()
        assert batch.keys == ["ann", "bob", "cy"]
        assert batch.timestamps == [STAMP, STAMP + 1, STAMP + 2]
        reader.ask()
        assert (await request).status == 200


# -- HttpSource end to end: headwater run ---------------------------------------------------------

PIPELINE = """
from connectors.files import JsonLinesSink
from connectors.http import HttpSource
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("ingest")
    .source(
        HttpSource("127.0.0.1", {port}, key=lambda value: value["user"]),
        into=Topic("events", partitions=3),
    )
    .sink(JsonLinesSink("out.jsonl"))
)
"""

RECORDS = 10_000
PER_POST = 500


async def post_all(url: str, records: list[dict[str, Any]]) -> None:
    """Post ``records`` as NDJSON, ``PER_POST`` a request, four requests at a time; a request
    that is not answered 200 (refused, dropped, the server not up yet) is sent again."""
    chunks = deque(records[i : i + PER_POST] for i in range(0, len(records), PER_POST))

    async def client(session: aiohttp.ClientSession) -> None:
        while chunks:
            chunk = chunks.popleft()
            for _ in range(200):
                try:
                    async with session.post(
                        url, data=ndjson(chunk), headers={"Content-Type": NDJSON}
                    ) as response:
                        if response.status == 200:
                            assert orjson.loads(await response.read()) == {"accepted": len(chunk)}
                            break
                        await asyncio.sleep(float(response.headers.get("Retry-After", "0.1")))
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("a request was never taken")

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(4)))


def wait_for_health(port: int, run: Cli) -> None:
    """Wait until the runner's endpoint takes connections."""

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port)):
                return True
        except OSError:
            return False

    wait_until(answers, timeout=60, what="the endpoint to answer", watch=[run])


INGEST = ["run", "ingest.py", "--no-progress"]


@pytest.mark.slow
def test_headwater_run_writes_every_acknowledged_record(tmp_path: Path) -> None:
    """``headwater run`` of a pipeline from an HttpSource to a JSON Lines file: 10,000 records
    posted as NDJSON by four concurrent clients all reach the file, each exactly once (as a
    multiset: every request was acknowledged with 200 and none was resent after a 200); then
    Ctrl-C stops the run cleanly."""
    port = free_port()
    (tmp_path / "ingest.py").write_text(textwrap.dedent(PIPELINE.format(port=port)))
    records = [{"user": f"u{n % 17}", "n": n, "tag": "abcdefg"[: n % 8]} for n in range(RECORDS)]
    url = f"http://127.0.0.1:{port}/ingest"
    output = tmp_path / "out.jsonl"
    with background(INGEST, cwd=tmp_path, name="run") as run:
        wait_for_health(port, run)
        asyncio.run(post_all(url, records))
        deadline = time.monotonic() + 60
        while not output.exists() or output.read_bytes().count(b"\n") < RECORDS:
            assert run.running(), run.stderr()
            assert time.monotonic() < deadline, "the output never got every record"
            time.sleep(0.1)
        run.process.send_signal(signal.SIGINT)
        assert run.wait(60) == 128 + signal.SIGINT, run.stderr()
    written = Counter(sorted_json(orjson.loads(line)) for line in output.read_bytes().splitlines())
    assert written == Counter(sorted_json(record) for record in records)


async def post_until_stopped(
    url: str, process: subprocess.Popen[bytes], stop_after: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Four clients post 100-record requests of new records until the endpoint is gone;
    Ctrl-C reaches the runner once ``stop_after`` records were acknowledged. Returns the
    records posted and those acknowledged (200); nothing is sent again."""
    posted: list[dict[str, Any]] = []
    acknowledged: list[dict[str, Any]] = []
    counter = iter(range(1 << 30))
    stopped = False

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal stopped
        while True:
            chunk = [{"user": f"u{n % 17}", "n": n} for n in (next(counter) for _ in range(100))]
            posted.extend(chunk)
            try:
                async with session.post(
                    url, data=ndjson(chunk), headers={"Content-Type": NDJSON}
                ) as response:
                    if response.status == 200:
                        acknowledged.extend(chunk)
                    else:
                        assert response.status in (429, 503), response.status
                        await asyncio.sleep(0.05)
            except aiohttp.ClientConnectionError:
                if stopped:
                    return
                await asyncio.sleep(0.05)
            if not stopped and len(acknowledged) >= stop_after:
                stopped = True
                process.send_signal(signal.SIGINT)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.wait_for(asyncio.gather(*(client(session) for _ in range(4))), 60)
    return posted, acknowledged


@pytest.mark.slow
def test_a_run_stopped_while_clients_post_keeps_every_acknowledged_record(
    tmp_path: Path,
) -> None:
    """Ctrl-C while four clients post: every request answered 200 before the stop has its
    records on the log, so a second run writes all of them to the file (requests answered 503
    or cut off may or may not have reached it: the client's to send again); nothing that was
    not posted appears."""
    port = free_port()
    (tmp_path / "ingest.py").write_text(textwrap.dedent(PIPELINE.format(port=port)))
    url = f"http://127.0.0.1:{port}/ingest"
    output = tmp_path / "out.jsonl"
    with background(INGEST, cwd=tmp_path, name="run") as run:
        wait_for_health(port, run)
        posted, acknowledged = asyncio.run(post_until_stopped(url, run.process, 3000))
        assert run.wait(60) == 128 + signal.SIGINT, run.stderr()
    assert len(acknowledged) >= 3000
    expected = Counter(sorted_json(record) for record in acknowledged)
    with background(INGEST, cwd=tmp_path, name="run") as run:  # the rest of the log, if any
        deadline = time.monotonic() + 60
        while True:
            lines = output.read_bytes().splitlines() if output.exists() else []
            written = Counter(sorted_json(orjson.loads(line)) for line in lines)
            if not expected - written:
                break
            assert run.running(), run.stderr()
            assert time.monotonic() < deadline, f"{sum((expected - written).values())} missing"
            time.sleep(0.2)
        run.process.send_signal(signal.SIGINT)
        run.wait(60)
    assert set(written) <= {sorted_json(record) for record in posted}


# -- WebhookSink ------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """A webhook receiver: records every POST, then answers from ``script`` (an int status,
    a (status, headers) pair, or "drop": close the connection without an answer), 200 once the
    script is used up. ``delay`` seconds pass before each answer."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: deque[int | tuple[int, dict[str, str]] | str] = field(default_factory=deque)
    delay: float = 0.0
    active: int = 0
    most_active: int = 0
    times: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            self.times.append(time.monotonic())
            self.requests.append(
                Received(dict(request.headers), orjson.loads(await request.read()))
            )
            if self.delay:
                await asyncio.sleep(self.delay)
            action = self.script.popleft() if self.script else 200
            if action == "drop":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            status, headers = action if isinstance(action, tuple) else (action, {})
            assert isinstance(status, int)
            return web.Response(status=status, text=f"answer {status}", headers=headers)
        finally:
            self.active -= 1

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    found.url = f"http://127.0.0.1:{port}/hook"
    yield found
    await runner.cleanup()


class WebhookClick(BaseModel):
    user: str
    at: datetime


async def test_batched_posts_carry_json_arrays(receiver: Receiver) -> None:
    """``batch=True`` POSTs JSON arrays of at most ``max_batch`` records on flush (not on
    write), with ``Content-Type: application/json``, the configured headers and an
    idempotency key naming the offsets of each array's records; pydantic models are encoded
    with their serializer."""
    sink = WebhookSink(receiver.url, max_batch=3, headers={"Authorization": "Bearer t"})
    writer = await started(sink, CONTEXT)
    values: list[Any] = [{"n": n} for n in range(6)]
    values.append(WebhookClick(user="ann", at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)))
    writer.write(sink_batch(values, first=100))
    assert receiver.requests == []
    await writer.flush()
    assert receiver.bodies == [
        [{"n": 0}, {"n": 1}, {"n": 2}],
        [{"n": 3}, {"n": 4}, {"n": 5}],
        [{"user": "ann", "at": "2024-01-02T03:04:05Z"}],
    ]
    for request in receiver.requests:
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Authorization"] == "Bearer t"
    assert sorted(receiver.keys()) == [  # type: ignore[type-var]
        "pipe/sink.webhook/t/0/100-102",
        "pipe/sink.webhook/t/0/103-105",
        "pipe/sink.webhook/t/0/106-106",
    ]
    await writer.flush()
    assert len(receiver.requests) == 3  # nothing left to send
    await writer.close()


async def test_per_record_posts_carry_one_record_each(receiver: Receiver) -> None:
    """``batch=False`` POSTs each record alone; records that share an offset (a flat_map) get
    distinct keys, records made on a timer (no offset) get none."""
    writer = await started(WebhookSink(receiver.url, batch=False, concurrency=1), CONTEXT)
    writer.write(
        sink_batch([{"a": 1}, {"a": 2}, {"b": 1}, {"timer": 1}], first=7, origins=[0, 0, 1, -1])
    )
    writer.write(sink_batch(["text", 5]))
    await writer.close()
    assert receiver.bodies == [{"a": 1}, {"a": 2}, {"b": 1}, {"timer": 1}, "text", 5]
    prefix = "pipe/sink.webhook/t/0/"
    assert receiver.keys() == [
        prefix + "7-7",
        prefix + "7-7#1",
        prefix + "8-8",
        None,
        prefix + "100-100",
        prefix + "101-101",
    ]


async def test_a_value_json_cannot_hold_is_unwritable(receiver: Receiver) -> None:
    """``write`` refuses a batch holding a value JSON cannot encode (a set, bytes) with
    UnwritableValue, and buffers nothing of it."""
    writer = await started(WebhookSink(receiver.url), CONTEXT)
    for bad in ({1, 2}, b"bytes"):
        with pytest.raises(UnwritableValue, match="cannot be sent as JSON"):
            writer.write(sink_batch([{"ok": 1}, bad]))
    await writer.close()
    assert receiver.requests == []


async def test_503s_and_a_dropped_connection_are_retried(receiver: Receiver) -> None:
    """Two 503s and a connection closed without an answer are retried, with backoff, until the
    POST succeeds; every attempt carries the same body and idempotency key."""
    receiver.script.extend([503, "drop", 503])
    writer = await started(WebhookSink(receiver.url), CONTEXT)
    writer.write(sink_batch([{"n": 1}, {"n": 2}]))
    await writer.flush()
    assert receiver.bodies == [[{"n": 1}, {"n": 2}]] * 4
    assert set(receiver.keys()) == {"pipe/sink.webhook/t/0/100-101"}
    gaps = [b - a for a, b in zip(receiver.times, receiver.times[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps), gaps  # 0.1 s, 0.2, 0.4 with jitter of -50%
    await writer.close()


async def test_a_4xx_is_permanent_and_names_url_status_and_body(receiver: Receiver) -> None:
    """A 400 is not retried: the flush raises ConnectorError with the URL, the status and the
    start of the answer, and keeps the records it did not deliver (only those): the next flush
    sends only them, under the same idempotency key."""
    receiver.script.extend([400])
    writer = await started(WebhookSink(receiver.url, max_batch=2, concurrency=1), CONTEXT)
    writer.write(sink_batch([1, 2, 3]))
    with pytest.raises(ConnectorError) as raised:
        await writer.flush()
    message = str(raised.value)
    assert receiver.url in message
    assert "400 Bad Request: answer 400" in message
    assert "not retried" in message
    assert receiver.bodies == [[1, 2], [3]]
    await writer.flush()
    assert receiver.bodies == [[1, 2], [3], [1, 2]]
    assert receiver.keys()[0] == receiver.keys()[2] == "pipe/sink.webhook/t/0/100-101"
    await writer.close()


async def test_refusals_say_what_to_do(receiver: Receiver) -> None:
    """A 401, a 404 and a redirect are permanent, each with what to do: the credentials, the
    URL, the URL the redirect names (which is not followed: a POST would become a GET)."""
    receiver.script.extend([401, 404, (307, {"Location": "http://127.0.0.1:1/elsewhere"})])
    writers = []
    for hint in ("check the credentials given in headers=", "check the URL", "redirects to"):
        writer = await started(WebhookSink(receiver.url), CONTEXT)
        writer.write(sink_batch([1]))
        with pytest.raises(ConnectorError, match=hint):
            await writer.flush()
        writers.append(writer)
    for writer in writers:
        await writer.close()  # sends the records again: the receiver takes them now
    assert len(receiver.requests) == 6


async def test_retry_after_is_honoured_up_to_the_cap(receiver: Receiver) -> None:
    """A 429 with ``Retry-After: 1`` is retried after a second (not after the 0.1 s backoff);
    one asking for an hour is retried after ``max_retry_after``."""
    receiver.script.extend([(429, {"Retry-After": "1"}), (503, {"Retry-After": "3600"})])
    writer = await started(WebhookSink(receiver.url, max_retry_after=0.3), CONTEXT)
    writer.write(sink_batch([1]))
    await writer.flush()
    first, second, third = receiver.times
    assert second - first >= 0.29  # capped at 0.3
    assert 0.29 <= third - second < 5
    receiver.script.extend([(429, {"Retry-After": "1"})])
    receiver.times.clear()
    slow = await started(WebhookSink(receiver.url), CONTEXT)
    slow.write(sink_batch([2]))
    await slow.flush()
    assert receiver.times[1] - receiver.times[0] >= 0.95
    await writer.close()
    await slow.close()


async def test_after_max_attempts_the_flush_fails_and_the_same_batch_keeps_its_key(
    receiver: Receiver,
) -> None:
    """A receiver that answers 500 every time makes the flush fail after ``max_attempts``
    attempts, with a ConnectorError saying so; a later flush of the same buffer, and a new
    writer given the same batch (a replay after a restart), send it with the same
    idempotency key."""
    receiver.script.extend([500] * 3)
    writer = await started(WebhookSink(receiver.url, max_attempts=3), CONTEXT)
    batch = sink_batch([{"n": 1}, {"n": 2}])
    writer.write(batch)
    with pytest.raises(ConnectorError, match=r"failed 3 times, the last with 500 .*answer 500"):
        await writer.flush()
    assert len(receiver.requests) == 3
    await writer.flush()
    replay = await started(WebhookSink(receiver.url), CONTEXT)
    replay.write(batch)
    await replay.close()
    assert len(receiver.requests) == 5
    assert set(receiver.keys()) == {"pipe/sink.webhook/t/0/100-101"}
    await writer.close()


async def test_a_request_that_times_out_is_retried(receiver: Receiver) -> None:
    """A receiver slower than ``timeout`` counts as a failed attempt, retried; the error after
    the last attempt says that no answer came in time."""
    receiver.delay = 1.0
    writer = await started(WebhookSink(receiver.url, timeout=0.2, max_attempts=2), CONTEXT)
    writer.write(sink_batch([1]))
    with pytest.raises(ConnectorError, match="failed 2 times, the last with no answer within"):
        await writer.flush()
    assert len(receiver.requests) == 2
    receiver.delay = 0.0
    await writer.close()  # flushes again, in time now
    assert len(receiver.requests) == 3


async def test_concurrent_posts_are_limited(receiver: Receiver) -> None:
    """At most ``concurrency`` POSTs of a writer are in flight at once, and that many are."""
    receiver.delay = 0.05
    writer = await started(WebhookSink(receiver.url, batch=False, concurrency=3), CONTEXT)
    writer.write(sink_batch(list(range(20))))
    await writer.flush()
    assert receiver.most_active == 3
    assert sorted(receiver.bodies) == list(range(20))
    await writer.close()


def test_a_url_that_is_not_http_is_refused() -> None:
    """A URL without http:// or https:// is refused when the sink is made, its password
    hidden."""
    with pytest.raises(ConnectorError, match=r"http:// or https://.*ftp://u:\*\*\*@host"):
        WebhookSink("ftp://u:secret@host/x")
