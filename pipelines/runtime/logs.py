"""The runner's log: what happens during a run (a worker died, a step stalled, progress every
few seconds), its summary and its errors, through the standard library's :mod:`logging`.

Everything goes to the ``headwater`` logger. :func:`configure` gives it one handler on stderr,
in one of two formats:

- ``text`` (default): ``2026-12-05T20:05:39.123Z WARNING worker 1 was killed ...``; the summary
  and a user error stay plain paragraphs, for people;
- ``json``: one JSON object per line, for log shippers: ``time`` (UTC, ISO 8601), ``level``,
  ``logger``, ``message``, and the fields of the event (a progress line's ``records_per_s``,
  the summary's ``steps``...). Nothing else is written to stderr, so every line parses.

On a terminal without ``json``, the live table shows what the log would (see
:mod:`pipelines.runtime.progress`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["FORMATS", "LEVELS", "LOGGER", "configure", "json_lines", "log"]

LOGGER = logging.getLogger("headwater")
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{_utc(record.created)} {record.levelname} {record.getMessage()}"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send the ``headwater`` logger's records at ``level`` and above to stderr, as ``fmt``."""
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


def json_lines() -> bool:
    """Whether the log is JSON lines (then nothing else may go to stderr)."""
    return any(isinstance(h.formatter, _Json) for h in LOGGER.handlers)


def log(level: int, message: str, fields: Mapping[str, Any] | None = None) -> None:
    """One event of the run, with the ``fields`` a JSON line carries besides the message."""
    LOGGER.log(level, message, extra={"fields": dict(fields or {})})
