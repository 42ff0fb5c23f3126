"""One Headwater run for ``bench/kafka/compare.py``, in a process of its own.

    python bench/kafka/run_headwater.py --bootstrap B --input T --output T --group G
        [--partitions P] [--workers N] [--follow]

Writes the pipeline module (a ``LogTopic`` source, the filter and the map of ``clicks.py``, a
``LogTopic`` sink) into a temporary directory next to copies of ``clicks.py`` and of the
``bench/workload.py`` it imports, and runs it as ``headwater run --backend kafka`` does:
``pipelines.runtime.runner.run`` with ``N`` worker processes in one consumer group. Without
``--follow`` it returns once the group has committed the whole input; with it, it keeps going
until SIGTERM (the latency phase).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipelines.runtime.runner import RunOptions, run
from pipelines.settings import KafkaSettings

HERE = Path(__file__).resolve().parent

PIPELINE = '''"""The benchmark pipeline on Kafka, written by bench/kafka/run_headwater.py."""

from clicks import is_click, summarize

from connectors import LogTopic
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline({name!r})
    .source(LogTopic(Topic({source!r}, partitions={partitions})))
    .filter("clicks", is_click)
    .map("summary", summarize)
    .sink(LogTopic(Topic({sink!r}, partitions={partitions})))
)
'''


def write_pipeline(directory: Path, name: str, source: str, sink: str, partitions: int) -> Path:
    """The pipeline module ``name`` and its neighbours ``clicks.py`` and the ``workload.py``
    that ``clicks.py`` imports, in ``directory``."""
    shutil.copy(HERE / "clicks.py", directory / "clicks.py")
    shutil.copy(HERE.parent / "workload.py", directory / "workload.py")
    module = directory / "pipeline.py"
    module.write_text(PIPELINE.format(name=name, source=source, sink=sink, partitions=partitions))
    return module


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the benchmark pipeline on Kafka.")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True, help="consumer group and pipeline name")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--follow", action="store_true", help="run until SIGTERM")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headwater-kafka-bench-") as tmp:
        options = RunOptions(
            spec=str(
                write_pipeline(Path(tmp), args.group, args.input, args.output, args.partitions)
            ),
            workers=args.workers,
            backend="kafka",
            kafka=KafkaSettings(bootstrap_servers=args.bootstrap, group_id=args.group),
            progress=False,
            sources=not args.follow,
        )
        run(options)


if __name__ == "__main__":
    main(sys.argv[1:])
