"""Fetched Kafka records as columns, without a ``ConsumerRecord`` per record.

aiokafka's ``getmany`` hands out one ``ConsumerRecord`` per record, made in Python
(``PartitionRecords._unpack_records`` resumes a generator, calls ``_consumer_record`` and builds
the dataclass, and ``FetchResult.getall`` appends and counts each one), and the columns of a
``RawBatch`` were then taken back out of those objects, four list comprehensions later. A
:class:`ColumnReader` takes the columns straight from the record batches aiokafka fetched: its
C extension decodes the records of a record batch (``DefaultRecordBatch``) as far as a chunk of
up to ``max_records`` needs, and ``map`` with one ``attrgetter`` per field fills each column
from the decoded records. No Python bytecode runs per record, except for the records of a
batch that has headers and those of a record batch fetched from its middle, before the fetch
offset. The garbage collector is held off while a chunk is decoded (see
:meth:`_Chunks.__next__`).

Everything else stays aiokafka's own and goes through the public ``getmany``: fetching and
prefetching, the consumer's position, seeks, rebalances, fetch errors. The one seam is
:func:`_install` (aiokafka internals, version-checked, with the public path as the fallback);
:class:`_Chunks` does what ``PartitionRecords._unpack_records`` does (CRC checks, aborted
transactions under ``read_committed``, control batches, records below the fetch offset, the
position after each chunk) a record batch at a time.
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Iterator, Sequence
from itertools import islice
from operator import attrgetter
from typing import Any

import aiokafka
from aiokafka.consumer.fetcher import READ_COMMITTED, FetchResult, PartitionRecords
from aiokafka.errors import CorruptRecordException, KafkaError
from aiokafka.record.control_record import ABORT_MARKER, ControlRecord
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition as KafkaPartition

from pipelines.log.base import FetchedBatch, RawBatch
from pipelines.record import Headers

__all__ = ["ColumnReader", "fetched_batch"]

_CHECKED = ((0, 11), (0, 15))
"""The aiokafka versions whose fetcher :func:`_install` was read against: 0.11.0 to 0.14.0,
from ``(0, 11)`` up to, not including, ``(0, 15)``."""

_OFFSET, _KEY, _VALUE, _TIMESTAMP, _HEADERS = map(
    attrgetter, ("offset", "key", "value", "timestamp", "headers")
)
"""The fields of a decoded record (aiokafka's ``DefaultRecord`` or ``LegacyRecord``)."""


def fetched_batch(tp: KafkaPartition, messages: Sequence[Any]) -> FetchedBatch:
    """aiokafka's ConsumerRecords of one partition as one columnar batch (the public path)."""
    headers: list[Headers] | None = None
    if any(m.headers for m in messages):
        headers = [tuple((k, v or b"") for k, v in m.headers) for m in messages]
    batch = RawBatch(
        [m.key for m in messages],
        [m.value for m in messages],
        [m.timestamp for m in messages],
        headers,
    )
    offsets = [m.offset for m in messages]
    return FetchedBatch(tp.topic, tp.partition, batch, offsets, offsets[-1] + 1)


def _columns(tp: KafkaPartition, records: list[Any]) -> FetchedBatch:
    """Decoded records (at least one) as the batch :func:`fetched_batch` makes of the
    ConsumerRecords of the same records."""
    headers: list[Headers] | None = None
    if any(map(_HEADERS, records)):
        headers = [tuple((k, v or b"") for k, v in r.headers) for r in records]
    batch = RawBatch(
        list(map(_KEY, records)),
        list(map(_VALUE, records)),
        list(map(_TIMESTAMP, records)),
        headers,
    )
    offsets = list(map(_OFFSET, records))
    return FetchedBatch(tp.topic, tp.partition, batch, offsets, offsets[-1] + 1)


class ColumnReader:
    """The records a started ``AIOKafkaConsumer`` (one without deserializers) fetched, as
    :class:`~pipelines.log.base.FetchedBatch` es, one per partition with records."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.budget = 1
        """Records the next chunk may hold: :meth:`fetch` sets it before it asks aiokafka."""
        self.direct = _install(consumer, self)
        """Whether batches are made from aiokafka's record batches (else from ConsumerRecords,
        when :func:`_install` does not know this aiokafka)."""
        self._failed: KafkaError | None = None
        """An error met after some batches were in hand: raised by the next :meth:`fetch`."""

    async def fetch(
        self, partitions: Sequence[KafkaPartition], timeout: float, max_records: int
    ) -> list[FetchedBatch]:
        """Up to ``max_records`` records of ``partitions`` (all assigned ones when empty),
        waiting up to ``timeout`` seconds for some, as ``getmany`` returns them: the first
        partition's records, then the next one's while fewer than ``max_records`` are in
        hand."""
        timeout_ms = int(timeout * 1000)
        if not self.direct:
            data = await self.consumer.getmany(
                *partitions, timeout_ms=timeout_ms, max_records=max_records
            )
            return [fetched_batch(tp, messages) for tp, messages in data.items() if messages]
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        # every item aiokafka hands out is a chunk of up to `budget` records, so getmany with
        # max_records=1 gives one batch, of the first partition with records; asked again
        # (without waiting), it goes on with that partition or the next
        batches: list[FetchedBatch] = []
        left = max_records
        while left > 0:
            self.budget = left
            try:
                data = await self.consumer.getmany(
                    *partitions, timeout_ms=timeout_ms, max_records=1
                )
            except KafkaError as error:
                if not batches:
                    raise
                self._failed = error  # getmany too returns what it has and raises next time
                break
            if not data:
                break
            for chunks in data.values():
                batches += chunks
                left -= sum(len(chunk.records) for chunk in chunks)
            timeout_ms = 0
        return batches


class _Chunks:
    """Stands in for aiokafka's ``PartitionRecords`` of one fetch response partition: iterated
    by ``FetchResult.getall``, it hands out FetchedBatches of up to ``reader.budget`` records
    instead of ConsumerRecords, and keeps ``next_fetch_offset`` as ``PartitionRecords`` does
    (after the last record handed out; past skipped batches once all is handed out), which
    ``FetchResult`` makes the consumer's position."""

    def __init__(self, fetched: Any, reader: ColumnReader) -> None:
        self.next_fetch_offset: int = fetched.next_fetch_offset
        self._tp: KafkaPartition = fetched._tp
        self._records: MemoryRecords = fetched._records
        self._aborted: list[tuple[int, int]] = list(fetched._aborted_transactions)
        """(producer id, first offset) of the aborted transactions, by first offset."""
        self._aborted_producers: set[int] = set()
        self._check_crcs: bool = fetched._check_crcs
        self._read_committed = fetched._isolation_level == READ_COMMITTED
        self._reader = reader
        self._progress = self.next_fetch_offset
        """Offset after the record batches read so far (handed out or not)."""
        self._chunks = self._decode()

    def __iter__(self) -> Iterator[FetchedBatch]:
        return self

    def __next__(self) -> FetchedBatch:
        if not gc.isenabled():
            return next(self._chunks)
        # no collection while a chunk is decoded: its decoded records (two objects the
        # collector tracks each) are all let go before the chunk is handed out, and a
        # collection in the middle would only walk them, and move them to older generations,
        # whose growth makes full collections come sooner
        gc.disable()
        try:
            return next(self._chunks)
        finally:
            gc.enable()

    def _decode(self) -> Iterator[FetchedBatch]:
        """Chunks of up to ``reader.budget`` records; a record batch is decoded as far as the
        chunk in hand needs, and the decoded records are let go before a chunk is handed
        out."""
        records: list[Any] = []
        for batch in self._batches():
            start = self._progress
            while True:
                taken = len(records)
                records += islice(batch, self._reader.budget - taken)
                if len(records) == taken:
                    break  # the end of the batch
                if records[taken].offset < start:  # the fetch started inside this batch
                    records[taken:] = [r for r in records[taken:] if r.offset >= start]
                if len(records) == self._reader.budget:
                    yield self._hand_out(records)
        if records:
            yield self._hand_out(records)
        self.next_fetch_offset = self._progress

    def _hand_out(self, records: list[Any]) -> FetchedBatch:
        """``records`` as a batch, taken out of the list."""
        self.next_fetch_offset = records[-1].offset + 1
        batch = _columns(self._tp, records)
        records.clear()
        return batch

    def _batches(self) -> Iterator[Any]:
        """The record batches whose records are handed out, in order, each iterated before
        the next is read (``_unpack_records``, a record batch at a time)."""
        records = self._records
        while records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not batch.validate_crc():
                raise CorruptRecordException(
                    f"Invalid CRC - {self._tp} (record batch at offset {batch.base_offset})"
                )
            if self._read_committed and batch.producer_id is not None:
                self._abort_up_to(batch.base_offset)
                if batch.is_control_batch and self._aborts(batch):
                    self._aborted_producers.discard(batch.producer_id)
                if batch.is_transactional and batch.producer_id in self._aborted_producers:
                    self._progress = batch.next_offset
                    continue
            if batch.is_control_batch:
                self._progress = batch.next_offset
                continue
            # one iterator for the whole batch, however many slices are taken from it
            # (iter() decompresses the batch; a DefaultRecordBatch is its own iterator, which
            # must not be iter()-ed again)
            yield iter(iter(batch).__next__, None)
            # the offset after the batch's last offset, also when compaction removed the
            # records at its end
            self._progress = batch.next_offset

    def _abort_up_to(self, offset: int) -> None:
        """Producers whose aborted transaction starts at or before ``offset`` are aborting."""
        aborted = self._aborted
        while aborted and aborted[0][1] <= offset:
            self._aborted_producers.add(aborted.pop(0)[0])

    def _aborts(self, control: Any) -> bool:
        """Whether a control batch is an abort marker (else a commit marker)."""
        try:
            marker = next(control)
        except StopIteration:
            raise KafkaError(
                f"the control batch of {self._tp} at offset {control.base_offset} holds no record"
            ) from None
        return bool(ControlRecord.parse(marker.key) == ABORT_MARKER)


