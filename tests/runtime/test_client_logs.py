"""The Kafka client's leftovers stay out of the user's terminal: an exception of one of its
background tasks that nobody retrieved (a fenced producer's send, while its worker stops with
an error Headwater reports itself) is not printed as a traceback after that error; any other
unretrieved exception still is."""

from __future__ import annotations

import asyncio
import gc
import io
import logging

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

        tasks = [asyncio.ensure_future(fenced()), asyncio.ensure_future(ours())]
        await asyncio.sleep(0.01)
        del tasks
        gc.collect()

    try:
        asyncio.run(leave_two_failed_tasks())
    finally:
        asyncio_log.removeHandler(handler)
    assert "ProducerFenced" not in printed.getvalue()
    assert "a bug of ours" in printed.getvalue()
    assert len(asyncio_log.filters) == 1
