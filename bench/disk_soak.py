"""A steady keyed windowed pipeline on the embedded log, run for a while: does its disk level off?

Writes clicks (``{"user", "ts"}``, ``ts`` the time of writing) to a JSON Lines file at a steady
rate while ``headwater run --workers 2`` follows it: ``key_by`` user, 10 s tumbling windows on
``ts``, a count per user and window, written to a file. The source topic keeps
``--retention`` seconds; the repartition topic is purged below the committed offsets and the
window's changelog compacted by the runner's housekeeping (see README, "Log backends").

Every ``--every`` seconds it prints the bytes on disk of the data directory (per kind of
topic) and the resident memory of the workers. When the time is up it stops writing, waits for
the last windows to close on idleness, stops the run, and checks every window's count against
the counts computed from the input file alone. At the end: the disk use at half time and at the
end, and the bound they must stay under (rate x retention for the source topic plus segments
being filled and state).

    python bench/disk_soak.py --minutes 30 --rate 20000     # what docs/benchmarks-disk.md shows
    python bench/disk_soak.py --smoke                        # 30 s, small segments
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson

from pipelines.errors import PipelineError
from pipelines.log._compaction import compact
from pipelines.log.base import TopicPartition
from pipelines.log.embedded import EmbeddedLog

PIPELINE = """
from datetime import datetime, timedelta, timezone

from connectors.files import JsonLines, JsonLinesSink
from operators.windows import Tumbling
from pipelines import Pipeline, Topic

RETENTION_MS = {retention_ms}

pipeline = (
    Pipeline("soak")
    .source(
        JsonLines("clicks.jsonl", follow=True, poll_interval=0.05),
        into=Topic("clicks", partitions=2, retention_ms=RETENTION_MS),
    )
    .key_by("by-user", lambda click: click["user"])
    .window(
        "windows",
        Tumbling(timedelta(seconds=10)),
        time=lambda click: click["ts"],
        lateness=timedelta(seconds=2),
        idle=timedelta(seconds=2),
    )
    .count("count")
    .sink(JsonLinesSink("counts.jsonl"))
)
"""

WINDOW_MS = 10_000


def write_clicks(path: Path, rate: int, users: int, stop: threading.Event) -> None:
    """Append ``rate`` clicks a second (in 20 batches a second) until ``stop``."""
    n = 0
    started = time.monotonic()
    with path.open("ab") as file:
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate)
            now_ms = int(time.time() * 1000)
            lines = [
                orjson.dumps({"user": f"u{(i * 7919) % users}", "ts": now_ms})
                for i in range(n, due)
            ]
            if lines:
                file.write(b"\n".join(lines) + b"\n")
                file.flush()
                n = due
            time.sleep(0.05)


def disk(data_dir: Path) -> dict[str, int]:
    """Bytes on disk per part of the data directory: the source topic, the repartition topic,
    the changelogs, other topics, the workers' local state stores, the rest."""
    kinds: Counter[str] = Counter()
    for path in data_dir.rglob("*"):
        if path.is_file():
            kinds[_kind(path.relative_to(data_dir).parts)] += path.stat().st_size
    return dict(kinds)


def _kind(parts: tuple[str, ...]) -> str:
    if parts[0] == "state":
        return "state"
    if parts[0] != "topics" or len(parts) < 3:
        return "rest"
    topic = parts[1]
    if topic == "clicks":
        return "source"
    if topic == "soak.by-user":
        return "repartition"
    return "changelogs" if topic.endswith(".changelog") else "topics"


CHANGELOG = "soak.count.changelog"


