"""A real Faust app (faust-streaming, as a ``faust worker`` subprocess) and a Headwater pipeline
(``headwater run``) on one Kafka broker, each reading what the other writes.

The test writes orders as plain JSON. The Faust app turns each into a ``faust.Record`` on a
topic of its own, counts each customer's orders in a table through a ``group_by``, and counts
them per minute of their event time in a windowed table. The Headwater pipeline reads the
Faust records (``FaustRecord``), re-keys them by customer and joins both tables' changelogs
(``faust_table``), and writes Faust records back, which a second Faust agent reads into its
Record class and reports field by field. Every reported field is compared with a reference
computed here from the orders alone: the order's exact decimal amount and datetime as Faust
built them, the customer's number of orders, and the start and count of the customer's most
recent minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner
from support.kafka import create_topic, end_offsets
from test_kafka_pipelines import Sent, kafka_flags, produce_records, read_records, run_headwater

Names = Callable[[str], str]

PARTITIONS = 3
ORDERS = 240
MINUTE = 60
CUSTOMERS = ["ana", "bob", "Zoë", "李", "eve", "omar", "kim"]

FAUST_APP = """
import json
import os
from datetime import datetime
from decimal import Decimal

import faust

app = faust.App(
    os.environ["APP_ID"],
    broker="kafka://" + os.environ["BROKER"],
    datadir=os.environ["DATADIR"],
    store="memory://",
    web_enabled=False,
    topic_partitions={partitions},
)


class Order(faust.Record, coerce=True, namespace="shop.Order"):
    id: str
    customer: str
    amount: Decimal
    at: datetime
    ts: float


class Enriched(faust.Record, coerce=True, namespace="shop.Enriched"):
    id: str
    customer: str
    amount: Decimal
    at: datetime
    ts: float
    orders_of_customer: int
    window_start: float
    orders_in_window: int


raw = app.topic(os.environ["RAW"])
orders = app.topic(os.environ["ORDERS"], value_type=Order)
enriched = app.topic(os.environ["ENRICHED"], value_type=Enriched)
receipts = app.topic(os.environ["RECEIPTS"])
counts = app.Table("counts", default=int)
per_minute = (
    app.Table("per-minute", default=int)
    .tumbling({minute}, expires=86400 * 365)
    .relative_to_field(Order.ts)
)


@app.agent(raw)
async def intake(lines):
    async for line in lines:
        order = Order(
            id=line["id"],
            customer=line["customer"],
            amount=Decimal(line["amount"]),
            at=datetime.fromisoformat(line["at"]),
            ts=line["ts"],
        )
        await orders.send(key=order.id, value=order)


@app.agent(orders)
async def count(stream):
    async for order in stream.group_by(Order.customer):
        counts[order.customer] += 1
        per_minute[order.customer] += 1


@app.agent(enriched)
async def receive(stream):
    async for record in stream:
        receipt = {{
            "id": record.id,
            "customer": record.customer,
            "amount": str(record.amount),
            "amount_type": type(record.amount).__name__,
            "at": record.at.isoformat(),
            "at_type": type(record.at).__name__,
            "orders_of_customer": record.orders_of_customer,
            "window_start": record.window_start,
            "orders_in_window": record.orders_in_window,
            "record_type": type(record).__name__,
        }}
        await receipts.send(key=record.id, value=json.dumps(receipt).encode())
"""

PIPELINE = """
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel

from connectors.faust import FaustRecord, FaustWindowed, faust_table
from connectors.topic import LogTopic
from pipelines import Pipeline, Topic


class Order(BaseModel):
    id: str
    customer: str
    amount: Decimal
    at: datetime
    ts: float


class Enriched(Order):
    orders_of_customer: int
    window_start: float
    orders_in_window: int


