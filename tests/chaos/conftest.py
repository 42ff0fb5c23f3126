"""Fixtures of the chaos tests: the commands a test starts never outlive it, and the Kafka broker.

Every ``headwater`` command a chaos test starts runs in its own session (process group), and its
worker processes are in that session too. :func:`sessions` kills every such session at the end
of the test, whatever happened in it, and waits until no process of them is left.

The Kafka tests use the broker of ``bash scripts/kafka.sh start``, found through
``HEADWATER_TEST_KAFKA`` (default ``127.0.0.1:9092``); a test that needs it fails when it does not
answer. Names on the broker are unique per test (:func:`kafka_names`); the topics of a test that
passed are deleted afterwards, those of a failed one stay for a post-mortem.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from processes import stat_fields

KAFKA_BOOTSTRAP = os.environ.get("HEADWATER_TEST_KAFKA", "127.0.0.1:9092")

_PROBE_TIMEOUT = 30.0


class Sessions:
    """The sessions of the commands one test started (each session id is its leader's pid)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def add(self, session: int) -> None:
        self.ids.append(session)

    def alive(self) -> list[int]:
        """The live (not zombie) processes of these sessions, whoever their parent is now."""
        if not self.ids:
            return []
        wanted = {str(s) for s in self.ids}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[3] in wanted and fields[0] != "Z":
                found.append(int(entry.name))
        return sorted(found)

    def kill_all(self, timeout: float = 15.0) -> list[int]:
        """SIGKILL every process of these sessions; returns those still alive after
        ``timeout`` seconds (none, normally)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.alive()
            if not left or time.monotonic() > deadline:
                return left
            for session in self.ids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(session, signal.SIGKILL)
            for pid in left:  # a process that left its group still belongs to its session
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    """Where a test registers the sessions it starts; all are killed when the test ends."""
    started = Sessions()
    yield started
    left = started.kill_all()
    assert not left, f"processes of the test outlived it even after SIGKILL: {left}"


# -- the Kafka broker ----------------------------------------------------------------------------


async def _probe(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        if not cluster.get("brokers"):
            raise RuntimeError("the cluster metadata lists no brokers")
        await admin.find_coordinator("headwater-chaos-probe")
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


@pytest.fixture
def kafka() -> str:
    """The bootstrap address of the test broker, once it answers (the test fails otherwise)."""
    try:
        asyncio.run(_wait_for_broker(KAFKA_BOOTSTRAP, _PROBE_TIMEOUT))
    except RuntimeError as error:
        pytest.fail(
            f"no Kafka broker answers at {KAFKA_BOOTSTRAP} (HEADWATER_TEST_KAFKA) within "
            f"{_PROBE_TIMEOUT:.0f}s: {error}; start one with `bash scripts/kafka.sh start`",
            pytrace=False,
        )
    return KAFKA_BOOTSTRAP


async def _delete_topics_of(bootstrap: str, run: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), 10)
        mine = [t for t in await admin.list_topics() if run in t]
        if mine:
            await asyncio.wait_for(admin.delete_topics(mine), 20)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


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
    """``kafka_names("chaos")`` -> ``"chaos-1a2b3c4d5e"``: names unique to this test; its topics
    are deleted once it has passed."""
    run = uuid.uuid4().hex[:10]

    def name(prefix: str) -> str:
        return f"{prefix}-{run}"

    yield name
    if request.node.stash.get(_PASSED, False):
        with contextlib.suppress(Exception):
            asyncio.run(_delete_topics_of(KAFKA_BOOTSTRAP, run))
