"""Waiting between attempts at a service that failed in a way that may pass."""

from __future__ import annotations

import asyncio
import random

__all__ = ["Backoff"]

FIRST = 0.1
"""Seconds before the second attempt."""
LONGEST = 5.0
"""The longest wait between two attempts."""


class Backoff:
    """Waits that double from :data:`FIRST` to :data:`LONGEST` seconds, each with jitter (half
    to one and a half of it, so that many clients do not come back at once), for up to
    ``retry_for`` seconds in all (``None``: no limit of time)."""

    def __init__(self, retry_for: float | None = None) -> None:
        self._delay = FIRST
        self._deadline = None if retry_for is None else _now() + retry_for

    async def wait(self, at_least: float = 0.0) -> bool:
        """Wait before the next attempt (``at_least`` seconds, when the service said how long);
        False, without waiting, when that would pass the time allowed."""
        delay = max(self._delay * (0.5 + random.random()), at_least)
        if self._deadline is not None and _now() + delay > self._deadline:
            return False
        await asyncio.sleep(delay)
        self._delay = min(self._delay * 2, LONGEST)
        return True


def _now() -> float:
    return asyncio.get_running_loop().time()
