"""The ``headwater`` command line.

::

    headwater run path/to/module.py[:attr] [--workers N] [--backend embedded|memory|kafka]
                  [--data-dir DIR] [--bootstrap-servers HOST:PORT] [--no-progress]
    headwater worker path/to/module.py[:attr] --backend kafka [--workers N] ...
    headwater topics list|describe NAME|tail NAME [--backend embedded|kafka] ...
    headwater log check [--data-dir DIR] [--repair] [TOPIC ...]
    headwater reset path/to/module.py[:attr] [--backend ...] [--data-dir DIR] [--yes]
                    [--keep-outputs] [--dead-letters]

Kafka connection settings come from the flags or from ``HEADWATER_*`` environment variables
(see :class:`pipelines.settings.KafkaSettings`); the SASL password only from
``HEADWATER_SASL_PASSWORD`` and the password of an encrypted TLS client key only from
``HEADWATER_SSL_KEY_PASSWORD``, so that they never show in a process list.

Every error a user can cause (a bad module path, a missing attribute, an invalid pipeline, an
unreadable input) prints one paragraph that says what to fix, and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import orjson
from pydantic import ValidationError

from pipelines.errors import PipelineError
from pipelines.loader import load_pipeline
from pipelines.log import BACKENDS, open_log
from pipelines.log._partition_file import disk_error
from pipelines.log.base import FetchedBatch, LogBackend, TopicPartition, TopicSpec
from pipelines.log.check import check_log
from pipelines.log.embedded import EmbeddedLog
from pipelines.runtime import deadletters
from pipelines.runtime.acls import kafka_acls_commands, pipeline_acls
from pipelines.runtime.hotkeys import HOT_KEY_MIN_RECORDS, HOT_KEY_SHARE
from pipelines.runtime.logs import FORMATS, LEVELS, configure, json_lines
from pipelines.runtime.logs import log as log_event
from pipelines.runtime.progress import RunState
from pipelines.runtime.reset import ResetOptions, reset_pipeline
from pipelines.runtime.runner import RunOptions, quiet_clients, run
from pipelines.runtime.status import describe, read_status
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.watchdog import STALL_AFTER
from pipelines.runtime.watermarks import split_markers
from pipelines.settings import KafkaSettings

__all__ = ["main"]

_KAFKA_FLAGS = (
    "bootstrap_servers",
    "client_id",
    "group_id",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)


def _log_arguments(
    parser: argparse.ArgumentParser, backends: Sequence[str], *, inherit: bool = False
) -> None:
    """The options that say which log to use. With ``inherit``, an option left out here keeps
    the value its parent command parsed (``topics --data-dir D list`` = ``topics list
    --data-dir D``)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if inherit else value

    parser.add_argument("--backend", choices=backends, default=default("embedded"))
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default(Path(".headwater")),
        help="where the embedded log lives (default .headwater)",
    )
    kafka = parser.add_argument_group("Kafka (or HEADWATER_* environment variables)")
    kafka.add_argument(
        "--bootstrap-servers", metavar="HOST:PORT[,HOST:PORT]", default=default(None)
    )
    kafka.add_argument("--client-id", default=default(None))
    kafka.add_argument(
        "--group-id", default=default(None), help="consumer group (default: the pipeline name)"
    )
    kafka.add_argument(
        "--security-protocol",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        default=default(None),
    )
    kafka.add_argument(
        "--sasl-mechanism",
        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        default=default(None),
    )
    kafka.add_argument("--sasl-username", default=default(None))
    kafka.add_argument(
        "--ssl-cafile",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="CA certificate(s) that signed the brokers' certificates (default: the system's)",
    )
    kafka.add_argument(
        "--ssl-certfile",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="client certificate, for brokers that require one (mutual TLS)",
    )
    kafka.add_argument(
        "--ssl-keyfile",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="the client certificate's private key (its password: HEADWATER_SSL_KEY_PASSWORD)",
    )
    kafka.add_argument(
        "--ssl-check-hostname",
        action=argparse.BooleanOptionalAction,
        default=default(None),
        help="check that a broker's certificate names the host it was reached at (default on)",
    )


