"""Fixtures for the tests that run pipelines against a real Kafka broker.

The broker is the one ``bash scripts/kafka.sh start`` runs (scripts/test.sh starts it), found
through ``HEADWATER_TEST_KAFKA`` (default ``127.0.0.1:9092``). A test that needs it **fails**
when it does not answer: a skipped Kafka test would hide a broken backend.

The broker is shared by every test (and by anyone else using it at the same time), and what is
on it outlives a test, so each test takes its topic, pipeline and group names from
:func:`kafka_names`, which makes them unique; the topics of a test that passed are deleted
afterwards (those of a failed test stay, for a post-mortem).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

KAFKA_BOOTSTRAP = os.environ.get("HEADWATER_TEST_KAFKA", "127.0.0.1:9092")
KAFKA_SH = Path(__file__).resolve().parents[2] / "scripts" / "kafka.sh"

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
    """Unique topic/pipeline/group names for this test; its topics go once it has passed."""
    names = Names()
    yield names
    if request.node.stash.get(_PASSED, False):
        with contextlib.suppress(Exception):
            asyncio.run(_delete_topics_of(KAFKA_BOOTSTRAP, names.run))


# -- restarting the broker ---------------------------------------------------------------------


def _kafka_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    port = KAFKA_BOOTSTRAP.rpartition(":")[2]
    return subprocess.run(
        ["bash", str(KAFKA_SH), *args],
        env={**os.environ, "KAFKA_PORT": port, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _status() -> int:
    try:
        return _kafka_sh("status", timeout=60).returncode
    except subprocess.TimeoutExpired:
        return 1


def _restore_broker(timeout: float = 150.0) -> None:
    """Bring the broker back after a test restarted it: wait for ``kafka.sh status`` to say
    ready; start it again on its data if it is not running at all."""
    deadline = time.monotonic() + timeout
    restarted = False
    while True:
        code = _status()
        if code == 0:
            break
        if code == 3 and not restarted:  # stopped: the restart failed half-way
            restarted = True
            _kafka_sh("restart-broker", timeout=150)
            continue
        if time.monotonic() > deadline:
            pytest.fail(f"the test broker is not ready again (kafka.sh status: {code})")
        time.sleep(1.0)
    wait_for_broker(timeout=60)


@pytest.fixture
def restart_broker(kafka: str) -> Iterator[Callable[[], subprocess.CompletedProcess[str]]]:
    """``restart_broker()`` runs ``bash scripts/kafka.sh restart-broker`` (SIGTERM, then a new
    broker on the same data). The broker is ready again before the test ends, whatever happens
    in the test."""
    host = kafka.rpartition(":")[0]
    if host not in ("127.0.0.1", "localhost"):
        pytest.fail(
            f"this test restarts the broker with scripts/kafka.sh, which runs it on 127.0.0.1; "
            f"HEADWATER_TEST_KAFKA={kafka} is another one",
            pytrace=False,
        )

    def restart() -> subprocess.CompletedProcess[str]:
        return _kafka_sh("restart-broker", timeout=180)

    try:
        yield restart
    finally:
        _restore_broker()
