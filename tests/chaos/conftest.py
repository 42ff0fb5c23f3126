"""Fixtures of the chaos tests: the commands a test starts never outlive it.

Every ``headwater`` command a chaos test starts (``sessions.start``) runs in its own session,
and its worker processes are in that session too. When the test ends, whatever happened in it,
every such session is killed and the test waits until no process of them is left.

The commands run without purges (``HEADWATER_HOUSEKEEPING_SECONDS`` of an hour): the checks
read every record a run wrote to its repartition topic. The Kafka tests use the broker
fixtures of tests/support/kafka.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.cli import Sessions


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    """Where a test starts its commands; all are killed when the test ends."""
    started = Sessions({"HEADWATER_HOUSEKEEPING_SECONDS": "3600"})
    yield started
    left = started.kill_all()
    assert not left, f"processes of the test outlived it even after SIGKILL: {left}"