def _kafka_settings(args: argparse.Namespace) -> KafkaSettings | None:
    if args.backend != "kafka":
        return None
    given = {flag: getattr(args, flag) for flag in _KAFKA_FLAGS if getattr(args, flag)}
    if args.ssl_check_hostname is not None:
        given["ssl_check_hostname"] = args.ssl_check_hostname
    try:
        return KafkaSettings(**given)
    except ValidationError as error:
        raise PipelineError(f"invalid Kafka settings: {error}") from None


MODULE_HELP = "path/to/module.py or package.module, with :attribute to pick one pipeline"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwater", description="Run and inspect Headwater stream-processing pipelines."
    )
    parser.add_argument("--version", action="version", version=f"headwater {version('headwater')}")
    commands = parser.add_subparsers(dest="command", required=True)

    run_cmd = commands.add_parser("run", help="run a pipeline module until its input is processed")
    worker_cmd = commands.add_parser(
        "worker", help="join the consumer group of a pipeline running elsewhere (Kafka)"
    )
    for command in (run_cmd, worker_cmd):
        command.add_argument("module", help=MODULE_HELP)
        command.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
        command.add_argument("--no-progress", action="store_true", help="no live progress")
        command.add_argument(
            "--restart",
            choices=("on-failure", "never"),
            default="on-failure",
            help="start a new worker process in place of one that was killed or crashed "
            "(default on-failure)",
        )
        command.add_argument(
            "--max-restarts",
            type=int,
            default=10,
            metavar="N",
            help="restarts allowed within a minute before the run fails (default 10)",
        )
        command.add_argument(
            "--log-level",
            choices=LEVELS,
            default="info",
            help="the least severe events to log (default info: progress lines and notes)",
        )
        command.add_argument(
            "--log-format",
            choices=FORMATS,
            default="text",
            help="text (default) or json: one JSON object per line on stderr, for log "
            "shippers (no live table then)",
        )
        command.add_argument(
            "--metrics-port",
            type=int,
            default=None,
            metavar="PORT",
            help="serve Prometheus metrics of the run on http://HOST:PORT/metrics "
            "(needs headwater[metrics])",
        )
        command.add_argument(
            "--metrics-host",
            default="127.0.0.1",
            metavar="HOST",
            help="the address the metrics are served on (default 127.0.0.1: this machine only)",
        )
        command.add_argument(
            "--max-dead-letter-ratio",
            type=float,
            default=None,
            metavar="RATIO",
            help="share (0 to 1) of a step's records it may send to dead letters before the "
            "run fails, judged after 100 records (default: the pipeline's "
            "max_dead_letter_ratio, 0.5)",
        )
        command.add_argument(
            "--hot-key-share",
            type=float,
            default=HOT_KEY_SHARE,
            metavar="SHARE",
            help="warn when one key carries more than this share (0 to 1) of a partition's "
            f"records, judged after {HOT_KEY_MIN_RECORDS:,} records (default {HOT_KEY_SHARE:g})",
        )
        command.add_argument(
            "--stall-after",
            type=float,
            default=STALL_AFTER,
            metavar="SECONDS",
            help="report a step that has not returned for this long, with where it is "
            f"(default {STALL_AFTER:g})",
        )
    _log_arguments(run_cmd, BACKENDS)
    _log_arguments(worker_cmd, ("kafka", "embedded"))

    topics = commands.add_parser("topics", help="list, describe and read topics on the log")
    _log_arguments(topics, ("embedded", "kafka"))
    topic_commands = topics.add_subparsers(dest="topics_command", required=True)
    listing = topic_commands.add_parser("list", help="every topic, its partitions and records")
    describe = topic_commands.add_parser("describe", help="one topic, partition by partition")
    describe.add_argument("name")
    tail = topic_commands.add_parser("tail", help="print a topic's last records")
    tail.add_argument("name")
    tail.add_argument("-n", "--lines", type=int, default=10, help="records per partition")
    tail.add_argument(
        "--markers", action="store_true", help="also print the watermark markers among them"
    )
    for command in (listing, describe, tail):
        _log_arguments(command, ("embedded", "kafka"), inherit=True)
    _log_check_arguments(commands)
    _reset_arguments(commands)
    _dlq_arguments(commands)
    status = commands.add_parser(
        "status", help="how a pipeline's run is doing (or how it ended), from another shell"
    )
    status.add_argument("module", help=MODULE_HELP)
    status.add_argument("--json", action="store_true", help="the status as one JSON object")
    _log_arguments(status, ("embedded", "kafka"))
    acls = commands.add_parser(
        "acls", help="the Kafka ACLs a pipeline's run needs, and the commands that grant them"
    )
    acls.add_argument("module", help=MODULE_HELP)
    acls.add_argument(
        "--principal",
        default="User:PIPELINE",
        help="who the pipeline runs as: User:NAME for a SASL user, User:CN=... for a client "
        "certificate (default User:PIPELINE, to replace)",
    )
    acls.add_argument("--json", action="store_true", help="the ACLs as one JSON array")
    acls.add_argument(
        "--group-id", default=None, help="consumer group (default: the pipeline name)"
    )
    acls.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        default=os.environ.get("HEADWATER_BOOTSTRAP_SERVERS", "localhost:9092"),
        help="for the kafka-acls.sh lines (default $HEADWATER_BOOTSTRAP_SERVERS)",
    )
    return parser


