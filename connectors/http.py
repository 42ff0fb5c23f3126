"""HTTP connectors: :class:`HttpSource`, an ingest endpoint that feeds a pipeline from POSTed
JSON, and :class:`WebhookSink`, which POSTs a stream's records to a URL. Both need aiohttp
(``pip install 'headwater[http]'``).

**HttpSource** serves ``POST <path>`` (JSON or NDJSON) in the runner for as long as the pipeline
runs, and answers a request with 200 only once every record of it is durable on the log: a
client that got its 200 can forget its records. A client that got anything else (an error, a
503 because the pipeline stopped, a connection that dropped before the answer) must send the
request again: HTTP input cannot be replayed from a stored position, so the client's resend is
the retry. Records of a request that was answered with 503 at a stop, or whose answer was lost,
may already be on the log, and a resend adds them a second time: at-least-once, from the
client's point of view. Give records an id of their own if the pipeline must drop duplicates.

**WebhookSink** POSTs the records a worker flushes, as JSON arrays of up to ``max_batch``
records or one record per request, retrying connection errors, 408, 429 and 5xx answers with
backoff. A flush that fails keeps what it did not deliver, and the runtime does not commit the
input offsets, so the records are sent again: the receiver sees at-least-once delivery. Each
POST carries an ``Idempotency-Key`` header that names the input records it holds (pipeline,
step, topic, partition, first and last offset): the same when a failed flush's records are sent
again, and on a replay that cuts the records into the same batches, so a receiver can drop
repeats it has already taken (see :class:`WebhookSink` for replays cut otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web
from pydantic import BaseModel

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
    int_position,
)
from pipelines.batch import Batch
from pipelines.errors import ConnectorError
from pipelines.record import event_millis

__all__ = ["TOKEN_VARIABLE", "HttpSource", "WebhookSink"]

TOKEN_VARIABLE = "HEADWATER_HTTP_TOKEN"
"""Where :class:`HttpSource` finds its bearer token when ``token=`` is not given."""

JSON = "application/json"
NDJSON = "application/x-ndjson"

KeyFn: TypeAlias = Callable[[Any], Any]
TimestampFn: TypeAlias = Callable[[Any], "datetime | str | int"]

_SHUTDOWN_SECONDS = 5.0
"""How long a stopping HttpSource waits for the requests it is answering to finish."""


def _json_response(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=JSON, headers=headers or None
    )


class _Refused(Exception):
    """A request that is not taken, with its answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class _BadRequest(Exception):
    """A request body that cannot be taken; ``line`` is the NDJSON line (or JSON line) at fault."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


# -- HttpSource ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Intake:
    """The records accepted by the endpoint and not yet durable, and the requests waiting.

    ``queued`` counts every record ever queued and ``durable`` those confirmed on the log; a
    request waits on a future with the value of ``queued`` after its last record, and is
    answered once ``durable`` reaches it (True), or when the source stops (False).
    """

    batch_size: int
    keyed: bool
    stamped: bool
    values: list[Any] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)
    queued: int = 0
    durable: int = 0
    waiters: deque[tuple[int, asyncio.Future[bool]]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False

    @property
    def pending(self) -> int:
        """Records accepted and not yet durable on the log (in a batch in flight, or queued)."""
        return self.queued - self.durable

    def add(
        self, values: list[Any], keys: list[Any] | None, stamps: list[int] | None
    ) -> asyncio.Future[bool]:
        """Queue one request's records; the future says whether they reached the log."""
        self.values += values
        if keys is not None:
            self.keys += keys
        if stamps is not None:
            self.stamps += stamps
        self.queued += len(values)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.append((self.queued, future))
        self.arrived.set()
        return future

    def take(self) -> tuple[list[Any], list[Any] | None, list[int] | None]:
        """The next batch's columns: everything queued, up to ``batch_size`` records."""
        size = self.batch_size
        if len(self.values) <= size:
            values, self.values = self.values, []
            keys, self.keys = self.keys, []
            stamps, self.stamps = self.stamps, []
        else:
            values, keys, stamps = self.values[:size], self.keys[:size], self.stamps[:size]
            del self.values[:size], self.keys[:size], self.stamps[:size]
        if not self.values:
            self.arrived.clear()
        return values, keys if self.keyed else None, stamps if self.stamped else None

    def confirm(self, count: int) -> None:
        """``count`` more records are durable: answer the requests they complete."""
        self.durable += count
        waiters = self.waiters
        while waiters and waiters[0][0] <= self.durable:
            _, future = waiters.popleft()
            if not future.done():
                future.set_result(True)

    def stop(self) -> None:
        """Refuse new requests, and answer the waiting ones with a refusal."""
        self.closing = True
        for _, future in self.waiters:
            if not future.done():
                future.set_result(False)
        self.waiters.clear()


