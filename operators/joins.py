"""Joins: a stream with a table (``join_table``) and two streams within a time bound
(``join_stream``).

A join is an operator with two inputs and one output (:class:`~operators.base.Ports`): side 0,
the stream the join was declared on (the *left* side, whose key the results carry), and side 1,
the table or the other stream. The runtime tells it the side a batch arrived on as it tells any
operator with several inputs: ``process_ports(side, batch)``, which returns the join's one
output batch. Both inputs must be keyed the same way and co-partitioned, so the records of one
key meet in one task.

**Stream-table.** The table is a :class:`~pipelines.state.table.TableStore` the runtime
bootstraps from the table topic when the task is assigned and gives the step as ``ctx.table``;
the join keeps it up to date with the table records it receives on its second input. Each
stream record is looked up by its key: ``merge(value, row)`` when the key has a row; otherwise
an inner join drops the record and a left join emits ``merge(value, None)``. Results keep the
stream record's key and timestamp. Table records are applied in the order they are read: a
stream record sees the table as of the table records processed before it (no synchronisation
by timestamp between the two topics).

**Stream-stream.** Records of the two sides join when their keys are equal and their event times
(record timestamps) differ by at most ``within``. Each side's records wait in the step's state, one
entry per record under ``(side, key, time, seq)`` in the namespace :data:`JOINED` (the watermark is
in :data:`~operators._timing.TIME`; state written before namespaces is moved there as it is first
read: :mod:`operators._legacy`), until the partition's watermark (the event-time mark of the task's
inputs, the smaller of the two sides; see :mod:`pipelines.runtime.watermarks`) passes their time +
``within`` + ``grace``; then they expire. Every matching pair is emitted once, by whichever of the
two records arrives second, as ``merge(left, right)`` with the later of the two timestamps. With
``how="left"`` a left record that expires without having met a right record emits
``merge(left, None)`` then, at its own timestamp. A record whose time plus ``grace`` is behind the
watermark is *late* (partners it could meet may have expired): it goes to the late-data topic
``<pipeline>.<step>.late`` and joins nothing. When both inputs are exhausted, or idle (see the
runtime), waiting left records are emitted without new data.

Stored values are JSON: a record's value is kept as its JSON form (a pydantic model as
``model_dump(mode="json")``; a value that is not JSON-serialisable is rejected by the step's
error policy), and ``merge`` always receives that JSON form, also after a restart restored it,
except on a side read untransformed from a topic whose value serde is a pydantic model: there
``merge`` receives the model (validated again from its JSON after a restore). Record keys must
be JSON-serialisable too (lists come back as tuples).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from operators._legacy import migrate
from operators._timing import END_OF_TIME, TIME, Emitted, advance, close_at, watermark
from operators.base import Operator, Ports, StepContext, reject_call
from operators.stateful import missing_key_error
from pipelines.batch import Batch
from pipelines.errors import StepError
from pipelines.state.api import State
from pipelines.state.store import decode_key, encode_key

__all__ = ["JOINED", "JoinHow", "StreamJoin", "TableJoin"]

JOINED = "joined"
"""The namespace of the records a stream join holds, by ``(side, key, time, seq)``."""

JoinHow = Literal["inner", "left"]
LEFT, RIGHT = 0, 1


# -- stream-table ------------------------------------------------------------------------------


class TableJoin(Operator):
    """Look each stream record's key up in a table (see the module docstring)."""

    ports = Ports(inputs=("stream", "table"))

    def __init__(self, step_id: str, merge: Callable[[Any, Any], Any], how: JoinHow) -> None:
        super().__init__(step_id)
        self.merge = merge
        self.how = how

    def process_ports(self, side: int, batch: Batch) -> tuple[Batch]:
        """What the step emits for ``batch`` arriving on ``side`` (a table batch: nothing)."""
        if side == RIGHT:
            self.ctx.table.apply(batch)
            return (batch.take([]),)
        ctx, merge = self.ctx, self.merge
        table = ctx.table
        inner = self.how == "inner"
        results: list[Any] = []
        kept: list[int] = []
        for index, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            try:
                row = table.get(key)
            except (TypeError, ValueError) as error:
                rejection = StepError(
                    f"the key {key!r} does not fit the key serde {table.topic.key_serde!r} of "
                    f"table {table.topic.name!r}: {error}",
                    step=self.step_id,
                    source=batch.source_of(index),
                )
                rejection.__cause__ = error
                ctx.reject(batch, index, rejection)
                continue
            if row is None and inner:
                continue
            try:
                results.append(merge(value, row))
            except Exception as error:  # a user function failed: routed by the policy
                reject_call(ctx, merge, error, batch, index)
                continue
            kept.append(index)
        out = batch if len(kept) == len(batch) else batch.take(kept)
        return (out.with_values(results),)


