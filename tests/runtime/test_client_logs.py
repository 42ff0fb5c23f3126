"""The Kafka client's leftovers stay out of the user's terminal: an exception of one of its
background tasks that nobody retrieved (a fenced producer's send, while its worker stops with
an error Headwater reports itself) is not printed as a traceback after that error; any other
unretrieved exception still is."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from aiokafka.errors import ProducerFenced

from pipelines.runtime.runner import quiet_clients


def test_only_the_kafka_clients_unretrieved_exceptions_are_dropped() -> None:
    quiet_clients()
    quiet_clients()  # once is enough: no second filter
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)

    async def leave_two_failed_tasks() -> None:
        async def fenced() -> None:
            raise ProducerFenced()

        async def ours() -> None:
            raise ValueError("a bug of ours")

        tasks = [
            asyncio.ensure_future(fenced()),
            asyncio.ensure_future(ours()),
            asyncio.ensure_future(_read_of_a_refused_connection()),
        ]
        await asyncio.sleep(0.01)
        del tasks
        gc.collect()

    try:
        asyncio.run(leave_two_failed_tasks())
    finally:
        asyncio_log.removeHandler(handler)
    assert "ProducerFenced" not in printed.getvalue()
    assert "bad certificate" not in printed.getvalue()
    assert "a bug of ours" in printed.getvalue()
    assert len(asyncio_log.filters) == 1


def _client_read() -> Callable[[], Awaitable[None]]:
    """A coroutine function defined in the client's module, as its connection's read task is:
    the TLS alert of a broker that refused the client's certificate is raised there as an
    ``ssl.SSLError``, an exception type that is not the client's own."""
    namespace: dict[str, object] = {}
    code = "async def read():\n    raise ssl.SSLError(1, 'sslv3 alert bad certificate')\n"
    exec(code, {"__name__": "aiokafka.conn", "ssl": ssl}, namespace)
    return cast("Callable[[], Awaitable[None]]", namespace["read"])


async def _read_of_a_refused_connection() -> None:
    await _client_read()()