def changelog_restore(data_dir: Path, segment_bytes: int, tombstone_ms: int) -> tuple[int, int]:
    """Bytes of the window's changelog that a fresh worker's restore reads, and what is left of
    them once a copy of the changelog is compacted whole (every segment, the active one too):
    the state and the tombstones compaction must still keep."""
    copy = Path(tempfile.mkdtemp(prefix="headwater-changelog-"))
    try:
        _copy_partitions(data_dir / "topics" / CHANGELOG, copy / "topics" / CHANGELOG)
        log = EmbeddedLog(copy, segment_bytes=segment_bytes)
        read = left = 0
        for partition in range(2):
            tp = TopicPartition(CHANGELOG, partition)
            read += log.size_on_disk(tp)[2]
            file = log._file(tp)
            file.roll()
            now_ms = int(time.time() * 1000)
            compact(file, segment_bytes=segment_bytes, now_ms=now_ms, tombstone_ms=tombstone_ms)
            compact(
                file,
                segment_bytes=segment_bytes,
                now_ms=now_ms,
                tombstone_ms=tombstone_ms,
                force=True,
            )
            left += log.size_on_disk(tp)[2]
        return read, left
    finally:
        shutil.rmtree(copy)


def _copy_partitions(source: Path, target: Path) -> None:
    """Copy a topic's files, each segment's acknowledged end before its bytes: while the run
    writes, a copied segment then holds at least what its end says (more is a torn tail)."""
    target.mkdir(parents=True)
    ends = sorted(source.glob("*.end"))
    for path in [*ends, *(p for p in sorted(source.iterdir()) if p not in ends)]:
        shutil.copy2(path, target / path.name)


def compacted_while_running(data_dir: Path, segment_bytes: int, tombstone_ms: int) -> int | None:
    """What is left of the window's changelog compacted whole, taken while the run writes it;
    None if the files kept changing under the copy (a segment sealed, removed or rewritten)."""
    for _ in range(3):
        try:
            return changelog_restore(data_dir, segment_bytes, tombstone_ms)[1]
        except (OSError, PipelineError):
            continue
    return None


def workers_rss(runner: int) -> int:
    """Resident bytes of the runner's child processes."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == str(runner) and "VmRSS" in fields:
            total += int(fields["VmRSS"].split()[0]) * 1024
    return total


def reference(path: Path) -> Counter[tuple[str, int]]:
    """The count of each (user, window start) in the input file alone."""
    counts: Counter[tuple[str, int]] = Counter()
    for line in path.read_bytes().splitlines():
        click = orjson.loads(line)
        counts[(click["user"], click["ts"] // WINDOW_MS * WINDOW_MS)] += 1
    return counts


def emitted(path: Path) -> Counter[tuple[str, int]]:
    """The count the run wrote for each (user, window start)."""
    counts: Counter[tuple[str, int]] = Counter()
    for line in path.read_bytes().splitlines():
        row = orjson.loads(line)
        start = int(datetime.fromisoformat(row["start"]).timestamp() * 1000)
        counts[(row["key"], start)] = row["value"]
    return counts


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=20_000, help="clicks per second")
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--retention", type=float, default=60.0, help="source topic, seconds")
    parser.add_argument("--segment-bytes", type=int, default=8 << 20)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--smoke", action="store_true", help="30 s at 2,000/s, small segments")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.rate, args.users, args.retention = 0.5, 2000, 500, 5.0
        args.segment_bytes, args.every = 32 << 10, 3.0
    return args


def housekeeping_seconds(args: argparse.Namespace) -> int:
    return 1 if args.smoke else 10


def tombstone_ms(args: argparse.Namespace) -> int:
    return 3000 if args.smoke else 60_000


def _start(args: argparse.Namespace, root: Path) -> subprocess.Popen[bytes]:
    """``headwater run --workers 2`` of the pipeline in ``root``, in a session of its own."""
    (root / "soak.py").write_text(PIPELINE.format(retention_ms=int(args.retention * 1000)))
    (root / "clicks.jsonl").touch()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")},
        "HEADWATER_SEGMENT_BYTES": str(args.segment_bytes),
        "HEADWATER_HOUSEKEEPING_SECONDS": str(housekeeping_seconds(args)),
        "HEADWATER_TOMBSTONE_MS": str(tombstone_ms(args)),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", "soak.py", "--workers", "2"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(root / "run.log").open("wb"),
        start_new_session=True,
    )


def _watch(
    args: argparse.Namespace, root: Path, runner: subprocess.Popen[bytes]
) -> tuple[list[int], int]:
    """Sample the disk use every ``--every`` seconds while the clicks are written; the totals,
    and the largest the window's changelog would be once compacted whole."""
    stop = threading.Event()
    writer = threading.Thread(
        target=write_clicks, args=(root / "clicks.jsonl", args.rate, args.users, stop)
    )
    writer.start()
    seconds = args.minutes * 60
    started = time.monotonic()
    totals: list[int] = []
    peak = 0
    print(
        f"{'s':>6} {'disk MB':>9} {'source':>8} {'repart.':>8} {'changel.':>8} {'state':>8} "
        f"{'RSS MB':>7}"
    )
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(args.every, seconds - elapsed))
            used = disk(root / ".headwater")
            totals.append(sum(used.values()))
            least = compacted_while_running(
                root / ".headwater", args.segment_bytes, tombstone_ms(args)
            )
            peak = max(peak, least or 0)
            shown = [used.get(k, 0) / 1e6 for k in ("source", "repartition", "changelogs", "state")]
            print(
                f"{time.monotonic() - started:6.0f} {totals[-1] / 1e6:9.2f} "
                + " ".join(f"{mb:8.2f}" for mb in shown)
                + f" {workers_rss(runner.pid) / 1e6:7.0f}",
                flush=True,
            )
            if runner.poll() is not None:
                raise SystemExit((root / "run.log").read_text()[-3000:])
    finally:
        stop.set()
        writer.join()
    return totals, peak


