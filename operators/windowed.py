"""Windowed aggregation on event time.

State, in the step's keyed state: one entry per ``(key, start, end)`` holding the accumulator,
in the namespace :data:`WINDOWS`, and the partition's watermark in
:data:`~operators._timing.TIME` (state written before namespaces is moved there as it is first
read: :mod:`operators._legacy`). The watermark is the mark the runtime reports for the task's inputs
(the smallest over every upstream writer; see :mod:`pipelines.runtime.watermarks`) minus the
allowed lateness. Records of a batch are judged against the watermark before it; when the mark
moves, every window whose ``end + grace`` the watermark has reached closes (a session once the
watermark has passed it: a record at the watermark is on time and may still touch the
session's end, which merges it in): its final result is emitted then (once; ``emit="update"``
also emits every change before), and its state is deleted.
A record whose every window is already closed is *late*: it goes to the late-data topic
``<pipeline>.<step>.late`` (original bytes) and is counted, never folded in.

Open windows are found for expiry through a heap of their ends, built once from the state after
a restore, so closing windows never scans the state (the heap also counts them, ``pending``).
Results are :class:`WindowResult` values keyed by the record key, timestamped with the window's
end.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from operators._legacy import migrate
from operators._timing import END_OF_TIME, TIME, Emitted, advance, close_at, watermark
from operators.aggregations import Aggregation
from operators.base import Operator, StepContext, reject_call
from operators.stateful import missing_key_error
from operators.windows import Window, Windows
from pipelines.batch import Batch
from pipelines.record import from_millis
from pipelines.state.api import State

__all__ = ["WINDOWS", "EmitMode", "WindowResult", "WindowedAggregate"]

WINDOWS = "windows"
"""The namespace of the open windows' accumulators, by ``(key, start, end)``."""

EmitMode = Literal["close", "update"]
_MISSING = object()


@dataclass(frozen=True, slots=True)
class WindowResult:
    """The aggregate of one key in one window (a dataclass: orjson writes it natively)."""

    key: Any
    start: datetime
    end: datetime
    value: Any
    final: bool
    """True for the result a window emits when it closes (once, in either emit mode); False
    for the updates ``emit="update"`` emits while it is open."""


