"""Connectors: where records come from (sources) and where they go (sinks).

* :class:`Iterable` and :class:`Collect`: Python values in, lists out (tests, notebooks);
* :class:`JsonLines` and :class:`Csv`: files in, optionally tailing them;
  :class:`JsonLinesSink` and :class:`CsvSink`: append-only files out;
* :class:`Stdout`: one line per record on standard output;
* :class:`LogTopic`: a topic on the pipeline's log, in or out.

Connectors to services live in their own modules, each behind an extra of its own so that
their libraries are installed only when asked for: :mod:`connectors.postgres`
(``headwater[postgres]``) and :mod:`connectors.http` (``headwater[http]``).

The contracts every connector follows are in :mod:`connectors.base`; ``docs/connectors.md``
shows how to write one.
"""

from connectors.base import Position, Sink, SinkContext, SinkWriter, Source, SourceBatch
from connectors.files import Csv, CsvSink, JsonLines, JsonLinesSink
from connectors.memory import Collect, Iterable
from connectors.stdout import Stdout
from connectors.topic import LogTopic

__all__ = [
    "Collect",
    "Csv",
    "CsvSink",
    "Iterable",
    "JsonLines",
    "JsonLinesSink",
    "LogTopic",
    "Position",
    "Sink",
    "SinkContext",
    "SinkWriter",
    "Source",
    "SourceBatch",
    "Stdout",
]
