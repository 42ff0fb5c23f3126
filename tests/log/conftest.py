"""Fixtures for the log tests: a fresh backend per test, for every backend.

Add a backend by adding a factory to :data:`BACKENDS` (e.g. ``"kafka"`` connecting to the test
broker); every contract test then runs on it too. Tests take their topic and group names from
:func:`names`, so they never collide on a backend whose storage outlives the test.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from support.kafka import KAFKA_BOOTSTRAP

from pipelines.log.base import LogBackend
from pipelines.log.embedded import EmbeddedLog
from pipelines.log.kafka import KafkaLog
from pipelines.log.memory import MemoryLog
from pipelines.settings import KafkaSettings

BackendFactory = Callable[[Path], Awaitable[LogBackend]]


async def _memory(_tmp_path: Path) -> LogBackend:
    return MemoryLog()


async def _embedded(tmp_path: Path) -> LogBackend:
    # small segments: the contract holds across rolls, and purges drop whole segments
    return EmbeddedLog(tmp_path / "embedded", segment_bytes=4096)


async def _kafka(_tmp_path: Path) -> LogBackend:
    return KafkaLog(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))


BACKENDS: dict[str, BackendFactory] = {
    "memory": _memory,
    "embedded": _embedded,
    "kafka": _kafka,
}
"""Backend name -> an async factory of a fresh, empty backend (given a per-test directory)."""


@pytest.fixture(params=list(BACKENDS))
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogBackend]:
    """A fresh log backend, once per backend in :data:`BACKENDS`."""
    backend = await BACKENDS[request.param](tmp_path)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
def names() -> Callable[[str], str]:
    """Makes names unique to this test: ``names("orders")`` -> ``"orders-1a2b3c4d-0"``."""
    run = uuid.uuid4().hex[:8]
    counter = itertools.count()
    return lambda prefix: f"{prefix}-{run}-{next(counter)}"
