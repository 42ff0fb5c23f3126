"""Event-time windows for ``notebooks/windows-and-late-data.ipynb``: the events of an app's
users, counted per user in tumbling, hopping and session windows.

    headwater run examples/notebooks/windows.py:tumbling   # events per user and minute
    headwater run examples/notebooks/windows.py:hopping    # per user, 2 minutes every 30 s
    headwater run examples/notebooks/windows.py:sessions   # per user session (30 s gap)

Each reads ``events.jsonl`` (``WINDOWS_INPUT`` overrides it) into the 2-partition topic
``events``, keyed by user, and takes each event's time from its ``ts`` field (``time=``), not
from when it is processed. Events come up to 5 s out of order, so every window waits until
the events read have passed its end by ``lateness`` (10 s) before it closes; an event that
comes after its window closed goes to the step's late-data topic (``<pipeline>.count.late``),
never folded in. Each closed window becomes one line of ``out/<pipeline>.jsonl``
(``WINDOWS_OUTPUT`` overrides ``out``).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import connectors
from operators.windowed import WindowResult
from operators.windows import Hopping, Session, Tumbling, Windows
from pipelines import Pipeline, Topic

EVENTS = os.environ.get("WINDOWS_INPUT", "data/events.jsonl")
OUT = Path(os.environ.get("WINDOWS_OUTPUT", "out"))
LATENESS = timedelta(seconds=10)
MINUTE = Tumbling(minutes=1)
TWO_MINUTES_EVERY_30S = Hopping(timedelta(minutes=2), advance=timedelta(seconds=30))
SESSION_GAP = Session(timedelta(seconds=30))


class Event(BaseModel):
    """One line of the input: a user did something at ``ts``."""

    user: str
    ts: datetime
    action: str


def row(window: WindowResult) -> dict[str, Any]:
    """A closed window as a line: the user, the window and its count."""
    return {
        "user": window.key,
        "start": window.start.isoformat(),
        "end": window.end.isoformat(),
        "events": window.value,
    }


def counted(name: str, windows: Windows) -> Pipeline:
    """Events per user in ``windows`` of event time, one line per closed window."""
    return (
        Pipeline(name)
        .source(
            connectors.JsonLines(EVENTS, key=lambda line: line["user"]),
            into=Topic("events", partitions=2, value=Event),
        )
        .window("windows", windows, time=lambda event: event.ts, lateness=LATENESS)
        .count("count")
        .map("row", row)
        .sink(connectors.JsonLinesSink(OUT / f"{name}.jsonl"), step_id="file")
    )


tumbling = counted("per-minute", MINUTE)
hopping = counted("per-2-minutes", TWO_MINUTES_EVERY_30S)
sessions = counted("sessions", SESSION_GAP)