def main() -> int:
    args = _arguments()
    root = Path(tempfile.mkdtemp(prefix="headwater-disk-soak-"))
    runner = _start(args, root)
    try:
        totals, peak = _watch(args, root, runner)
        expected = reference(root / "clicks.jsonl")
        deadline = time.monotonic() + 120  # the last windows close on idleness, then are written
        while len(emitted(root / "counts.jsonl")) < len(expected) and time.monotonic() < deadline:
            time.sleep(1)
        # the closing windows' tombstones came in a burst: let housekeeping go over them
        time.sleep(3 * housekeeping_seconds(args))
    finally:
        os.killpg(runner.pid, signal.SIGINT)
        runner.wait(timeout=120)
    got = emitted(root / "counts.jsonl")
    half = totals[len(totals) // 2]
    # the source topic: what retention keeps (the retention, plus the housekeeping interval and
    # a segment being filled); the others and the state stores: a few segments and the state
    bound = 2 * args.rate * 100 * args.retention + 16 * 2 * args.segment_bytes + 16 * (1 << 20)
    print(f"input: {sum(expected.values()):,} clicks in {len(expected):,} user windows")
    print(f"disk at half time: {half / 1e6:.2f} MB, at the end: {totals[-1] / 1e6:.2f} MB")
    print(
        f"bound (2 x rate x retention x 100 B, 16 segments a partition, 16 MiB of state): "
        f"{bound / 1e6:.2f} MB"
    )
    wrong = sum(1 for key, count in expected.items() if got.get(key) != count)
    print(f"windows counted as the input says: {len(expected) - wrong:,} of {len(expected):,}")
    read, least = changelog_restore(root / ".headwater", args.segment_bytes, tombstone_ms(args))
    # compaction waits for as many dirty bytes as clean ones, and the clean ones are what the
    # last compaction kept, when the state may have been larger than at the end (the windows
    # still open); then the active segments
    largest = max(peak, least)
    restore_bound = 2 * largest + 2 * 2 * args.segment_bytes
    print(
        f"a restore reads {read / 1e6:.2f} MB of changelog; compacted whole it would be "
        f"{least / 1e6:.2f} MB, {largest / 1e6:.2f} MB at most during the run (bound: twice "
        f"that and two segments a partition, {restore_bound / 1e6:.2f} MB)"
    )
    ok = not wrong and max(totals) <= bound and read <= restore_bound
    print("bounded and exact" if ok else f"FAILED: over the bound or counted wrong (see {root})")
    if ok:
        shutil.rmtree(root)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
