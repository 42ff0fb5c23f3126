"""The work all three frameworks do in ``bench/kafka/compare.py``: the events and two functions.

An input event is a small JSON object; every other one is a click::

    {"user": "u42", "url": "/p/42", "kind": "click", "n": 42, "ts": 1700000000000}

Each framework keeps the clicks (:func:`is_click`) and writes :func:`summarize` of each as
JSON. ``ts`` is the wall-clock ms when the event was produced and survives the map, so the
latency phase reads it back from the output record.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["clicks_below", "encode_events", "is_click", "summarize"]

USERS = 10_000
PAGES = 500


def _event(n: int, ts: int) -> dict[str, Any]:
    return {
        "user": f"u{n % USERS}",
        "url": f"/p/{n % PAGES}",
        "kind": "click" if n % 2 == 0 else "view",
        "n": n,
        "ts": ts,
    }


def encode_events(start: int, count: int, ts: int) -> list[bytes]:
    """Events ``start .. start + count - 1`` as JSON, all stamped ``ts`` (ms since the epoch)."""
    dumps = orjson.dumps
    return [dumps(_event(n, ts)) for n in range(start, start + count)]


def clicks_below(n: int) -> int:
    """How many of events ``0 .. n - 1`` are clicks: the records that reach the output."""
    return (n + 1) // 2


def is_click(value: dict[str, Any]) -> bool:
    """The filter."""
    return bool(value["kind"] == "click")


def summarize(value: dict[str, Any]) -> dict[str, Any]:
    """The map: a smaller dict that keeps the producer's stamp."""
    return {"user": value["user"], "page": value["url"], "n": value["n"], "ts": value["ts"]}
