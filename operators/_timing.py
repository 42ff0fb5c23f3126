"""What the event-time operators (windows, stream joins, dedupe, TTL) share: the task's
event-time mark as each step keeps it, and the records a call emits.

The runtime tells each step when its task's inputs have all progressed to an event-time mark
(see :mod:`pipelines.runtime.watermarks`): :meth:`~operators.base.Operator.on_watermark`. A step
turns the mark into its own watermark (minus its declared lateness), keeps it in its store under
a key no record entry can have (a 1-tuple), so it is restored with the rest of the state and
never goes back, and closes or expires what the watermark has passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.batch import Batch
    from pipelines.state.store import KeyValueStore

__all__ = ["END_OF_TIME", "NO_WATERMARK", "WATERMARK_KEY", "Emitted", "advance", "watermark"]

WATERMARK_KEY = ("watermark",)
NO_WATERMARK = -(1 << 62)
"""The watermark before anything is known."""
END_OF_TIME = 1 << 62
"""The mark of inputs that will never write again: every window closes."""


def watermark(store: KeyValueStore) -> int:
    """The step's watermark on this partition."""
    value = store.get(WATERMARK_KEY)
    return NO_WATERMARK if value is None else int(value)


def advance(store: KeyValueStore, mark: int, lateness_ms: int = 0) -> bool:
    """Move the step's watermark up to ``mark - lateness_ms`` (never back); whether it moved."""
    if mark <= NO_WATERMARK:
        return False
    candidate = END_OF_TIME if mark >= END_OF_TIME else mark - lateness_ms
    if candidate <= watermark(store):
        return False
    store.put(WATERMARK_KEY, candidate)
    return True


class Emitted:
    """The records one call of a step emits, gathered as columns."""

    __slots__ = ("keys", "origins", "stamps", "values")

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.stamps: list[int] = []
        self.origins: list[int] = []

    def add(self, key: Any, value: Any, stamp: int, origin: int) -> None:
        """One record; ``origin`` indexes the input batch (-1: made as time passed)."""
        self.keys.append(key)
        self.values.append(value)
        self.stamps.append(stamp)
        self.origins.append(origin)

    def batch(self, like: Batch) -> Batch:
        """The records as a batch read from the same place as ``like``."""
        from pipelines.batch import Batch

        return Batch(self.keys, self.values, self.stamps, self.origins, like.fetched)
