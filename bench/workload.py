"""The work every benchmark here measures: the input events and the pipeline's two functions.

An event is a small JSON object, half of them clicks::

    {"user": "u123", "url": "/p/42", "kind": "click", "n": 123, "ts": 1700000000000}

The pipeline keeps the clicks and maps each to a smaller dict. ``bench/stateless_pipeline.py``
uses these functions and ``bench/micro_floor.py`` calls them in a bare loop, so both measure the
same Python work.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["clicks_below", "encoded_events", "event", "is_click", "summarize"]

USERS = 10_000
PAGES = 500


def event(n: int, ts: int) -> dict[str, Any]:
    """Event number ``n``, stamped ``ts`` (ms since the epoch)."""
    return {
        "user": f"u{n % USERS}",
        "url": f"/p/{n % PAGES}",
        "kind": "click" if n % 2 == 0 else "view",
        "n": n,
        "ts": ts,
    }


def encoded_events(start: int, count: int, ts: int) -> list[bytes]:
    """Events ``start`` to ``start + count`` as JSON bytes, all stamped ``ts``."""
    dumps = orjson.dumps
    return [dumps(event(n, ts)) for n in range(start, start + count)]


def clicks_below(n: int) -> int:
    """How many of events ``0 .. n - 1`` are clicks (the records that reach the output)."""
    return (n + 1) // 2


def is_click(value: dict[str, Any]) -> bool:
    """The pipeline's filter."""
    return value["kind"] == "click"


def summarize(value: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's map: a smaller dict."""
    return {"user": value["user"], "page": value["url"], "n": value["n"], "ts": value["ts"]}
