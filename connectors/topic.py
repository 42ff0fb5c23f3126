"""A topic on the log as a source (``Pipeline.source(LogTopic(t))``) or a sink (``.sink(...)``).

Reading a log topic needs no source task: the workers consume it directly, as they consume
every topic of the pipeline. Writing serialises with the topic's serdes and partitions by key
with Kafka's partitioner, like every write the runtime makes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.topic import Topic

__all__ = ["LogTopic"]


@dataclass(frozen=True, slots=True)
class LogTopic:
    """The topic ``topic`` on the pipeline's log."""

    topic: Topic
