"""The ``headwater`` command line.

::

    headwater run path/to/module.py[:attr] [--workers N] [--backend memory|embedded]
                  [--data-dir DIR] [--no-progress]
    headwater topics list|describe NAME|tail NAME [--data-dir DIR]

Every error a user can cause (a bad module path, a missing attribute, an invalid pipeline, an
unreadable input) prints one paragraph that says what to fix, and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import orjson

from pipelines.errors import PipelineError
from pipelines.log import open_log
from pipelines.log.base import TopicPartition
from pipelines.runtime.progress import RunState
from pipelines.runtime.runner import RunOptions, run

__all__ = ["main"]

_BACKENDS = ("embedded", "memory")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwater", description="Run and inspect Headwater stream-processing pipelines."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run_cmd = commands.add_parser("run", help="run a pipeline module until its input is processed")
    run_cmd.add_argument("module", help="path/to/module.py or path/to/module.py:attribute")
    run_cmd.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    run_cmd.add_argument("--backend", choices=_BACKENDS, default="embedded")
    run_cmd.add_argument("--data-dir", type=Path, default=Path(".headwater"))
    run_cmd.add_argument("--no-progress", action="store_true", help="do not show live progress")

    topics = commands.add_parser("topics", help="list, describe and read topics on the log")
    topics.add_argument("--data-dir", type=Path, default=Path(".headwater"))
    topic_commands = topics.add_subparsers(dest="topics_command", required=True)
    topic_commands.add_parser("list", help="every topic with its partitions and record counts")
    describe = topic_commands.add_parser("describe", help="one topic, partition by partition")
    describe.add_argument("name")
    tail = topic_commands.add_parser("tail", help="print a topic's last records")
    tail.add_argument("name")
    tail.add_argument("-n", "--lines", type=int, default=10, help="records per partition")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``headwater`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        return asyncio.run(_topics(args))
    except PipelineError as error:
        print(textwrap.fill(f"headwater: {error}", width=100), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise PipelineError(f"--workers must be at least 1, not {args.workers}")
    options = RunOptions(
        spec=args.module,
        workers=args.workers,
        backend=args.backend,
        data_dir=args.data_dir,
        progress=not args.no_progress,
    )
    state = run(options)
    _summary(state)
    return 0


def _summary(state: RunState) -> None:
    totals = state.step_totals()
    lines = [f"headwater: {state.topology.pipeline.name} finished"]
    for source in state.sources:
        lines.append(f"  source {source.step_id}: {source.records:,} records written")
    for step in state.topology.pipeline.steps:
        counts = totals.get(step.step_id)
        if counts is not None:
            records_in, records_out, skipped, dead = counts
            extra = f", {dead:,} to dead letters" if dead else ""
            extra += f", {skipped:,} skipped" if skipped else ""
            lines.append(f"  {step.step_id}: {records_in:,} in, {records_out:,} out{extra}")
    behind = sum(state.lag.values())
    lines.append(f"  lag: {behind:,} records")
    print("\n".join(lines), file=sys.stderr)


async def _topics(args: argparse.Namespace) -> int:
    if not (args.data_dir / "topics").is_dir():
        raise PipelineError(
            f"no embedded log at {args.data_dir}: run a pipeline first, or pass --data-dir"
        )
    log = open_log("embedded", data_dir=args.data_dir)
    try:
        specs = await log.describe_topics()
        if args.topics_command == "list":
            for name, spec in sorted(specs.items()):
                tps = [TopicPartition(name, p) for p in range(spec.partitions)]
                total = sum((await log.end_offsets(tps)).values())
                print(f"{name}\t{spec.partitions} partitions\t{total:,} records")
            return 0
        found = specs.get(args.name)
        if found is None:
            raise PipelineError(
                f"no topic {args.name!r} in {args.data_dir}; `headwater topics list` shows them"
            )
        spec = found
        tps = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
        ends = await log.end_offsets(tps)
        if args.topics_command == "describe":
            print(f"{spec.name}: {spec.partitions} partitions, compacted={spec.compacted}")
            for tp in tps:
                print(f"  partition {tp.partition}: {ends[tp]:,} records")
            return 0
        for tp in tps:
            fetched = await log.read(tp, max(0, ends[tp] - args.lines), args.lines)
            raw = fetched.records
            for i, offset in enumerate(fetched.offsets):
                line = {
                    "partition": tp.partition,
                    "offset": offset,
                    "key": _text(raw.keys[i]),
                    "value": _text(raw.values[i]),
                    "headers": {k: _text(v) for k, v in raw.header_at(i)},
                }
                print(orjson.dumps(line).decode())
        return 0
    finally:
        await log.close()


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    return data.decode("utf-8", errors="backslashreplace")


if __name__ == "__main__":
    sys.exit(main())