class WindowedAggregate(Operator):
    """See the module docstring."""

    def __init__(
        self,
        step_id: str,
        windows: Windows,
        aggregation: Aggregation,
        *,
        emit: EmitMode,
        grace_ms: int,
        lateness_ms: int,
    ) -> None:
        super().__init__(step_id)
        self.windows = windows
        self.aggregation = aggregation
        self.emit = emit
        self.grace_ms = grace_ms
        self.lateness_ms = lateness_ms
        self._ends: list[tuple[int, int, Any]] | None = None  # (end, tiebreak, state key)
        self._sessions: dict[Any, list[Window]] = {}
        self._tiebreak = itertools.count()
        self._windows: State | None = None
        self._time: State | None = None

    # -- state helpers -------------------------------------------------------------------------

    def open(self, ctx: StepContext) -> None:
        super().open(ctx)
        self._windows, self._time = ctx.state(WINDOWS), ctx.state(TIME)

    @property
    def pending(self) -> int:
        if self._ends is None:  # not indexed yet (maybe restoring): read nothing into memory
            # (an upper bound: a default namespace holds only state from before namespaces)
            return len(self.ctx.state(WINDOWS)) + len(self.ctx.state())
        if self.windows.merging:
            return sum(map(len, self._sessions.values()))
        return len(self._ends)  # (a fixed window is pushed once, when first stored)

    @property
    def watermark(self) -> int:
        return watermark(self._clock())

    def _state(self) -> State:
        """The open windows' accumulators (namespace :data:`WINDOWS`)."""
        assert self._windows is not None, "used before open()"
        return self._windows

    def _clock(self) -> State:
        """The watermark's namespace (:data:`~operators._timing.TIME`)."""
        assert self._time is not None, "used before open()"
        return self._time

    def _index(self) -> list[tuple[int, int, Any]]:
        """The heap of open windows' ends (and, for sessions, each key's windows)."""
        if self._ends is None:
            migrate(self.ctx, WINDOWS, 3)
            self._ends = []
            for state_key, _ in self._state().items():
                key, start, end = state_key
                self._ends.append((end, next(self._tiebreak), state_key))
                if self.windows.merging:
                    self._sessions.setdefault(key, []).append(Window(start, end))
            heapq.heapify(self._ends)
        return self._ends

    def _open(self, key: Any, window: Window) -> None:
        entry = (window.end, next(self._tiebreak), (key, window.start, window.end))
        heapq.heappush(self._index(), entry)

    # -- processing ----------------------------------------------------------------------------

    def process(self, batch: Batch) -> Batch:
        self._index()
        ctx = self.ctx
        watermark = self.watermark
        grace = self.grace_ms
        emitted = Emitted()
        for index, (key, stamp, value) in enumerate(
            zip(batch.keys, batch.timestamps, batch.values, strict=True)
        ):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            windows = [w for w in self.windows.assign(stamp) if w.end + grace > watermark]
            if not windows:
                ctx.late(batch, index)
                continue
            for window in windows:
                updated = self._fold(batch, index, key, window, value, watermark)
                if updated is not None and self.emit == "update":
                    grown, acc = updated
                    result = self._result(key, grown, acc, final=False)
                    emitted.add(key, result, grown.end, index)
        return emitted.batch(batch)

    def _fold(
        self, batch: Batch, index: int, key: Any, window: Window, value: Any, watermark: int
    ) -> tuple[Window, Any] | None:
        """Fold ``value`` into its window (for sessions, the session it grows or joins), or
        reject the record when the aggregation raises; the state changes only on success."""
        state, aggregation = self._state(), self.aggregation
        absorbed: list[Window] = []
        opened = False
        try:
            if self.windows.merging:
                window, acc, absorbed = self._session_for(key, window, watermark)
            else:
                acc = state.get((key, window.start, window.end), _MISSING)
                opened = acc is _MISSING
                if opened:
                    acc = aggregation.initial()
            acc = aggregation.fold(acc, value)
        except Exception as error:  # a user function failed: routed by the policy
            reject_call(self.ctx, type(aggregation), error, batch, index)
            return None
        if self.windows.merging:
            self._replace_sessions(key, absorbed, window)
        elif opened:
            self._open(key, window)
        state.put((key, window.start, window.end), acc)
        return window, acc

    def _session_for(
        self, key: Any, window: Window, watermark: int
    ) -> tuple[Window, Any, list[Window]]:
        """The session ``window`` grows into, its merged accumulator, and the open sessions of
        the key it absorbs (a session the watermark has closed is not joined any more)."""
        state, aggregation = self._state(), self.aggregation
        open_from = watermark - self.grace_ms  # a session ending there is still open
        touching = [
            s
            for s in self._sessions.get(key, ())
            if s.start <= window.end and window.start <= s.end and s.end >= open_from
        ]
        acc = aggregation.initial()
        start, end = window.start, window.end
        for session in touching:
            acc = aggregation.merge(acc, state.get((key, session.start, session.end)))
            start, end = min(start, session.start), max(end, session.end)
        return Window(start, end), acc, touching

    def _replace_sessions(self, key: Any, absorbed: list[Window], merged: Window) -> None:
        sessions = self._sessions.setdefault(key, [])
        state = self._state()
        for session in absorbed:
            state.delete((key, session.start, session.end))
            sessions.remove(session)
        sessions.append(merged)
        self._open(key, merged)

    def _close_windows(self, batch: Batch, emitted: Emitted, watermark: int) -> int:
        """Emit the final result of, and forget, every window ``watermark`` has passed (in
        ``emit="update"`` mode too: the last record of a window says ``final=True``); returns
        the watermark that closes all of them."""
        ends, state = self._index(), self._state()
        # a fixed window [start, end) is done when the watermark reaches its end; a session,
        # which a record at its end still joins, when the watermark is past it
        past = 1 if self.windows.merging else 0
        limit = watermark - self.grace_ms - past
        needed = 0
        origin = len(batch) - 1
        while ends and ends[0][0] <= limit:
            _, _, state_key = heapq.heappop(ends)
            acc = state.get(state_key, _MISSING)
            if acc is _MISSING:
                continue  # merged into a larger session, or closed already
            key, start, end = state_key
            state.delete(state_key)
            if self.windows.merging:
                self._sessions[key].remove(Window(start, end))
                if not self._sessions[key]:
                    del self._sessions[key]
            emitted.add(key, self._result(key, Window(start, end), acc, final=True), end, origin)
            needed = max(needed, end + self.grace_ms + past)
        return needed

    def _result(self, key: Any, window: Window, acc: Any, *, final: bool) -> WindowResult:
        return WindowResult(
            key=key,
            start=from_millis(window.start),
            end=from_millis(window.end),
            value=self.aggregation.result(acc),
            final=final,
        )

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        """Move the watermark to ``mark`` minus the allowed lateness; close what it passes."""
        self._index()
        emitted = Emitted()
        moved = advance(self._clock(), mark, self.lateness_ms)
        if moved is not None:
            needed = self._close_windows(batch, emitted, moved)
            if moved == END_OF_TIME:
                close_at(self._clock(), needed)
        return emitted.batch(batch)
