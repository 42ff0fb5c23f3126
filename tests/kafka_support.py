"""The Kafka broker of the tests, shared by every directory that uses it.

The broker is the one ``bash scripts/kafka.sh start`` runs (scripts/test.sh starts it), found
through ``HEADWATER_TEST_KAFKA`` (default ``127.0.0.1:9092``). A test that needs it **fails**
when it does not answer: a skipped Kafka test would hide a broken backend.

The broker is shared by every test (and by anyone else using it at the same time), and what is
on it outlives a test, so each test takes its topic, pipeline and group names from the
``kafka_names`` fixture, which makes them unique; the topics of a test that passed are deleted
afterwards (those of a failed test stay, for a post-mortem). The fixtures ``kafka`` and
``kafka_names`` and the hook that tells a passed test are registered by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Generator, Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

KAFKA_BOOTSTRAP = os.environ.get("HEADWATER_TEST_KAFKA", "127.0.0.1:9092")

_PROBE_TIMEOUT = 30.0
"""Seconds to wait for the broker to answer (it may be restarting for another test)..."""
_PROBE_TIMEOUT_ONCE_DOWN = 3.0
"""... or once it has failed to answer in this session: the next tests then fail fast."""
_seen_down = False


async def _probe(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        if not cluster.get("brokers"):
            raise RuntimeError("the cluster metadata lists no brokers")
        await admin.find_coordinator("headwater-test-probe")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _wait_for_broker(bootstrap: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await asyncio.wait_for(_probe(bootstrap), 10)
        except Exception as error:
            if loop.time() > deadline:
                raise RuntimeError(f"{type(error).__name__}: {error}") from error
            await asyncio.sleep(0.5)
        else:
            return


def wait_for_broker(bootstrap: str = KAFKA_BOOTSTRAP, timeout: float | None = None) -> None:
    """Return once the broker answers a real client; fail the test if it does not in time."""
    global _seen_down  # noqa: PLW0603
    if timeout is None:
        timeout = _PROBE_TIMEOUT_ONCE_DOWN if _seen_down else _PROBE_TIMEOUT
    try:
        asyncio.run(_wait_for_broker(bootstrap, timeout))
    except RuntimeError as error:
        _seen_down = True
        pytest.fail(
            f"no Kafka broker answers at {bootstrap} (HEADWATER_TEST_KAFKA) within "
            f"{timeout:.0f}s: {error}; start one with `bash scripts/kafka.sh start`",
            pytrace=False,
        )
    _seen_down = False


@pytest.fixture
def kafka() -> str:
    """The bootstrap address of the test broker, once it answers (the test fails otherwise)."""
    wait_for_broker()
    return KAFKA_BOOTSTRAP


class Names:
    """Names unique to one test: ``names("orders")`` -> ``"orders-1a2b3c4d5e"``."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:10]

    def __call__(self, prefix: str) -> str:
        return f"{prefix}-{self.run}"


async def delete_topics_of(bootstrap: str, run: str) -> None:
    """Delete the topics on ``bootstrap`` whose names contain ``run`` (a test's own)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), 10)
        mine = [t for t in await admin.list_topics() if run in t]
        if mine:
            await asyncio.wait_for(admin.delete_topics(mine), 20)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[PASSED] = report.passed
    return report


@pytest.fixture
def kafka_names(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Unique topic/pipeline/group names for this test; its topics go once it has passed."""
    names = Names()
    yield names
    if request.node.stash.get(PASSED, False):
        with contextlib.suppress(Exception):
            asyncio.run(delete_topics_of(KAFKA_BOOTSTRAP, names.run))
