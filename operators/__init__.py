"""The operator library. Pipelines use these through the ``Pipeline`` methods of the same names;
write your own by subclassing :class:`Operator` (declaring its inputs and outputs with
:class:`Ports` when it has other than one of each) and run it with ``Pipeline.apply``.

Aggregations (``Count()``, ``Sum(of)`` ...) and windows (``Tumbling``, ``Hopping``, ``Sliding``,
``Session``) are the values ``Pipeline.aggregate`` and ``Pipeline.window`` take.
"""

from operators.aggregations import (
    Aggregation,
    Collect,
    Count,
    Fold,
    Many,
    Max,
    Mean,
    Min,
    Reduce,
    Sum,
)
from operators.base import Operator, Ports, StepContext, call_each, reject_call
from operators.joins import StreamJoin, TableJoin
from operators.routing import Branch, Merge
from operators.stateful import Aggregate, Dedupe, EventTime
from operators.stateless import Filter, FlatMap, KeyBy, Map, Peek
from operators.windowed import WindowedAggregate, WindowResult
from operators.windows import Hopping, Session, Sliding, Tumbling, Window, Windows

__all__ = [
    "Aggregate",
    "Aggregation",
    "Branch",
    "Collect",
    "Count",
    "Dedupe",
    "EventTime",
    "Filter",
    "FlatMap",
    "Fold",
    "Hopping",
    "KeyBy",
    "Many",
    "Map",
    "Max",
    "Mean",
    "Merge",
    "Min",
    "Operator",
    "Peek",
    "Ports",
    "Reduce",
    "Session",
    "Sliding",
    "StepContext",
    "StreamJoin",
    "Sum",
    "TableJoin",
    "Tumbling",
    "Window",
    "WindowResult",
    "WindowedAggregate",
    "Windows",
    "call_each",
    "reject_call",
]
