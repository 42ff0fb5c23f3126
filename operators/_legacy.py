"""State written before namespaces: the steps that now keep their entries apart by namespace
(windows, stream joins) kept them all in the default namespace, told apart by the length of
their tuple keys, and a changelog or local copy of that time restores them there.

:func:`migrate` moves them where they now belong, the first time the step reads its state after
a restore: the watermark, under the 1-tuple ``("watermark",)``, into
:data:`~operators._timing.TIME`, and the step's entries (tuples of one length: 3 for a window,
4 for a joined record) into their namespace. Each move is a change like any other, so the next
checkpoint writes it to the changelog in the new layout (a tombstone for the old key, the entry
under the new one) and later restores find nothing to move. Such a step puts nothing in its
default namespace itself, so a state in the new layout costs one scan that finds nothing.
"""

from __future__ import annotations

from operators._timing import TIME, WATERMARK
from operators.base import StepContext

__all__ = ["migrate"]

_WATERMARK = ("watermark",)
"""The key of the watermark before namespaces."""


def migrate(ctx: StepContext, namespace: str, width: int) -> None:
    """Move the entries a step kept in its default namespace before namespaces: its watermark
    into :data:`~operators._timing.TIME`, and keys that are tuples of ``width`` items into
    ``namespace``."""
    default = ctx.state()
    found = [(key, value) for key, value in default.items() if isinstance(key, tuple)]
    for key, value in found:
        if key == _WATERMARK:
            ctx.state(TIME).put(WATERMARK, value)
        elif len(key) == width:
            ctx.state(namespace).put(key, value)
        else:
            continue
        default.delete(key)
