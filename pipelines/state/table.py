"""A table read from a topic: the latest value of each key of one partition, for ``join_table``.

The topic is the table's changelog (keep it compacted): a record sets its key to its value, and
a record with a ``None`` value (a tombstone, or JSON ``null``) deletes the key. Rows are kept by
the key's *bytes* as they are on the topic, so a stream key finds its row when it serialises,
with the table topic's key serde, to the same bytes. A key serde can choose otherwise through
:meth:`~pipelines.serde.Serde.table_row`: keep rows by its own normalised bytes (keys another
program wrote with other JSON spacing or escapes), or fold several keys into one row (the
windows of a key of a Faust windowed table, see :mod:`connectors.faust`).

When its task is assigned, the store is *bootstrapped*: the partition is read from offset 0 to
its end at that moment, so a table written before the stream is complete before the first
stream record is joined, whatever order the consumer polls the two topics in. The task then
receives the same partition as an input, from its committed offset; records below the
bootstrap's end are already applied and are skipped, later ones are applied in offset order.

Records whose key or value does not deserialise are left out both ways (read as input, the
runtime dead-letters them). There is no changelog and no local copy: every assignment reads
the partition again, which costs about one deserialisation per record on the topic.
"""

from __future__ import annotations

from typing import Any

from pipelines.batch import Batch
from pipelines.log.base import LogBackend, RawBatch, TopicPartition
from pipelines.topic import Topic

__all__ = ["TableStore"]

_BOOTSTRAP_CHUNK = 100_000


class TableStore:
    """One partition of a table topic as key bytes -> latest value (see the module docstring)."""

    def __init__(self, topic: Topic, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self._rows: dict[bytes, Any] = {}
        self.bootstrapped_to = 0
        """The offset the bootstrap read up to: records below it are already applied."""

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic.name, self.partition)

    def key_bytes(self, key: Any) -> bytes:
        """``key`` as the table topic's key serde writes it (raises if it does not fit)."""
        return self.topic.key_serde.serialize(key)

    def get(self, key: Any) -> Any:
        """The row of ``key``, or ``None`` (rows are never ``None``: that deletes)."""
        return self._rows.get(self.key_bytes(key))

    def items(self) -> list[tuple[bytes, Any]]:
        """Every (key bytes, value)."""
        return list(self._rows.items())

    async def bootstrap(self, log: LogBackend) -> int:
        """Read the partition from its start (offset 0 unless retention removed records) to its
        current end; returns the records read."""
        tp = self.topic_partition
        end = (await log.end_offsets([tp]))[tp]
        self._rows.clear()
        offset = (await log.start_offsets([tp]))[tp]
        read = 0
        while offset < end:
            fetched = await log.read(tp, offset, min(_BOOTSTRAP_CHUNK, end - offset))
            if fetched.next_offset <= offset:  # (a read in a repaired hole moves past it)
                break
            self._apply_raw(fetched.records)
            read += len(fetched.records)
            offset = fetched.next_offset
        self.bootstrapped_to = offset
        return read

    def _apply_raw(self, raw: RawBatch) -> None:
        """Apply records as read from the log: decode each, skipping those that do not."""
        count = len(raw)
        if raw.keys.count(None) == count:
            return  # no keys, nothing to look up
        values, value_errors = self.topic.value_serde.deserialize_many(raw.values)
        keys, key_errors = self.topic.key_serde.deserialize_many(raw.keys)
        for index, (raw_key, value) in enumerate(zip(raw.keys, values, strict=True)):
            if raw_key is None or index in value_errors or index in key_errors:
                continue
            self._set(raw_key, keys[index], value)

    def apply(self, batch: Batch) -> int:
        """Apply table records received as input (already deserialised), skipping those the
        bootstrap applied; returns how many were applied."""
        applied = 0
        after = self.bootstrapped_to
        for index, value in enumerate(batch.values):
            if batch.offset_at(index) < after:
                continue
            raw_key = batch.raw_key_at(index)
            if raw_key is None:
                continue
            self._set(raw_key, batch.keys[index], value)
            applied += 1
        return applied

    def _set(self, raw_key: bytes, key: Any, value: Any) -> None:
        """Apply one record: the row its key serde says it sets, ``None`` deleting it."""
        row, new = self.topic.key_serde.table_row(raw_key, key, value, self._rows)
        if new is None:
            self._rows.pop(row, None)
        else:
            self._rows[row] = new