class _Results(collections.OrderedDict[Any, Any]):
    """aiokafka's ``Fetcher._records`` (partition -> FetchResult or FetchError) whose results
    hand out the chunks of a :class:`ColumnReader` (see :func:`_install`)."""

    def __init__(self, reader: ColumnReader) -> None:
        super().__init__()
        self._reader = reader

    def __setitem__(self, tp: Any, result: Any) -> None:
        if type(result) is FetchResult:
            result._partition_records = _Chunks(result._partition_records, self._reader)
        super().__setitem__(tp, result)


def _install(consumer: Any, reader: ColumnReader) -> bool:
    """Make ``consumer``'s fetcher hand out ``reader``'s chunks, or tell that it cannot.

    This is the one place that reaches into aiokafka internals, as read in aiokafka 0.11.0 to
    0.14.0 (:data:`_CHECKED`; ``aiokafka/consumer/fetcher.py``): the consumer's ``_fetcher``
    keeps each partition's fetched, not yet returned records in ``_records``, an OrderedDict
    it fills with ``self._records[tp] = FetchResult(...)``; a ``FetchResult`` iterates its
    ``_partition_records`` (a ``PartitionRecords`` holding the fetched ``MemoryRecords`` and
    the response's aborted transactions) in ``getall``, counting items against
    ``max_records``, and makes ``next_fetch_offset`` the position. The fetcher's ``_records``
    is swapped for a :class:`_Results`, which puts a :class:`_Chunks` in place of each new
    ``PartitionRecords``; ``getmany(max_records=1)`` then returns one chunk.

    Returns False, changing nothing, for another aiokafka version, or when the fetcher or a
    ``PartitionRecords`` is not shaped as described: the reader then makes its batches from
    ConsumerRecords (the public ``getmany``), which gives the same batches, slower.
    """
    try:
        version = tuple(int(part) for part in aiokafka.__version__.split(".")[:2])
    except ValueError:
        return False
    fetcher: Any = getattr(consumer, "_fetcher", None)
    results = getattr(fetcher, "_records", None)
    if not _CHECKED[0] <= version < _CHECKED[1] or type(results) is not collections.OrderedDict:
        return False
    if results:  # the consumer fetched already: only a fresh one is swapped
        return False
    nothing = MemoryRecords(b"")
    try:  # what _Chunks reads from a PartitionRecords
        fetched = PartitionRecords(
            KafkaPartition("probe", 0), nothing, [], 0, None, None, True, READ_COMMITTED
        )
        _Chunks(fetched, reader)
    except (AttributeError, TypeError):
        return False
    fetcher._records = _Results(reader)
    return True
