"""``headwater run`` with 3 worker processes over a JSON Lines file whose event times are out of
order by a known bound: the windowed counts of all four window kinds equal a batch computation
over the file alone, with 6 and 12 source partitions, on the embedded log and on Kafka. Nothing
is late (the lateness covers the disorder), every window is emitted once, and the run returns
as soon as its results are out (within 2 s on the embedded log): the end of the input closes
every window, where an idle timeout of a minute would otherwise hold them open.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.kafka import KAFKA_BOOTSTRAP

from event_time.oracles import (
    disordered,
    iso_millis,
    max_disorder,
    user_session_counts,
    window_counts,
)
from pipelines.log import open_log
from pipelines.log.base import TopicPartition
from pipelines.runtime.watermarks import split_markers
from pipelines.settings import KafkaSettings

pytestmark = pytest.mark.slow

EVENTS = 20_000
DISORDER_MS = 5_000
SIZE_MS = 5_000
GAP_MS = 2_000
KINDS = {
    "tumbling": f"Tumbling(timedelta(milliseconds={SIZE_MS}))",
    "hopping": f"Hopping(timedelta(milliseconds={2 * SIZE_MS}), timedelta(milliseconds={SIZE_MS}))",
    "sliding": (
        f"Sliding(timedelta(milliseconds={2 * SIZE_MS}), timedelta(milliseconds={SIZE_MS // 2}))"
    ),
    "session": f"Session(timedelta(milliseconds={GAP_MS}))",
}

MODULE = """
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

import connectors
from operators.windows import Hopping, Session, Sliding, Tumbling
from pipelines import Pipeline, Topic

HERE = Path(__file__).parent


class Click(BaseModel):
    id: int
    user: str
    ts: datetime
    amount: int


def event_time(click):
    return click.ts


keyed = (
    Pipeline({name!r})
    .source(
        connectors.JsonLines(HERE / "clicks.jsonl", batch_size=500),
        into=Topic({topic!r}, partitions={partitions}, value=Click),
    )
    .key_by("by-user", lambda click: click.user)
)
chains = [
    keyed.window(
        kind,
        windows,
        time=event_time,
        lateness=timedelta(milliseconds={lateness}),
        idle=timedelta(seconds=60),
    )
    .count("count-" + kind)
    .sink(connectors.JsonLinesSink(HERE / ("out-" + kind + ".jsonl")), step_id="to-" + kind)
    for kind, windows in [{kinds}]
]
pipeline = chains[0].merge("all", *chains[1:])
"""


def expected_window_counts(kind: str, events: list[dict[str, Any]]) -> dict[Any, int]:
    if kind == "tumbling":
        return window_counts(events, size=SIZE_MS)
    if kind == "hopping":
        return window_counts(events, size=2 * SIZE_MS, advance=SIZE_MS)
    if kind == "sliding":
        return window_counts(events, size=2 * SIZE_MS, advance=SIZE_MS // 2)
    return user_session_counts(events, gap=GAP_MS)


def results(path: Path) -> dict[Any, int]:
    found: dict[Any, int] = {}
    for line in path.read_bytes().splitlines():
        result = orjson.loads(line)
        assert result["final"] is True
        window = (result["key"], iso_millis(result["start"]), iso_millis(result["end"]))
        assert window not in found, f"window {window} emitted twice"
        found[window] = result["value"]
    return found


async def _count_records(backend: str, options: dict[str, Any], name: str) -> int:
    log = open_log(backend, **options)  # type: ignore[arg-type]
    try:
        spec = (await log.describe_topics())[name]
        total = 0
        for partition in range(spec.partitions):
            tp = TopicPartition(name, partition)
            end = (await log.end_offsets([tp]))[tp]
            offset = 0
            while offset < end:
                fetched = await log.read(tp, offset, 10_000)
                if fetched.next_offset <= offset:
                    break
                total += len(split_markers(fetched)[0].records)
                offset = fetched.next_offset
        return total
    finally:
        await log.close()


@pytest.mark.parametrize("partitions", [6, 12])
@pytest.mark.parametrize("backend", ["embedded", "kafka"])
def test_windowed_counts_of_a_file_equal_the_batch_computation(
    backend: str, partitions: int, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:10]  # names of its own on a shared broker
    name, topic = f"event-time-{run}", f"clicks-{run}"
    events = disordered(7, EVENTS, users=50, step_ms=3, disorder_ms=DISORDER_MS)
    assert DISORDER_MS * 0.9 < max_disorder(events) <= DISORDER_MS
    (tmp_path / "clicks.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    kinds = ", ".join(f"({kind!r}, {windows})" for kind, windows in KINDS.items())
    module = tmp_path / "pipeline.py"
    module.write_text(
        textwrap.dedent(MODULE).format(
            name=name,
            topic=topic,
            partitions=partitions,
            lateness=DISORDER_MS + 1_000,
            kinds=kinds,
        )
    )
    bootstrap = KAFKA_BOOTSTRAP
    flags = ["--backend", backend]
    options: dict[str, Any] = {"data_dir": tmp_path / "data"}
    if backend == "kafka":
        flags += ["--bootstrap-servers", bootstrap]
        options = {"kafka": KafkaSettings(bootstrap_servers=bootstrap)}
    else:
        flags += ["--data-dir", str(tmp_path / "data")]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(module), "--workers", "3", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    finished = time.monotonic()
    assert done.returncode == 0, done.stderr
    assert finished - started < 60, "the run waited for the idle timeout"
    # the results are the last thing the run writes: it returned within 2 s of them on the
    # embedded log; leaving a Kafka group and closing its clients takes a few seconds more
    bound = 2 if backend == "embedded" else 5
    for kind in KINDS:
        out = tmp_path / f"out-{kind}.jsonl"
        assert results(out) == expected_window_counts(kind, events), kind
        assert time.time() - out.stat().st_mtime < bound + (time.monotonic() - finished)
        late = asyncio.run(_count_records(backend, options, f"{name}.count-{kind}.late"))
        assert late == 0, f"{late} records of {kind} windows went late"
