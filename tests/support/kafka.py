"""The Kafka broker of the tests, its fixtures, and plain aiokafka clients to look at it.

The broker is the one ``bash scripts/kafka.sh start`` runs (scripts/test.sh starts it), found
through ``HEADWATER_TEST_KAFKA`` (default ``127.0.0.1:9092``). A test that needs it **fails**
when it does not answer: a skipped Kafka test would hide a broken backend.

The broker is shared by every test (and by anyone else using it at the same time), and what is
on it outlives a test, so each test takes its topic, pipeline and group names from the
``kafka_names`` fixture, which makes them unique; the topics of a test that passed are deleted
afterwards (those of a failed test stay, for a post-mortem). tests/conftest.py registers this
module as a plugin: its fixtures ``kafka`` and ``kafka_names`` and the hook that tells a passed
test are every directory's.

The clients (:func:`admin`, :func:`consumer` and the functions built on them) look at topics and
groups as any other Kafka user would, from synchronous test code; :func:`create_topic_async` is
the one a test already on an event loop awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

__all__ = [
    "KAFKA_BOOTSTRAP",
    "admin",
    "committed_offsets",
    "consumer",
    "create_topic",
    "create_topic_async",
    "delete_topics_of",
    "end_offsets",
    "kafka",
    "kafka_names",
    "probe",
    "pytest_runtest_makereport",
    "wait_for_broker",
]

KAFKA_BOOTSTRAP = os.environ.get("HEADWATER_TEST_KAFKA", "127.0.0.1:9092")

_PROBE_TIMEOUT = 30.0
"""Seconds to wait for the broker to answer (it may be restarting for another test)..."""
_PROBE_TIMEOUT_ONCE_DOWN = 3.0
"""... or once it has failed to answer in this session: the next tests then fail fast."""
_seen_down = False


async def probe(connect: Callable[[], AIOKafkaAdminClient], group: str) -> None:
    """Return once an admin client ``connect()`` makes gets a real answer: the cluster's brokers
    and the coordinator of ``group``; raise otherwise. The client is closed either way."""
    client = connect()
    try:
        await client.start()
        cluster = await client.describe_cluster()
        if not cluster.get("brokers"):
            raise RuntimeError("the cluster metadata lists no brokers")
        await client.find_coordinator(group)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def _admin_client(bootstrap: str) -> AIOKafkaAdminClient:
    """An admin client of ``bootstrap`` that gives up on a request after 5 s (not started)."""
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)


async def _wait_for_broker(bootstrap: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await asyncio.wait_for(
                probe(lambda: _admin_client(bootstrap), "headwater-test-probe"), 10
            )
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


class _Names:
    """Names unique to one test: ``names("orders")`` -> ``"orders-1a2b3c4d5e"``."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:10]

    def __call__(self, prefix: str) -> str:
        return f"{prefix}-{self.run}"


_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


@pytest.fixture
def kafka_names(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Unique topic/pipeline/group names for this test; its topics go once it has passed."""
    names = _Names()
    yield names
    if request.node.stash.get(_PASSED, False):
        with contextlib.suppress(Exception):
            asyncio.run(delete_topics_of(KAFKA_BOOTSTRAP, names.run))


# -- clients -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client of ``bootstrap``."""
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await asyncio.wait_for(client.start(), 30)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def consumer(
    bootstrap: str, isolation_level: str = "read_uncommitted"
) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer of ``bootstrap`` in no group, reading from the earliest offsets."""
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await asyncio.wait_for(client.start(), 30)
    try:
        yield client
    finally:
        await client.stop()


async def create_topic_async(bootstrap: str, name: str, partitions: int, **configs: str) -> None:
    """Create topic ``name`` with the topic ``configs`` (``**{"cleanup.policy": "compact"}``);
    return once the broker describes it with its partitions."""
    async with admin(bootstrap) as client:
        await client.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
        for _ in range(100):
            [found] = await client.describe_topics([name])
            if not found["error_code"] and len(found["partitions"]) == partitions:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {name} did not appear")


def create_topic(bootstrap: str, name: str, partitions: int, **configs: str) -> None:
    """:func:`create_topic_async`, from synchronous test code."""
    asyncio.run(create_topic_async(bootstrap, name, partitions, **configs))


def end_offsets(
    bootstrap: str, name: str, partitions: int, isolation_level: str = "read_uncommitted"
) -> dict[int, int]:
    """Partition -> end offset of topic ``name`` (its records and markers; with
    ``read_committed``, the last stable offset); 0 each while the topic does not exist."""

    async def fetch() -> dict[int, int]:
        async with consumer(bootstrap, isolation_level) as client:
            if name not in await client.topics():
                return dict.fromkeys(range(partitions), 0)
            tps = [TopicPartition(name, p) for p in range(partitions)]
            ends = await client.end_offsets(tps)
        return {tp.partition: ends[tp] for tp in tps}

    return asyncio.run(asyncio.wait_for(fetch(), 60))


def committed_offsets(bootstrap: str, group: str, name: str, partitions: int) -> dict[int, int]:
    """The offsets group ``group`` has committed on topic ``name`` (0 where none)."""

    async def fetch() -> dict[int, int]:
        async with admin(bootstrap) as client:
            tps = [TopicPartition(name, p) for p in range(partitions)]
            found = await client.list_consumer_group_offsets(group, partitions=tps)
        return {p: max(0, found[tp].offset) if tp in found else 0 for p, tp in enumerate(tps)}

    return asyncio.run(asyncio.wait_for(fetch(), 60))


async def delete_topics_of(bootstrap: str, run: str) -> None:
    """Delete the topics on ``bootstrap`` whose names contain ``run`` (a test's own)."""
    client = _admin_client(bootstrap)
    try:
        await asyncio.wait_for(client.start(), 10)
        mine = [t for t in await client.list_topics() if run in t]
        if mine:
            await asyncio.wait_for(client.delete_topics(mine), 20)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