orders = Topic(
    "{orders}",
    partitions={partitions},
    value=FaustRecord(Order, namespace="shop.Order"),
)
counts = faust_table("{app_id}", "counts", partitions={partitions})
per_minute = faust_table("{app_id}", "per-minute", partitions={partitions}, windowed=True)
enriched = Topic(
    "{enriched}",
    partitions={partitions},
    value=FaustRecord(Enriched, namespace="shop.Enriched"),
)


def with_count(order: Order, count: int) -> dict:
    return {{**order.model_dump(), "orders_of_customer": count}}


def with_window(order: dict, minute: FaustWindowed) -> Enriched:
    return Enriched(**order, window_start=minute.start, orders_in_window=minute.value)


pipeline = (
    Pipeline("{name}")
    .source(LogTopic(orders))
    .key_by("by-customer", lambda order: order.customer)
    .join_table("with-count", counts, with_count)
    .join_table("with-minute", per_minute, with_window)
    .sink(LogTopic(enriched))
)
"""


def make_orders(now: float) -> list[dict[str, Any]]:
    """Orders over the last ten minutes, with exact decimal amounts and UTC datetimes."""
    rng = random.Random(20240)
    made = []
    for i in range(ORDERS):
        ts = round(now - rng.uniform(0, 600), 3)
        made.append(
            {
                "id": f"o-{i}",
                "customer": rng.choice(CUSTOMERS),
                "amount": str(Decimal(rng.randint(1, 99_999)) / 100),
                "at": datetime.fromtimestamp(ts, UTC).isoformat(),
                "ts": ts,
            }
        )
    return made


def expected_reports(orders: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the Faust agent must report for each order, from the orders alone."""
    counts = Counter(order["customer"] for order in orders)
    minutes: dict[str, Counter[float]] = defaultdict(Counter)
    for order in orders:
        minutes[order["customer"]][float(order["ts"] // MINUTE * MINUTE)] += 1
    latest = {customer: max(starts) for customer, starts in minutes.items()}
    return {
        order["id"]: {
            "id": order["id"],
            "customer": order["customer"],
            "amount": order["amount"],
            "amount_type": "Decimal",
            "at": order["at"],
            "at_type": "datetime",
            "orders_of_customer": counts[order["customer"]],
            "window_start": latest[order["customer"]],
            "orders_in_window": minutes[order["customer"]][latest[order["customer"]]],
            "record_type": "Enriched",
        }
        for order in orders
    }


@contextlib.contextmanager
def faust_worker(directory: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``faust -A shop_faust worker`` in the background, in its own session; killed, with
    anything it started, if it is still running when the block ends."""
    (directory / "shop_faust.py").write_text(FAUST_APP.format(partitions=PARTITIONS, minute=MINUTE))
    log = (directory / "faust.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "shop_faust", "worker", "-l", "warn"],
        cwd=directory,
        env={**os.environ, **env, "PYTHONPATH": str(directory)},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        log.close()


def stop(process: subprocess.Popen[bytes], directory: Path) -> None:
    """SIGTERM, as a service manager stops a Faust worker; it must stop cleanly."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the Faust worker did not stop on SIGTERM:\n{faust_log(directory)}")


def faust_log(directory: Path) -> str:
    return "\n".join((directory / "faust.log").read_text(errors="replace").splitlines()[-40:])


def wait_for(
    condition: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    directory: Path,
    timeout: float = 40.0,
) -> None:
    """Poll ``condition``; fail when it stays false ``timeout`` s or the Faust worker ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the Faust worker ended before {what}:\n{faust_log(directory)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{faust_log(directory)}")
        time.sleep(0.3)


def latest_values(bootstrap: str, topic: str) -> dict[bytes, bytes | None]:
    """Each key's last value on a changelog topic (``None`` for a tombstone)."""
    return {r.key: r.value for r in read_records(bootstrap, topic, PARTITIONS)}


def partition(key: bytes) -> int:
    return DefaultPartitioner()(key, list(range(PARTITIONS)), list(range(PARTITIONS)))


@pytest.mark.timeout(150)
def test_a_faust_app_and_a_pipeline_read_each_others_records_and_tables(
    kafka: str, kafka_names: Names, tmp_path: Path
) -> None:
    app_id = kafka_names("faust-shop")
    topics = {
        "RAW": kafka_names("shop-raw"),
        "ORDERS": kafka_names("shop-orders"),
        "ENRICHED": kafka_names("shop-enriched"),
        "RECEIPTS": kafka_names("shop-receipts"),
    }
    for topic in topics.values():
        create_topic(kafka, topic, PARTITIONS)
    orders = make_orders(time.time())
    expected = expected_reports(orders)
    # The changelogs are partitioned by the customer's raw text, not by their JSON keys:
    # the join finds its rows only if Headwater knows that (here it would differ).
    moved = [c for c in CUSTOMERS if partition(c.encode()) != partition(json.dumps(c).encode())]
    assert moved, "no customer tells the two partitionings apart: pick other names"

    env = {"APP_ID": app_id, "BROKER": kafka, "DATADIR": str(tmp_path / "faust-data"), **topics}
    started = time.monotonic()
    with faust_worker(tmp_path, env) as worker:
        lines = [Sent(o["id"], json.dumps(o).encode(), ()) for o in orders]
        produce_records(kafka, topics["RAW"], lines)

        counts_topic = f"{app_id}-counts-changelog"
        minutes_topic = f"{app_id}-per-minute-changelog"

        def faust_counted_everything() -> bool:
            if sum(end_offsets(kafka, counts_topic, PARTITIONS).values()) < len(CUSTOMERS):
                return False
            latest = latest_values(kafka, counts_topic)
            return sum(json.loads(v) for v in latest.values() if v is not None) == ORDERS

        wait_for(faust_counted_everything, "the Faust table to count every order", worker, tmp_path)
        faust_ready = time.monotonic() - started

        # What the Faust app wrote: Faust records, tables keyed by JSON.
        faust_orders = read_records(kafka, topics["ORDERS"], PARTITIONS)
        assert len(faust_orders) == ORDERS
        assert all(b'"__faust":{"ns":"shop.Order"}' in r.value for r in faust_orders)
        counted = latest_values(kafka, counts_topic).items()
        assert {json.loads(k): json.loads(v) for k, v in counted if v is not None} == Counter(
            o["customer"] for o in orders
        )
        assert all(k.startswith(b"[") for k in latest_values(kafka, minutes_topic))

        module = tmp_path / "shop_pipeline.py"
        module.write_text(
            textwrap.dedent(PIPELINE).format(
                name=kafka_names("shop"),
                orders=topics["ORDERS"],
                enriched=topics["ENRICHED"],
                app_id=app_id,
                partitions=PARTITIONS,
            )
        )
        result = run_headwater(
            ["run", str(module), "--workers", "1", "--no-progress", *kafka_flags(kafka)],
            cwd=tmp_path,
            name="run",
        )
        assert result.code == 0, result.stderr
        assert "Traceback" not in result.stderr

        written = read_records(kafka, topics["ENRICHED"], PARTITIONS)
        assert len(written) == ORDERS
        assert all(r.value.endswith(b',"__faust":{"ns":"shop.Enriched"}}') for r in written)

        wait_for(
            lambda: sum(end_offsets(kafka, topics["RECEIPTS"], PARTITIONS).values()) >= ORDERS,
            "the Faust agent to read every record Headwater wrote",
            worker,
            tmp_path,
        )
        stop(worker, tmp_path)
    receipts = [json.loads(r.value) for r in read_records(kafka, topics["RECEIPTS"], PARTITIONS)]
    assert len(receipts) == ORDERS
    by_id = {receipt["id"]: receipt for receipt in receipts}
    assert by_id.keys() == expected.keys()
    for order_id, receipt in by_id.items():
        assert receipt == expected[order_id], order_id
    assert faust_ready < 40 and result.seconds < 40
