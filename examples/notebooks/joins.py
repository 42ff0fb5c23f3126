"""Joins for ``notebooks/joins.ipynb``: orders enriched from a customer table, and orders
matched with their payments.

    headwater run examples/notebooks/joins.py:load      # the customers and orders topics
    headwater run examples/notebooks/joins.py:inner     # orders of known customers
    headwater run examples/notebooks/joins.py:left      # every order, customer or not
    headwater run examples/notebooks/joins.py:paid      # orders paid within 10 minutes

- ``load`` reads ``customers.jsonl`` into the compacted topic ``customers`` (keyed by customer
  id: the latest line of an id is its row) and
  ``orders.jsonl`` into ``orders``. In production both topics are written by other services.
- ``inner`` and ``left`` read ``orders``, re-key each order by its customer (``key_by``, to 3
  partitions like the table) and look the customer up (``join_table``). ``inner`` drops an order
  whose customer has no row; ``left`` keeps it with ``customer`` None.
- ``paid`` and ``paid_or_not`` join two streams: orders and payments, both keyed by order id,
  an order and a payment matching when their event times are at most 10 minutes apart
  (``join_stream``). ``paid_or_not`` also emits the orders that found no payment.

``JOINS_DATA`` is the directory of the input files (default ``data``), ``JOINS_OUTPUT`` that of
the output files (default ``out``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import connectors
from pipelines import Pipeline, Topic

DATA = Path(os.environ.get("JOINS_DATA", "data"))
OUT = Path(os.environ.get("JOINS_OUTPUT", "out"))
WITHIN = timedelta(minutes=10)

CUSTOMERS = Topic("customers", partitions=3, compacted=True)
ORDERS = Topic("orders", partitions=3)


load = (
    Pipeline("load")
    .source(connectors.JsonLines(DATA / "customers.jsonl", key=lambda c: c["id"]), into=CUSTOMERS)
    .source(connectors.JsonLines(DATA / "orders.jsonl"), into=ORDERS)
)


def with_customer(order: dict[str, Any], customer: dict[str, Any] | None) -> dict[str, Any]:
    """An order with its customer's name and tier (None for an unknown customer)."""
    return {
        **order,
        "customer": None if customer is None else customer["name"],
        "tier": None if customer is None else customer["tier"],
    }


def enriched(name: str, how: str) -> Pipeline:
    return (
        Pipeline(name)
        .source(connectors.LogTopic(ORDERS))
        .key_by("by-customer", lambda order: order["customer_id"], partitions=3)
        .join_table("with-customer", CUSTOMERS, with_customer, how=how)  # type: ignore[arg-type]
        .sink(connectors.JsonLinesSink(OUT / f"orders-{how}.jsonl"), step_id="file")
    )


inner = enriched("orders-inner", "inner")
left = enriched("orders-left", "left")


def paid_order(order: dict[str, Any], payment: dict[str, Any] | None) -> dict[str, Any]:
    """An order with the payment that matched it (None: none within the bound)."""
    return {
        "order": order["id"],
        "ordered": order["ts"],
        "paid": None if payment is None else payment["ts"],
        "amount": None if payment is None else payment["amount"],
    }


def payments_join(name: str, how: str) -> Pipeline:
    chain = Pipeline(name)
    payments = chain.source(
        connectors.JsonLines(DATA / "payments.jsonl", key=lambda p: p["order"]),
        into=Topic("payments", partitions=3, time=lambda p: p["ts"]),
    )
    return (
        chain.source(
            connectors.JsonLines(DATA / "orders.jsonl", key=lambda o: o["id"]),
            into=Topic("orders-by-id", partitions=3, time=lambda o: o["ts"]),
        )
        .join_stream("with-payment", payments, WITHIN, paid_order, how=how)  # type: ignore[arg-type]
        .sink(connectors.JsonLinesSink(OUT / f"payments-{how}.jsonl"), step_id="file")
    )


paid = payments_join("paid", "inner")
paid_or_not = payments_join("paid-or-not", "left")