class _Server:
    """The aiohttp server of one :meth:`HttpSource.read`; closing it is idempotent."""

    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner
        self._closed: asyncio.Task[None] | None = None

    def close(self) -> asyncio.Task[None]:
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_task(self.runner.cleanup())
        return self._closed


class _Watch:
    """Stops the endpoint when the task reading the source is cancelled or fails.

    The runtime stops a source by cancelling its task, which may happen while the generator
    is suspended at a yield (its batch being flushed): the generator's ``finally`` would then
    wait until the generator is collected, and the requests waiting would hang until then. So
    the task that last resumed the generator is watched; its end by cancellation or error
    stops the endpoint at once (a task that merely returned, having taken a batch, does not).
    """

    def __init__(self, intake: _Intake, server: _Server) -> None:
        self._intake = intake
        self._server = server
        self._task: asyncio.Task[Any] | None = None

    def follow(self) -> None:
        """Watch the current task (the one resuming the generator)."""
        task = asyncio.current_task()
        if task is not self._task:
            self.release()
            self._task = task
            if task is not None:
                task.add_done_callback(self._ended)

    def release(self) -> None:
        """Watch no task any more."""
        if self._task is not None:
            self._task.remove_done_callback(self._ended)
            self._task = None

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._intake.stop()
            self._server.close()


