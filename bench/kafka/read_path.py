"""The Kafka read path alone: fetched record batches to columnar batches, two ways, in memory.

    python bench/kafka/read_path.py [--records N] [--batch-records B] [--max-records M]

The events of ``compare.py`` (``clicks.py``) are built into record batches of ``B`` records, as
its producer writes them, and turned into batches of up to ``M`` records (the worker's poll
size) the two ways ``pipelines/log/_kafka_records.py`` can: through aiokafka's ConsumerRecords
(``PartitionRecords``, then ``fetched_batch``: the public path) and straight from the record
batches (``_Chunks``). No broker: the same bytes a fetch returns, so only the decoding is timed.
Prints the best of ``--repeat`` runs of each, in CPU time per record, with and without the CRC
check, and what the garbage collector did meanwhile.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence

from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition
from clicks import encode_events

from pipelines.log._kafka_records import ColumnReader, _Chunks, fetched_batch

TP = TopicPartition("clicks", 0)
STAMP = 1_700_000_000_000


def fetched(records: int, per_batch: int) -> bytes:
    """``records`` events as one fetch response's record batches of ``per_batch`` each."""
    data = bytearray()
    for start in range(0, records, per_batch):
        count = min(per_batch, records - start)
        builder = DefaultRecordBatchBuilder(2, 0, 0, 1, 0, start, 1 << 30)
        for delta, value in enumerate(encode_events(start, count, STAMP)):
            builder.append(delta, timestamp=STAMP, key=None, value=value, headers=[])
        batch = builder.build()
        batch[0:8] = start.to_bytes(8, "big")  # the broker sets the base offset
        data += batch
    return bytes(data)


def partition_records(data: bytes, check_crcs: bool) -> PartitionRecords:
    return PartitionRecords(TP, MemoryRecords(data), [], 0, None, None, check_crcs, READ_COMMITTED)


def public(data: bytes, max_records: int, check_crcs: bool) -> int:
    """ConsumerRecords, max_records at a time (FetchResult.getall), then the columns."""
    records = partition_records(data, check_crcs)
    done = 0
    while True:
        messages = []
        for message in records:
            messages.append(message)
            if len(messages) == max_records:
                break
        if not messages:
            return done
        done += len(fetched_batch(TP, messages).offsets)


def direct(data: bytes, max_records: int, check_crcs: bool) -> int:
    """The columns straight from the record batches."""
    reader = ColumnReader(None)
    reader.budget = max_records
    return sum(len(b.offsets) for b in _Chunks(partition_records(data, check_crcs), reader))


def best(run: Callable[[], int], repeat: int) -> tuple[float, int]:
    """Least CPU seconds of ``repeat`` runs, and the collections during the last one."""
    seconds = float("inf")
    for _ in range(repeat):
        before = sum(s["collections"] for s in gc.get_stats())
        started = time.process_time()
        run()
        seconds = min(seconds, time.process_time() - started)
        collections = sum(s["collections"] for s in gc.get_stats()) - before
    return seconds, collections


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time the two Kafka read paths in memory.")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch-records", type=int, default=5_000)
    parser.add_argument("--max-records", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=7)
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    data = fetched(args.records, args.batch_records)
    print(
        f"{args.records:,} events in record batches of {args.batch_records:,} "
        f"({len(data) / args.records:.0f} bytes a record), batches of up to "
        f"{args.max_records:,}; CPU time, best of {args.repeat}:"
    )
    for crc in (True, False):
        for name, path in (("ConsumerRecords", public), ("record batches", direct)):
            assert path(data, args.max_records, crc) == args.records
            seconds, collections = best(
                lambda path=path, crc=crc: path(data, args.max_records, crc), args.repeat
            )
            print(
                f"  {name:<16} CRC {'on ' if crc else 'off'}: "
                f"{seconds / args.records * 1e9:5.0f} ns/record, {collections} collections"
            )
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
