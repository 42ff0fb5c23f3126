"""The runner's own calls to the log (the lag it shows, whether the input is drained,
housekeeping) failing for a while with an error a retry may help, as during a broker restart:
the run goes on and ends as it would have, saying once that the runner lost the log and once
that it has it back. A run whose log fails for good stops with the error."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson
import pytest
from support.logs import read_topic

from pipelines.errors import LogError
from pipelines.log.base import LogBackend, TopicPartition
from pipelines.runtime import engine, runner
from pipelines.runtime.runner import RunOptions, run
from pipelines.runtime.topology import Topology

N = 2_000

MODULE = f"""
from connectors.memory import Iterable
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("outage")
    .source(
        Iterable(lambda: ({{"n": n}} for n in range({N})), batch_size=100), into=Topic("numbers")
    )
    .map("double", lambda e: {{"n": e["n"] * 2}})
    .sink(LogTopic(Topic("doubled")))
)
"""


def failing_lag(failures: int, *, retriable: bool) -> object:
    """The runner's ``lag``, failing its first ``failures`` calls."""
    real = engine.lag
    calls = 0

    async def lag(log: LogBackend, topology: Topology) -> Mapping[TopicPartition, int]:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise LogError("cannot read end offsets: the broker is away", retriable=retriable)
        return await real(log, topology)

    return lag


def run_outage_module(tmp_path: Path) -> Sequence[str]:
    module = tmp_path / "outage.py"
    module.write_text(textwrap.dedent(MODULE))
    options = RunOptions(spec=str(module), progress=False, data_dir=tmp_path / ".headwater")
    return run(options).notes


def test_the_run_goes_on_while_the_runner_cannot_reach_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "lag", failing_lag(20, retriable=True))
    notes = run_outage_module(tmp_path)
    lost = [n for n in notes if n.startswith("the runner cannot reach the log")]
    back = [n for n in notes if n.startswith("the runner reaches the log again")]
    assert len(lost) == 1, notes
    assert "the broker is away" in lost[0]
    assert len(back) == 1, notes
    doubled = sorted(
        orjson.loads(v)["n"] for _, v in read_topic(tmp_path / ".headwater", "doubled").records if v
    )
    assert doubled == [2 * n for n in range(N)]


def test_a_log_error_no_retry_helps_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "lag", failing_lag(1, retriable=False))
    with pytest.raises(LogError, match="the broker is away"):
        run_outage_module(tmp_path)