class HttpSource(Source):
    """A source that serves an ingest endpoint: clients POST JSON records to it.

    The server (aiohttp) listens on ``host:port`` from the start of :meth:`read` until the
    pipeline stops; the source never ends on its own. ``POST <path>`` takes a body of

    * ``Content-Type: application/json``: one JSON object (one record) or a JSON array (one
      record per element);
    * ``Content-Type: application/x-ndjson``: one JSON value per line (blank lines skipped).

    and answers:

    * **200** ``{"accepted": N}`` once the request's records are durable on the log, that is
      when the runtime asks for the batch after the last one holding them;
    * **400** with the first line that is not JSON (its number and the parser's error), or the
      record a ``key`` / ``timestamp`` function failed on: nothing of the request is taken;
    * **401** without ``Authorization: Bearer <token>`` (or with a wrong one) when a token is
      set: ``token=``, else the ``HEADWATER_HTTP_TOKEN`` environment variable of the runner;
    * **413** for a body over ``max_body`` bytes; **415** for another content type;
    * **429** with ``Retry-After`` when more than ``max_pending`` records wait to reach the
      log (the log is behind: the client should slow down and send again);
    * **503** with ``Retry-After`` when the pipeline stops: requests still waiting for their
      records to reach the log get it (some of those records may be on the log already).

    ``GET <path>`` and ``GET /health`` answer 200 ``{"status": "ok", "pending": N,
    "accepted": M}`` without a token, for load balancers (503 ``"stopping"`` once stopping).

    **Position**: the number of records that reached the log. HTTP input cannot be read again,
    so a restarted source only goes on counting from it: a request is the client's to send
    again until it got a 200 (at-least-once from the client's side; a record whose 200 was
    lost, or that got a 503 while stopping, may reach the log twice).

    A batch holds whatever is queued, up to ``batch_size`` records: several requests, or part
    of a large one (whose answer then waits for its last batch). ``key`` maps a value to its
    record key (of the type the topic's key serde takes: a ``str`` by default); ``timestamp``
    to its event time (a tz-aware datetime, an ISO-8601 string with a time zone, or
    milliseconds since the epoch); without it records are stamped when they reach the log.
    ``port=0`` takes a free port; :attr:`address` is where it listens.

    Without a token anyone who reaches the port can write to the pipeline: keep the default
    ``host="127.0.0.1"`` (behind a proxy), or set a token, before listening on other addresses.
    """

    name = "http"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        path: str = "/ingest",
        token: str | None = None,
        max_body: int = 1 << 20,
        max_pending: int = 100_000,
        batch_size: int = 1000,
        key: KeyFn | None = None,
        timestamp: TimestampFn | None = None,
        retry_after: int = 1,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        for what, number in (
            ("max_body", max_body),
            ("max_pending", max_pending),
            ("batch_size", batch_size),
        ):
            if number < 1:
                raise ValueError(f"{what} must be at least 1, got {number}")
        if token == "":
            raise ValueError("token is empty: pass the token clients must send, or None")
        if retry_after < 0:
            raise ValueError(f"retry_after must be seconds (0 or more), got {retry_after}")
        self.host = host
        self.port = port
        self.path = path
        self.token = token
        self.max_body = max_body
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.key = key
        self.timestamp = timestamp
        self.retry_after = retry_after
        self.address: tuple[str, int] | None = None
        """Where the server listens while :meth:`read` runs (the real port for ``port=0``)."""

    def __repr__(self) -> str:
        return f"HttpSource({self.host!r}, {self.port}, path={self.path!r})"

    def _token(self) -> bytes | None:
        token = self.token if self.token is not None else os.environ.get(TOKEN_VARIABLE)
        return token.encode() if token else None

    async def read(self, position: Position | None) -> AsyncIterator[SourceBatch]:
        """Serve the endpoint; a batch of the records accepted since the last one whenever
        there are some. Never ends; closing (or cancelling) it answers the requests still
        waiting with 503 and stops the server."""
        accepted = int_position(position, "an HttpSource", "a count of accepted records")
        intake = _Intake(self.batch_size, self.key is not None, self.timestamp is not None)
        server = await self._serve(intake)
        watch = _Watch(intake, server)
        try:
            while True:
                watch.follow()
                await intake.arrived.wait()
                values, keys, stamps = intake.take()
                accepted += len(values)
                yield SourceBatch(values, accepted, keys, stamps)
                # resumed: the runtime has flushed the batch and stored the position
                intake.confirm(len(values))
        finally:
            watch.release()
            intake.stop()
            self.address = None
            await asyncio.shield(server.close())

    async def _serve(self, intake: _Intake) -> _Server:
        app = web.Application(client_max_size=self.max_body)
        endpoint = _Endpoint(self, intake, self._token())
        app.router.add_post(self.path, endpoint.post)
        app.router.add_get(self.path, endpoint.health)
        if self.path != "/health":
            app.router.add_get("/health", endpoint.health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise ConnectorError(
                f"HttpSource cannot listen on {self.host}:{self.port}: "
                f"{error.strerror or error}; is another process (or another run of this "
                "pipeline) using the port? Stop it or pass another port="
            ) from error
        found = [a for a in runner.addresses if isinstance(a, tuple)]
        self.address = (self.host, int(found[0][1])) if found else (self.host, self.port)
        return _Server(runner)


class _Endpoint:
    """The request handlers of one running :class:`HttpSource`."""

    def __init__(self, source: HttpSource, intake: _Intake, token: bytes | None) -> None:
        self.source = source
        self.intake = intake
        self.token = token

    def _busy(self, status: int, message: str) -> web.Response:
        return _json_response(
            status, {"error": message}, **{"Retry-After": str(self.source.retry_after)}
        )

    def _stopping(self) -> web.Response:
        return self._busy(
            503,
            "the pipeline is stopping and did not take these records; send them again when "
            "it is back",
        )

    def _authorised(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self.token)

    async def health(self, request: web.Request) -> web.Response:
        intake = self.intake
        status = "stopping" if intake.closing else "ok"
        return _json_response(
            503 if intake.closing else 200,
            {"status": status, "pending": intake.pending, "accepted": intake.durable},
        )

    async def post(self, request: web.Request) -> web.Response:
        try:
            values, keys, stamps = await self._records(request)
        except _Refused as refused:
            return refused.response
        if values and not await self.intake.add(values, keys, stamps):
            return self._stopping()  # the answer to the records' future at a stop
        return _json_response(200, {"accepted": len(values)})

    async def _records(
        self, request: web.Request
    ) -> tuple[list[Any], list[Any] | None, list[int] | None]:
        """A request's values, keys and timestamps; :class:`_Refused` with the answer to a
        request that is not taken."""
        source, intake = self.source, self.intake
        if intake.closing:
            raise _Refused(self._stopping())
        if not self._authorised(request):
            raise _Refused(
                _json_response(
                    401,
                    {"error": "send the ingest token as 'Authorization: Bearer <token>'"},
                    **{"WWW-Authenticate": 'Bearer realm="headwater"'},
                )
            )
        if request.content_length is not None and request.content_length > source.max_body:
            raise _Refused(self._too_large())
        kind = request.content_type
        if kind not in (JSON, NDJSON):
            raise _Refused(
                _json_response(
                    415,
                    {
                        "error": f"Content-Type {kind!r} is not taken: send {JSON} (an object "
                        f"or an array of them) or {NDJSON} (one JSON value per line)"
                    },
                )
            )
        if intake.pending >= source.max_pending:
            raise _Refused(self._backlog())
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(self._too_large()) from None
        try:
            values = _parse_json(body) if kind == JSON else _parse_ndjson(body)
            keys = self._keys(values, kind, body)
            stamps = self._stamps(values, kind, body)
        except _BadRequest as bad:
            answer: dict[str, Any] = {"error": bad.message + "; nothing of this request was taken"}
            if bad.line is not None:
                answer["line"] = bad.line
            raise _Refused(_json_response(400, answer)) from None
        if intake.closing:  # stopped while the body was read
            raise _Refused(self._stopping())
        if values and intake.pending and intake.pending + len(values) > source.max_pending:
            raise _Refused(self._backlog())
        return values, keys, stamps

    def _too_large(self) -> web.Response:
        return _json_response(
            413,
            {
                "error": f"the body is over the {self.source.max_body:,} bytes this endpoint "
                "takes: split it into smaller requests"
            },
        )

    def _backlog(self) -> web.Response:
        return self._busy(
            429,
            f"{self.intake.pending:,} records are waiting to reach the log (at most "
            f"{self.source.max_pending:,}): send again after Retry-After seconds",
        )

    def _keys(self, values: list[Any], kind: str, body: bytes) -> list[Any] | None:
        key = self.source.key
        if key is None:
            return None
        keys = []
        for index, value in enumerate(values):
            try:
                keys.append(key(value))
            except Exception as error:
                raise _failed("key", index, kind, body, error) from error
        return keys

    def _stamps(self, values: list[Any], kind: str, body: bytes) -> list[int] | None:
        stamp = self.source.timestamp
        if stamp is None:
            return None
        stamps = []
        for index, value in enumerate(values):
            try:
                stamps.append(event_millis(stamp(value)))
            except Exception as error:
                raise _failed("timestamp", index, kind, body, error) from error
        return stamps


def _failed(what: str, index: int, kind: str, body: bytes, error: Exception) -> _BadRequest:
    """A 400 for the record at ``index`` that the ``what`` function failed on."""
    line = _line_of(index, body) if kind == NDJSON else None
    where = f"record {index + 1}" + (f" (line {line})" if line is not None else "")
    return _BadRequest(
        f"{where}: the {what} function of the source raised {type(error).__name__}: {error}",
        line,
    )


def _line_of(index: int, body: bytes) -> int | None:
    """The line number of NDJSON record ``index`` (blank lines are not records)."""
    for number, line in enumerate(body.split(b"\n"), 1):
        if line.strip():
            if index == 0:
                return number
            index -= 1
    return None


def _parse_json(body: bytes) -> list[Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise _BadRequest(
            f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            error.lineno,
        ) from None
    if isinstance(parsed, dict):
        return [parsed]
    if isinstance(parsed, list):
        return parsed
    start = body.strip()[:40].decode(errors="replace")
    raise _BadRequest(
        f"the JSON body is {start}, not an object (one record) or an array (one record per "
        f"element); send other values as {NDJSON}, one per line"
    )


def _parse_ndjson(body: bytes) -> list[Any]:
    loads = orjson.loads
    lines = body.split(b"\n")
    try:  # the fast path: no blank line but maybe the last one, no bad line
        return [loads(line) for line in lines if line]
    except orjson.JSONDecodeError:
        pass
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append(loads(line))
        except orjson.JSONDecodeError as error:
            raise _BadRequest(
                f"line {number} is not JSON: {error.msg} at column {error.colno}", number
            ) from None
    return values


# -- WebhookSink ---------------------------------------------------------------------------------


def _retry_after(header: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), if it is valid."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(slots=True)
class _Chunk:
    """The records of one POST and its idempotency key (None: not all came from the log)."""

    payloads: list[bytes]
    key: str | None

    def body(self, batched: bool) -> bytes:
        if batched:
            return b"[" + b",".join(self.payloads) + b"]"
        return self.payloads[0]


class _Failed(Exception):
    """A POST that did not succeed: ``permanent`` when retrying cannot help (``hint``: what
    to do then); ``wait`` is the ``Retry-After`` asked for, in seconds."""

    def __init__(
        self, message: str, *, permanent: bool, wait: float | None = None, hint: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.wait = wait
        self.hint = hint


_HINTS = {
    401: "check the credentials given in headers=",
    403: "check the credentials given in headers=",
    404: "check the URL",
    405: "check the URL (it does not take POST)",
    413: "lower max_batch (or send one record a POST: batch=False)",
    415: "check that the receiver takes application/json",
}


class WebhookSink(Sink):
    """A sink that POSTs records as JSON to ``url``.

    With ``batch=True`` each flush sends JSON arrays of up to ``max_batch`` records (records of
    one input partition per array); with ``batch=False`` one POST per record, its JSON as the
    body. Values are encoded with orjson (pydantic models with their own serializer); a value
    JSON cannot hold is refused by ``write`` (:class:`~connectors.base.UnwritableValue`: the
    sink step's error policy applies to its record).

    ``headers`` are sent with every POST (an ``Authorization`` header, say), besides
    ``Content-Type: application/json`` and the idempotency key. Each POST may take ``timeout``
    seconds; at most ``concurrency`` POSTs of a worker run at once (so, with ``concurrency``
    above 1, arrays may arrive out of order; pass 1 to keep the order).

    **Retries.** A connection error, a timeout, a 408, 429 or 5xx answer is tried again, up to
    ``max_attempts`` attempts, after 0.1 s doubling to 5 s, with jitter; a ``Retry-After`` of
    a 429 or 503 is waited instead, up to ``max_retry_after`` seconds. Any other 4xx is
    permanent (the receiver will refuse the records again), and so is a redirect (POST to the
    URL it names instead). Either way the flush raises :class:`~pipelines.errors.ConnectorError`
    with the URL, the status and the start of the answer, and keeps the records it did not
    deliver: the worker stops without committing their input offsets.

    **Delivery is at-least-once**: records of a failed flush are sent again (by a retry of the
    flush, or by the next run, which replays them from the log), also when the receiver got
    them but its answer was lost. Each POST carries ``Idempotency-Key:
    <pipeline>/<step>/<topic>/<partition>/<first offset>-<last offset>`` (``#n`` appended when
    records share an offset, e.g. after a ``flat_map``) naming the input records it holds; the
    same records resent after a failure carry the same key, so a receiver that remembers the
    keys it took can drop the repeats. A replay that cuts batches differently sends other
    ranges: a receiver that must be exact can compare offset ranges by partition instead.
    Records a step emits on a timer (windows closing) have no offset, and their POSTs no key.
    ``idempotency_header=None`` leaves the header out.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        batch: bool = True,
        max_batch: int = 500,
        headers: Mapping[str, str] | None = None,
        max_attempts: int = 5,
        timeout: float = 10.0,
        concurrency: int = 4,
        max_retry_after: float = 30.0,
        idempotency_header: str | None = "Idempotency-Key",
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise ConnectorError(
                f"WebhookSink needs an http:// or https:// URL, got {redacted(url)!r}"
            )
        for what, number in (
            ("max_batch", max_batch),
            ("max_attempts", max_attempts),
            ("concurrency", concurrency),
        ):
            if number < 1:
                raise ValueError(f"{what} must be at least 1, got {number}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        self.url = url
        self.batch = batch
        self.max_batch = max_batch
        self.headers = dict(headers or {})
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_retry_after = max_retry_after
        self.idempotency_header = idempotency_header

    def __repr__(self) -> str:
        mode = "batch" if self.batch else "per record"
        return f"WebhookSink({redacted(self.url)!r}, {mode})"

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer for one worker; it opens its HTTP session in :meth:`SinkWriter.start`."""
        return _WebhookWriter(self, ctx)


@dataclass(slots=True)
class _Segment:
    """Encoded records of one written batch, with their input topic, partition and offsets."""

    topic: str
    partition: int
    payloads: list[bytes]
    offsets: list[int]


class _WebhookWriter(SinkWriter):
    """One worker's HTTP session, records not flushed yet, and POSTs to send again."""

    def __init__(self, sink: WebhookSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._what = f"WebhookSink {redacted(sink.url)!r}"
        self._session: aiohttp.ClientSession | None = None
        self._segments: list[_Segment] = []
        self._undelivered: list[_Chunk] = []
        self._flushing = asyncio.Lock()
        self._slots = asyncio.Semaphore(sink.concurrency)

    async def start(self) -> None:
        """Open the HTTP session (connections are made by the first POST)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._sink.timeout),
                connector=aiohttp.TCPConnector(limit_per_host=self._sink.concurrency),
            )

    def write(self, batch: Batch) -> None:
        dumps = orjson.dumps
        payloads: list[bytes] = []
        append = payloads.append
        try:
            for value in batch.values:
                if isinstance(value, BaseModel):
                    append(value.__pydantic_serializer__.to_json(value))
                else:
                    append(dumps(value, default=json_default))
        except (TypeError, ValueError) as error:
            raise UnwritableValue(
                f"{self._what}: a value cannot be sent as JSON ({error}); map the stream to "
                "dicts, lists, strings, numbers or pydantic models before this sink"
            ) from error
        if payloads:
            fetched = batch.fetched
            offsets = [batch.offset_at(i) for i in range(len(payloads))]
            self._segments.append(_Segment(fetched.topic, fetched.partition, payloads, offsets))

    def _chunks(self) -> list[_Chunk]:
        """The POSTs of the buffered records: runs of one partition's records (all from the
        log, or all made on a timer), cut at ``max_batch`` records (1 without ``batch``)."""
        sink = self._sink
        size = sink.max_batch if sink.batch else 1
        prefix = f"{self._ctx.pipeline}/{self._ctx.step_id}"
        chunks: list[_Chunk] = []
        payloads: list[bytes] = []
        tp: tuple[str, int] = ("", 0)  # the chunk's topic and partition
        first = last = -1  # the offsets of its first and last records (-1: made on a timer)
        first_repeat = 0  # records before its first one with the same offset
        previous: tuple[str, int, int] | None = None
        repeat = 0  # records before this one in a row with the same partition and offset

        def seal() -> None:
            key = None
            if first >= 0:
                key = f"{prefix}/{tp[0]}/{tp[1]}/{first}-{last}"
                if first_repeat:
                    key += f"#{first_repeat}"
            chunks.append(_Chunk(payloads, key))

        for segment in self._segments:
            here = (segment.topic, segment.partition)
            for payload, offset in zip(segment.payloads, segment.offsets, strict=True):
                at = (*here, offset)
                repeat = repeat + 1 if offset >= 0 and at == previous else 0
                previous = at
                if payloads and (
                    here != tp or (offset >= 0) != (first >= 0) or len(payloads) >= size
                ):
                    seal()
                    payloads = []
                if not payloads:
                    tp, first, first_repeat = here, offset, repeat
                payloads.append(payload)
                last = offset
        if payloads:
            seal()
        return chunks

    async def flush(self) -> None:
        """POST everything buffered; on failure keep what was not delivered and raise
        :class:`~pipelines.errors.ConnectorError`."""
        async with self._flushing:
            if not self._segments and not self._undelivered:
                return
            chunks = self._undelivered + self._chunks()
            self._segments = []
            self._undelivered = chunks  # until delivered (a cancelled flush keeps them all)
            if self._session is None:
                await self.start()
            outcomes = await asyncio.gather(
                *(self._deliver(chunk) for chunk in chunks), return_exceptions=True
            )
            self._undelivered = [
                chunk
                for chunk, outcome in zip(chunks, outcomes, strict=True)
                if outcome is not None
            ]
            errors = [outcome for outcome in outcomes if outcome is not None]
            if not errors:
                return
            for error in errors:
                if not isinstance(error, ConnectorError):
                    raise error
            if len(errors) == 1:
                raise errors[0]
            raise ConnectorError(
                f"{errors[0]} ({len(errors)} of the {len(chunks)} POSTs of this flush failed; "
                "this is the first)"
            ) from errors[0]

    async def _deliver(self, chunk: _Chunk) -> None:
        """POST one chunk, retrying what may pass on a later attempt."""
        sink = self._sink
        backoff = Backoff()
        records = f"{len(chunk.payloads):,} record{'s' if len(chunk.payloads) != 1 else ''}"
        for attempt in range(1, sink.max_attempts + 1):
            try:
                async with self._slots:  # not held while waiting to retry
                    await self._post(chunk)
            except _Failed as failed:
                if failed.permanent:
                    raise ConnectorError(
                        f"{self._what}: the receiver refused a POST of {records} with "
                        f"{failed.message}; it is not retried (the answer would be the same): "
                        f"{failed.hint or 'fix the records or the receiver'}, and run the "
                        "pipeline again: the records are sent again from the log"
                    ) from None
                if attempt == sink.max_attempts:
                    raise ConnectorError(
                        f"{self._what}: a POST of {records} failed {attempt} times, the last "
                        f"with {failed.message}; the records stay unsent and their input offsets "
                        "uncommitted, so the next run sends them again: is the receiver up?"
                    ) from None
                await backoff.wait(at_least=min(failed.wait or 0.0, sink.max_retry_after))
            else:
                return

    async def _post(self, chunk: _Chunk) -> None:
        sink, session = self._sink, self._session
        assert session is not None
        headers = {"Content-Type": JSON, **sink.headers}
        if chunk.key is not None and sink.idempotency_header:
            headers[sink.idempotency_header] = chunk.key
        try:
            async with session.post(
                sink.url, data=chunk.body(sink.batch), headers=headers, allow_redirects=False
            ) as response:
                text = (await response.read())[:200].decode("utf-8", errors="replace")
                status = response.status
                reason = response.reason or ""
                retry_after = response.headers.get("Retry-After")
                location = response.headers.get("Location", "")
        except aiohttp.InvalidURL as error:
            raise _Failed(f"an invalid URL: {error}", permanent=True, hint="fix the URL") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            what = "no answer within the timeout" if isinstance(error, TimeoutError) else ""
            raise _Failed(
                what or f"{type(error).__name__}: {error or 'the connection dropped'}",
                permanent=False,
            ) from None
        if 200 <= status < 300:
            return
        answer = f"{status} {reason}".strip() + (f": {' '.join(text.split())}" if text else "")
        if status in (408, 429) or status >= 500:
            wait = _retry_after(retry_after) if status in (429, 503) else None
            raise _Failed(answer, permanent=False, wait=wait)
        hint = _HINTS.get(status, "")
        if 300 <= status < 400:
            hint = f"it redirects to {location!r}: give the sink the URL it names"
        raise _Failed(answer, permanent=True, hint=hint)

    async def close(self) -> None:
        """Flush, then close the HTTP session."""
        try:
            await self.flush()
        finally:
            if self._session is not None:
                session, self._session = self._session, None
                with contextlib.suppress(Exception):
                    await session.close()