def _acls(args: argparse.Namespace) -> int:
    group = args.group_id or os.environ.get("HEADWATER_GROUP_ID")
    topology = compile_pipeline(load_pipeline(args.module), group=group)
    acls = pipeline_acls(topology)
    if args.json:
        print(orjson.dumps([acl.as_json() for acl in acls], option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"ACLs pipeline {topology.pipeline.name!r} needs on Kafka, for {args.principal}:")
    for acl in acls:
        name = acl.name + ("*" if acl.prefixed else "")
        print(f"  {acl.resource:15} {name:40} {', '.join(acl.operations):30} {acl.why}")
    print("\nTo grant them with Kafka's kafka-acls.sh:")
    for line in kafka_acls_commands(acls, args.principal, args.bootstrap_servers):
        print(f"  {line}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    kafka = _kafka_settings(args)
    topology = compile_pipeline(
        load_pipeline(args.module), group=kafka.group_id if kafka is not None else None
    )
    log = open_log(args.backend, data_dir=args.data_dir, kafka=kafka)
    try:
        document = await read_status(args.data_dir, topology, log)
    finally:
        await log.close()
    if args.json:
        print(orjson.dumps(document).decode())
    else:
        print(describe(document))
    return 0


def _dlq_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = commands.add_parser("dlq", help="list, show and replay a pipeline's dead letters")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = actions.add_parser(
        "list", help="dead letters by step and error, and how many replayed"
    )
    show = actions.add_parser("show", help="the dead letters themselves, one JSON object a line")
    show.add_argument("-n", "--lines", type=int, default=10, help="at most this many (default 10)")
    again = actions.add_parser(
        "replay",
        help="send dead letters back to the topics they came from (after fixing the step); "
        "each is replayed once",
    )
    for command in (listing, show, again):
        command.add_argument("module", help=MODULE_HELP)
        _log_arguments(command, ("embedded", "kafka"))
    for command in (show, again):
        command.add_argument(
            "--step", action="append", default=[], help="only this step's (repeat for more)"
        )


async def _dlq(args: argparse.Namespace) -> int:
    kafka = _kafka_settings(args)
    group = kafka.group_id if kafka is not None else None
    topology = compile_pipeline(load_pipeline(args.module), group=group)
    log = open_log(args.backend, data_dir=args.data_dir, kafka=kafka)
    try:
        if args.dlq_command == "list":
            groups = await deadletters.summary(log, topology)
            for g in groups:
                print(
                    f"{g.step}\t{g.error_type}\t{g.count:,} dead letters\t{g.replayed:,} "
                    f"replayed\te.g. {g.example}"
                )
            if not groups:
                print(f"no dead letters on {topology.pipeline.dead_letter_topic.name}")
            return 0
        if args.dlq_command == "show":
            shown = 0
            async for letter in deadletters.read_dead_letters(log, topology):
                if shown >= args.lines:
                    break
                if args.step and letter.step not in args.step:
                    continue
                line = {
                    "partition": letter.partition,
                    "offset": letter.offset,
                    "key": _text(letter.key),
                    "value": _text(letter.value),
                    "timestamp": letter.timestamp,
                    "headers": {k: _text(v) for k, v in letter.headers},
                }
                print(orjson.dumps(line).decode())
                shown += 1
            return 0
        sent = await deadletters.replay(log, topology, args.step)
        for step, count in sent.items():
            print(f"{step}: {count:,} dead letters replayed")
        return 0
    finally:
        await log.close()


def _reset_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reset = commands.add_parser(
        "reset", help="forget what a pipeline has done, so that its next run starts afresh"
    )
    reset.add_argument("module", help=MODULE_HELP)
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep the files the sinks wrote (JsonLinesSink, CsvSink, ParquetSink)",
    )
    reset.add_argument(
        "--dead-letters", action="store_true", help="also remove the dead-letter and late topics"
    )
    _log_arguments(reset, BACKENDS)


def _reset(args: argparse.Namespace) -> int:
    options = ResetOptions(
        spec=args.module,
        backend=args.backend,
        data_dir=args.data_dir,
        kafka=_kafka_settings(args),
        keep_outputs=args.keep_outputs,
        dead_letters=args.dead_letters,
    )
    return reset_pipeline(options, yes=args.yes)


def _log_check_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``headwater log check``: the embedded log only (Kafka checks its own logs)."""
    log_cmd = commands.add_parser("log", help="check and repair the embedded log's files")
    log_commands = log_cmd.add_subparsers(dest="log_command", required=True)
    check = log_commands.add_parser(
        "check",
        help="verify every frame of every partition; exit 1 when damage is found",
        description="Verify every frame of every partition of the embedded log (or of the "
        "topics given) and say, per partition, whether it is intact or what is damaged and "
        "which offsets that loses. Exits 0 when every acknowledged record is intact, 1 when "
        "damage is found, 0 after --repair repaired it.",
    )
    check.add_argument("topics", nargs="*", metavar="TOPIC", help="topics to check (default all)")
    check.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".headwater"),
        help="where the embedded log lives (default .headwater)",
    )
    check.add_argument(
        "--repair",
        action="store_true",
        help="move damaged frames to a quarantine file next to their partition and rewrite the "
        "partition without them; every other record keeps its offset (stop every process "
        "using the data directory first)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``headwater`` console script."""
    args = _parser().parse_args(argv)
    quiet_clients()
    configure(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "worker": _run,
        "log": _log_check,
        "reset": _reset,
        "dlq": lambda a: asyncio.run(_dlq(a)),
        "status": lambda a: asyncio.run(_status(a)),
        "acls": _acls,
        "topics": lambda a: asyncio.run(_topics(a)),
    }
    try:
        return commands[args.command](args)
    except PipelineError as error:
        if json_lines():
            log_event(logging.ERROR, str(error), {"event": "error"})
        else:
            message = textwrap.fill(f"headwater: {error}", width=100, break_on_hyphens=False)
            print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _log_check(args: argparse.Namespace) -> int:
    """One line per partition, then a summary; 1 when damage is left (see pipelines.log.check)."""
    result = check_log(args.data_dir, args.topics, repair=args.repair)
    for partition in result.partitions:
        print(partition.line())
    summary = f"headwater: {result.summary()}"
    print(textwrap.fill(summary, width=100, break_on_hyphens=False, break_long_words=False))
    return result.exit_code


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise PipelineError(f"--workers must be at least 1, not {args.workers}")
    if args.max_restarts < 0:
        raise PipelineError(f"--max-restarts must be at least 0, not {args.max_restarts}")
    if not args.stall_after > 0:
        raise PipelineError(f"--stall-after must be a positive number, not {args.stall_after}")
    ratio = args.max_dead_letter_ratio
    if ratio is not None and not 0 <= ratio <= 1:
        raise PipelineError(f"--max-dead-letter-ratio must be from 0 to 1, not {ratio:g}")
    if not 0 <= args.hot_key_share <= 1:
        raise PipelineError(f"--hot-key-share must be from 0 to 1, not {args.hot_key_share:g}")
    options = RunOptions(
        spec=args.module,
        workers=args.workers,
        backend=args.backend,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        kafka=_kafka_settings(args),
        sources=args.command == "run",
        restart=args.restart,
        restart_limit=args.max_restarts,
        stall_after=args.stall_after,
        max_dead_letter_ratio=ratio,
        hot_key_share=args.hot_key_share,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    state = run(options)
    _summary(state, _reset_command(args))
    if state.stopped_by is None or not options.sources:
        return 0  # a worker's normal end is being stopped
    return 128 + state.stopped_by


def _summary(state: RunState, reset: str) -> None:
    """What the run did, step by step, on stderr; a source that found nothing new after its
    stored position says so, and that ``reset`` (a command) starts afresh."""
    totals = state.step_totals()
    errors = state.first_errors()
    if state.stopped_by is None:
        outcome = "finished"
    elif state.sources:
        outcome = "stopped before the end of its input"
    else:
        outcome = "stopped"
    lines = [f"headwater: {state.topology.pipeline.name} {outcome}"]
    for source in state.sources:
        if source.nothing_new:
            lines.append(
                f"  source {source.step_id}: nothing new since the last run (resumed at "
                f"{source.resumed_at}); `{reset}` starts afresh"
            )
        else:
            lines.append(f"  source {source.step_id}: {source.records:,} records written")
    for step in state.topology.pipeline.steps:
        counts = totals.get(step.step_id)
        if counts is not None:
            records_in, records_out, skipped, dead, late = counts
            extra = f", {dead:,} to dead letters" if dead else ""
            extra += f", {skipped:,} skipped" if skipped else ""
            extra += f", {late:,} late" if late else ""
            lines.append(f"  {step.step_id}: {records_in:,} in, {records_out:,} out{extra}")
            if step.step_id in errors:
                lines.append(f"    first rejected: {errors[step.step_id]}")
    behind = sum(state.lag.values())
    lines.append(f"  lag: {behind:,} records")
    seconds = time.monotonic() - state.started
    lines.append(
        f"  took {seconds:,.1f} s: {state.records:,} records read from the log, "
        f"{state.records / max(seconds, 1e-3):,.0f} records/s"
    )
    if not json_lines():
        print("\n".join(lines), file=sys.stderr)
        return
    names = ("in", "out", "skipped", "dead_lettered", "late")
    fields = {
        "event": "summary",
        "pipeline": state.topology.pipeline.name,
        "outcome": outcome,
        "sources": {s.step_id: s.records for s in state.sources},
        "steps": {step: dict(zip(names, counts, strict=True)) for step, counts in totals.items()},
        "first_rejected": errors,
        "lag": behind,
        "seconds": round(seconds, 3),
        "records": state.records,
    }
    log_event(logging.INFO, f"{state.topology.pipeline.name} {outcome}", fields)


def _reset_command(args: argparse.Namespace) -> str:
    """The ``headwater reset`` command for the pipeline and log of this ``run``."""
    words = ["headwater", "reset", args.module]
    if args.backend == "kafka":
        words += ["--backend", "kafka"]
        if args.bootstrap_servers:
            words += ["--bootstrap-servers", args.bootstrap_servers]
        if args.group_id:
            words += ["--group-id", args.group_id]
    elif args.backend == "embedded" and args.data_dir != Path(".headwater"):
        words += ["--data-dir", str(args.data_dir)]
    return shlex.join(words)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError as error:
        raise disk_error(path, "read", error) from error


async def _topics(args: argparse.Namespace) -> int:
    if args.backend == "embedded" and not _is_dir(args.data_dir / "topics"):
        raise PipelineError(
            f"no embedded log at {args.data_dir}: run a pipeline first, or pass --data-dir"
        )
    log = open_log(args.backend, data_dir=args.data_dir, kafka=_kafka_settings(args))
    try:
        specs = await log.describe_topics()
        if args.topics_command == "list":
            for name, spec in sorted(specs.items()):
                tps = [TopicPartition(name, p) for p in range(spec.partitions)]
                starts = await log.start_offsets(tps)
                total = sum(end - starts[tp] for tp, end in (await log.end_offsets(tps)).items())
                print(f"{name}\t{spec.partitions} partitions\t{total:,} records")
            return 0
        found = specs.get(args.name)
        if found is None:
            raise PipelineError(
                f"no topic {args.name!r} on the {args.backend} log; "
                "`headwater topics list` shows them"
            )
        spec = found
        tps = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
        ends = await log.end_offsets(tps)
        starts = await log.start_offsets(tps)
        if args.topics_command == "describe":
            _describe_topic(log, spec, starts, ends)
            return 0
        for tp in tps:
            fetched = await log.read(tp, max(starts[tp], ends[tp] - args.lines), args.lines)
            if args.markers:
                for offset, (writer, mark) in _markers(fetched):
                    print(
                        orjson.dumps(
                            {
                                "partition": tp.partition,
                                "offset": offset,
                                "watermark": {"writer": writer, "mark": mark},
                            }
                        ).decode()
                    )
            fetched, _ = split_markers(fetched)
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


def _describe_topic(
    log: LogBackend,
    spec: TopicSpec,
    starts: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
) -> None:
    """A topic's settings, then per partition: its records, the offsets they span, and on the
    embedded log its segment files, their size on disk and how far compaction got, when."""
    limits = [f"{spec.retention_ms:,} ms"] if spec.retention_ms is not None else []
    if spec.retention_bytes is not None:
        limits.append(f"{spec.retention_bytes:,} bytes a partition")
    retention = " or ".join(limits) or "none"
    print(
        f"{spec.name}: {spec.partitions} partitions, compacted={spec.compacted}, "
        f"retention {retention}"
    )
    for tp in sorted(ends, key=lambda tp: tp.partition):
        line = (
            f"  partition {tp.partition}: {ends[tp] - starts[tp]:,} records "
            f"(offsets {starts[tp]:,} to {ends[tp]:,})"
        )
        if isinstance(log, EmbeddedLog):
            _, segments, size = log.size_on_disk(tp)
            line += f", {segments} segment{'s' if segments != 1 else ''}, {size:,} bytes"
            compacted = log.compacted_to(tp)
            if compacted is not None:
                offset, at = compacted
                when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                line += f", compacted up to offset {offset:,} at {when}"
        print(line)


def _markers(fetched: FetchedBatch) -> list[tuple[int, tuple[str, int]]]:
    """The offset and (writer, mark) of each watermark marker in ``fetched``."""
    found = []
    for index, offset in enumerate(fetched.offsets):
        one = FetchedBatch(
            fetched.topic, fetched.partition, fetched.records.take([index]), [offset], offset + 1
        )
        found += [(offset, marker) for marker in split_markers(one)[1]]
    return found


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    return data.decode("utf-8", errors="backslashreplace")


if __name__ == "__main__":
    sys.exit(main())
