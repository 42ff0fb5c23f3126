"""``headwater run --metrics-port``: Prometheus scrapes ``/metrics`` from the runner while a
real multi-process run goes on, and the counters equal what the input holds."""

from __future__ import annotations

import socket
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.cli import Cli, start
from support.network import free_port

ORDERS = 2000
BAD_EVERY = 10
"""Every tenth order makes ``total`` raise: a dead letter."""

MODULE = f"""
import asyncio
from pathlib import Path

import connectors
from pipelines import Pipeline, Topic

GATE = Path(__file__).parent / "gate"


async def orders():
    for i in range({ORDERS}):
        yield {{"id": i, "price": i / 10}}
    while not GATE.exists():  # the run stays up until the test has scraped
        await asyncio.sleep(0.05)


def total(order):
    if order["id"] % {BAD_EVERY} == 0:
        raise ValueError("a bad order")
    return order["price"] * 2


pipeline = (
    Pipeline("shop")
    .source(connectors.Iterable(orders), into=Topic("orders", partitions=3))
    .map("total", total)
    .sink(connectors.LogTopic(Topic("totals", partitions=2)))
)
"""


def start_shop(tmp_path: Path, port: int) -> Cli:
    """``headwater run shop.py --workers 2`` serving its metrics on ``port``."""
    (tmp_path / "shop.py").write_text(textwrap.dedent(MODULE))
    args = ["run", "shop.py", "--workers", "2", "--no-progress", "--metrics-port", str(port)]
    return start(args, cwd=tmp_path, name="run")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and labels (without ``pipeline``) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pipeline"))
            assert sample.labels.get("pipeline") == "shop", sample
            found[(sample.name, labels)] = sample.value
    return found


@pytest.mark.slow
def test_metrics_count_what_the_input_holds_during_a_run(tmp_path: Path) -> None:
    port = free_port()
    runner = start_shop(tmp_path, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert runner.running(), runner.stderr()
            try:
                found = scrape(port)
            except OSError:
                found = {}
            step = (("step", "total"),)
            if (
                found.get(("headwater_step_records_in_total", step)) == ORDERS
                and found.get(("headwater_workers", ())) == 2
                and sum(v for (n, _), v in found.items() if n == "headwater_consumer_lag_records")
                == 0
            ):
                break
            assert time.monotonic() < deadline, f"the metrics never showed the whole input: {found}"
            time.sleep(0.2)
        bad = len(range(0, ORDERS, BAD_EVERY))
        assert found[("headwater_step_records_out_total", step)] == ORDERS - bad
        assert found[("headwater_step_records_dead_lettered_total", step)] == bad
        assert found[("headwater_step_records_skipped_total", step)] == 0
        assert found[("headwater_source_records_written_total", (("source", "orders"),))] == ORDERS
        assert found[("headwater_worker_restarts_total", ())] == 0
        lags = {labels for (n, labels) in found if n == "headwater_consumer_lag_records"}
        assert (("partition", "2"), ("topic", "orders")) in lags
        assert found[("headwater_records_read_total", ())] >= ORDERS
    finally:
        (tmp_path / "gate").touch()
        code = runner.wait(60)
    assert code == 0, runner.stderr()
    with pytest.raises(OSError):  # the endpoint goes with the run
        scrape(port)


def test_a_metrics_port_in_use_is_a_user_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        runner = start_shop(tmp_path, int(taken.getsockname()[1]))
        code = runner.wait(60)
    stderr = runner.stderr()
    assert code == 2, stderr
    assert stderr.startswith("headwater: cannot serve metrics on 127.0.0.1:"), stderr
    assert "choose another --metrics-port" in " ".join(stderr.split())
    assert "Traceback" not in stderr
