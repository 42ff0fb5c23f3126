"""The work all three frameworks do in ``bench/kafka/compare.py``: the same events and functions
as the embedded benchmarks (``bench/workload.py``), so every number measures the same work.

Each framework keeps the clicks (:func:`is_click`) and writes :func:`summarize` of each as JSON.
``ts`` is the wall-clock ms when the event was produced and survives the map, so the latency
phase reads it back from the output record.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workload import clicks_below, is_click, summarize
from workload import encoded_events as encode_events

__all__ = ["clicks_below", "encode_events", "is_click", "summarize"]
