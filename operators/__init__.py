"""The operator library. Pipelines use these through the ``Pipeline`` methods of the same names;
write your own by subclassing :class:`Operator`."""

from operators.base import Operator, StepContext, call_each
from operators.routing import Branch, Merge
from operators.stateless import Filter, FlatMap, KeyBy, Map, Peek

__all__ = [
    "Branch",
    "Filter",
    "FlatMap",
    "KeyBy",
    "Map",
    "Merge",
    "Operator",
    "Peek",
    "StepContext",
    "call_each",
]
