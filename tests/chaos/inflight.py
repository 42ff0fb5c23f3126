"""Proof that a chaos test's kills caught work in flight.

A ``kill -9`` proves something about a guarantee only if it lands while its victim has read
records whose offsets it has not committed: a kill between two checkpoints loses nothing
whatever the code does. So the chaos jobs trace what each worker process reads, and the tests
check that the kills caught some of it.

- The trace (:data:`TRACE`, pasted into a job module): the job's first map step records the
  id of every event it is given, and appends them to ``seen/<pid>`` next to the module every
  :data:`EVERY` events and when the process exits. A kill loses at most the last ``EVERY - 1``:
  a trace is a lower bound on what its process read.
- A kill (:class:`Kill`): the pids killed at once, the input offsets committed before the kill
  (at most what the victims had committed) and once they were dead (at least that: it may
  include a new owner's first commits).
- In flight (:func:`in_flight`): the events a victim traced at an offset at or past its
  partition's committed offset after its death: surely read and not committed. Each is read
  again by the partition's next owner (and under at-least-once may be written downstream
  twice).
- :func:`copy_bound`: a replay copies only what a victim read and had not committed: at most
  what it traced at or past the offsets committed before the kill, plus the ``EVERY - 1``
  events its trace may have lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

EVERY = 100
"""Events a worker reads between two appends to its trace."""

TRACE = f'''
import atexit
import os
import time

SEEN = HERE / "seen"
SEEN.mkdir(exist_ok=True)
_read = []


def _write_trace():
    """Append what this process read to seen/<pid>, for the test to see what a kill caught."""
    if _read:
        with open(SEEN / str(os.getpid()), "a") as trace:
            trace.write("".join("%d\\n" % event for event in _read))
        _read.clear()


atexit.register(_write_trace)


def slow(event):
    """Trace the event; every {EVERY} events write the trace and sleep 1 ms, so workers have
    work in hand when they are killed."""
    _read.append(event[ID])
    if len(_read) == {EVERY}:
        _write_trace()
        time.sleep(0.001)
    return event
'''
"""The job's ``slow`` map step with its trace. Needs ``HERE`` (the module's directory) and
``ID`` (the event field that numbers events) defined before it."""


def read_by(directory: Path, pid: int) -> list[int]:
    """The events worker process ``pid`` of the job in ``directory`` traced, in order."""
    path = directory / "seen" / str(pid)
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


def traced_pids(directory: Path) -> list[int]:
    """Every worker process of the job in ``directory`` that traced something."""
    seen = directory / "seen"
    return sorted(int(p.name) for p in seen.iterdir()) if seen.is_dir() else []


def where(
    partitions: Sequence[Iterable[tuple[int, bytes]]], field: str
) -> dict[int, tuple[int, int]]:
    """Event id -> (partition, offset) of its first copy, from the input topic's (offset,
    value) pairs partition by partition."""
    found: dict[int, tuple[int, int]] = {}
    for partition, entries in enumerate(partitions):
        for offset, value in entries:
            found.setdefault(orjson.loads(value)[field], (partition, offset))
    return found


@dataclass(frozen=True)
class Kill:
    """One kill: who died, and bounds on what they had committed."""

    victims: tuple[int, ...]
    committed_before: dict[int, int]
    """Input offsets committed before the kill: at most what the victims had committed."""
    committed_after: dict[int, int]
    """Input offsets committed once the victims were dead: at least what they had."""


def _traced_past(
    directory: Path, kill: Kill, positions: dict[int, tuple[int, int]], committed: dict[int, int]
) -> int:
    """Events a victim of ``kill`` traced at or past the ``committed`` offset of its partition."""
    found = 0
    for pid in kill.victims:
        for event in set(read_by(directory, pid)):
            partition, offset = positions[event]
            found += offset >= committed[partition]
    return found


def in_flight(directory: Path, kill: Kill, positions: dict[int, tuple[int, int]]) -> int:
    """Events a victim of ``kill`` surely read and had not committed when it died."""
    return _traced_past(directory, kill, positions, kill.committed_after)


def copy_bound(
    directory: Path, kills: Sequence[Kill], positions: dict[int, tuple[int, int]]
) -> int:
    """The most copies replays after ``kills`` can make: each event a victim read and had not
    committed is read again once by the next owner; that is at most what it traced past the
    offsets committed before the kill, plus ``EVERY - 1`` events it read and did not trace."""
    return sum(
        _traced_past(directory, kill, positions, kill.committed_before)
        + (EVERY - 1) * len(kill.victims)
        for kill in kills
    )


def describe(directory: Path, kills: Sequence[Kill], positions: dict[int, tuple[int, int]]) -> str:
    """One line per kill: its victims and what they had in flight."""
    return "\n".join(
        f"  kill {i + 1} (pids {', '.join(map(str, k.victims))}): "
        f"{in_flight(directory, k, positions)} events read and not committed"
        for i, k in enumerate(kills)
    )


def wait_for_a_fresh_batch(quiet: Path, timeout: float = 10.0) -> None:
    """Return as a paced source starts to sleep after writing a batch and storing its position
    (its file ``quiet`` appears): the workers are busy with that batch now, the moment to kill
    one of them."""
    deadline = time.monotonic() + timeout
    while quiet.exists():
        assert time.monotonic() < deadline, "the source keeps sleeping"
        time.sleep(0.001)
    while not quiet.exists():
        assert time.monotonic() < deadline, "the source no longer writes batches"
        time.sleep(0.001)


def _trace_size(directory: Path, pid: int) -> int:
    try:
        return (directory / "seen" / str(pid)).stat().st_size
    except FileNotFoundError:
        return 0


def a_busy_worker(directory: Path, pids: Sequence[int], *, within: float) -> int | None:
    """The first of ``pids`` whose trace grows within ``within`` seconds: a worker reading
    records right now (it has more in hand than it traced). None when none does."""
    sizes = {pid: _trace_size(directory, pid) for pid in pids}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for pid, size in sizes.items():
            if _trace_size(directory, pid) > size:
                return pid
        time.sleep(0.0005)
    return None
