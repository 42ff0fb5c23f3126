"""Fixtures for the tests that run pipelines against a real Kafka broker: restarting the
broker for a test, and bringing it back after. The broker itself, and the ``kafka`` and
``kafka_names`` fixtures, are tests/support/kafka.py's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.kafka import KAFKA_BOOTSTRAP, wait_for_broker

KAFKA_SH = Path(__file__).resolve().parents[2] / "scripts" / "kafka.sh"


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