# -- stream-stream -----------------------------------------------------------------------------


class _Codec:
    """A side's values as stored (JSON) and as ``merge`` sees them."""

    __slots__ = ("model",)

    def __init__(self, model: type[BaseModel] | None) -> None:
        self.model = model

    def encode(self, value: Any) -> tuple[Any, Any]:
        """(stored JSON form, value for ``merge``); raises if ``value`` is not JSON."""
        if self.model is not None and isinstance(value, self.model):
            return value.model_dump(mode="json"), value
        stored = orjson.loads(orjson.dumps(value, default=_dump_model))
        return stored, stored

    def decode(self, stored: Any) -> Any:
        """The value for ``merge`` of a restored entry."""
        if self.model is not None and isinstance(stored, dict):
            try:
                return self.model.model_validate(stored)
            except ValidationError:
                return stored
        return stored


def _dump_model(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(slots=True)
class _Entry:
    """One waiting record."""

    side: int
    key: Any  # as stored (hashable)
    time: int
    seq: int
    stored: Any
    value: Any
    matched: bool

    @property
    def state_key(self) -> tuple[int, Any, int, int]:
        return (self.side, self.key, self.time, self.seq)


class StreamJoin(Operator):
    """Join two keyed streams within a time bound (see the module docstring)."""

    ports = Ports(inputs=("left", "right"))

    def __init__(
        self,
        step_id: str,
        merge: Callable[[Any, Any], Any],
        *,
        how: JoinHow,
        within_ms: int,
        grace_ms: int,
        models: tuple[type[BaseModel] | None, type[BaseModel] | None] = (None, None),
    ) -> None:
        super().__init__(step_id)
        self.merge = merge
        self.how = how
        self.within_ms = within_ms
        self.grace_ms = grace_ms
        self._codecs = (_Codec(models[0]), _Codec(models[1]))
        self._entries: dict[int, _Entry] | None = None  # by seq
        self._by_key: dict[tuple[int, Any], list[tuple[int, int]]] = {}  # sorted (time, seq)
        self._expiry: list[tuple[int, int]] = []  # heap of (time + within + grace, seq)
        self._unmatched = 0  # left records that will emit merge(left, None) unless matched
        self._next_seq = 0
        self._joined: State | None = None
        self._time: State | None = None

    # -- state ---------------------------------------------------------------------------------

    def open(self, ctx: StepContext) -> None:
        super().open(ctx)
        self._joined, self._time = ctx.state(JOINED), ctx.state(TIME)

    @property
    def watermark(self) -> int:
        return watermark(self._clock())

    @property
    def pending(self) -> int:
        if self.how != "left":
            return 0
        if self._entries is None:  # not processing yet (maybe restoring): an upper bound
            # (a default namespace holds only state from before namespaces)
            return len(self.ctx.state(JOINED)) + len(self.ctx.state())
        return self._unmatched

    def _state(self) -> State:
        """The waiting records (namespace :data:`JOINED`)."""
        assert self._joined is not None, "used before open()"
        return self._joined

    def _clock(self) -> State:
        """The watermark's namespace (:data:`~operators._timing.TIME`)."""
        assert self._time is not None, "used before open()"
        return self._time

    def _index(self) -> dict[int, _Entry]:
        """The waiting records, indexed once from the state (after a restore)."""
        if self._entries is None:
            migrate(self.ctx, JOINED, 4)
            self._entries = {}
            for state_key, (stored, matched) in self._state().items():
                side, key, stamp, seq = state_key
                entry = _Entry(
                    side, key, stamp, seq, stored, self._codecs[side].decode(stored), matched
                )
                self._add(entry)
                self._next_seq = max(self._next_seq, seq + 1)
        return self._entries

    def _add(self, entry: _Entry) -> None:
        assert self._entries is not None
        self._entries[entry.seq] = entry
        bisect.insort(self._by_key.setdefault((entry.side, entry.key), []), (entry.time, entry.seq))
        deadline = entry.time + self.within_ms + self.grace_ms
        heapq.heappush(self._expiry, (deadline, entry.seq))
        if entry.side == LEFT and self.how == "left" and not entry.matched:
            self._unmatched += 1

    def _remove(self, entry: _Entry) -> None:
        assert self._entries is not None
        del self._entries[entry.seq]
        times = self._by_key[(entry.side, entry.key)]
        del times[bisect.bisect_left(times, (entry.time, entry.seq))]
        if not times:
            del self._by_key[(entry.side, entry.key)]
        self._state().delete(entry.state_key)
        if entry.side == LEFT and self.how == "left" and not entry.matched:
            self._unmatched -= 1

    def _partners(self, side: int, key: Any, stamp: int) -> list[_Entry]:
        """The waiting records of the other side that ``(key, stamp)`` joins, oldest first."""
        times = self._by_key.get((1 - side, key))
        if not times:
            return []
        entries = self._entries
        assert entries is not None
        low = bisect.bisect_left(times, (stamp - self.within_ms, -1))
        high = bisect.bisect_right(times, (stamp + self.within_ms, 1 << 62))
        return [entries[seq] for _, seq in times[low:high]]

    # -- processing ----------------------------------------------------------------------------

    def process_ports(self, side: int, batch: Batch) -> tuple[Batch]:
        """What the step emits for ``batch`` arriving on ``side``: the pairs it completes."""
        self._index()
        ctx, state, merge = self.ctx, self._state(), self.merge
        codec = self._codecs[side]
        watermark = self.watermark
        grace = self.grace_ms
        tracks_matches = self.how == "left"
        emitted = Emitted()
        for index, (key, stamp, value) in enumerate(
            zip(batch.keys, batch.timestamps, batch.values, strict=True)
        ):
            if key is None:
                ctx.reject(batch, index, missing_key_error(self.step_id, batch, index))
                continue
            if stamp + grace < watermark:
                ctx.late(batch, index)
                continue
            try:
                state_key = decode_key(encode_key(key))  # as a restore gives it back
                stored, live = codec.encode(value)
            except (TypeError, ValueError, orjson.JSONEncodeError) as error:
                rejection = StepError(
                    f"a joined record's key and value are kept as JSON, and this one's are "
                    f"not JSON-serialisable: {error}",
                    step=self.step_id,
                    source=batch.source_of(index),
                )
                rejection.__cause__ = error
                ctx.reject(batch, index, rejection)
                continue
            partners = self._partners(side, state_key, stamp)
            for partner in partners:
                pair = (live, partner.value) if side == LEFT else (partner.value, live)
                if tracks_matches and side == RIGHT and not partner.matched:
                    partner.matched = True
                    self._unmatched -= 1
                    state.put(partner.state_key, [partner.stored, True])
                try:
                    joined = merge(*pair)
                except Exception as error:  # a user function failed: routed by the policy
                    reject_call(ctx, merge, error, batch, index)
                    continue
                emitted.add(key, joined, max(stamp, partner.time), index)
            entry = _Entry(side, state_key, stamp, self._next_seq, stored, live, bool(partners))
            self._next_seq += 1
            state.put(entry.state_key, [stored, entry.matched])
            self._add(entry)
        return (emitted.batch(batch),)

    def _expire(self, batch: Batch, emitted: Emitted, watermark: int) -> int:
        """Forget the records ``watermark`` has passed (by ``within`` + ``grace``); with
        ``how="left"``, emit ``merge(left, None)`` for the left ones that met no partner.
        Returns the watermark that expires all of them."""
        entries, expiry = self._index(), self._expiry
        needed = 0
        while expiry and expiry[0][0] < watermark:
            deadline, seq = heapq.heappop(expiry)
            needed = max(needed, deadline + 1)
            entry = entries.get(seq)
            if entry is None:
                continue
            emits = entry.side == LEFT and self.how == "left" and not entry.matched
            self._remove(entry)
            if not emits:
                continue
            try:
                joined = self.merge(entry.value, None)
            except Exception as error:  # a user function failed: routed by the policy
                alone = Emitted()
                alone.add(entry.key, entry.value, entry.time, -1)
                reject_call(self.ctx, self.merge, error, alone.batch(batch), 0)
                continue
            emitted.add(entry.key, joined, entry.time, -1)
        return needed

    def on_watermark(self, mark: int, batch: Batch) -> Batch:
        """Move the watermark to ``mark``; expire (and, for a left join, emit) what it passes."""
        self._index()
        emitted = Emitted()
        moved = advance(self._clock(), mark)
        if moved is not None:
            needed = self._expire(batch, emitted, moved)
            if moved == END_OF_TIME:
                close_at(self._clock(), needed)
        return emitted.batch(batch)
