"""``headwater acls``: what a pipeline is granted follows from its topology; a topic it only
reads or only writes through ``LogTopic`` gets only that, and transactional ids only under
exactly-once. (That the ACLs are enough is shown against a broker with ACLs enabled, in
tests/kafka/test_kafka_security.py.)"""

from __future__ import annotations

import connectors
from pipelines import Pipeline, Topic
from pipelines.runtime.acls import kafka_acls_commands, pipeline_acls
from pipelines.runtime.topology import compile_pipeline


def pipeline(guarantee: str) -> Pipeline:
    return (
        Pipeline("orders", processing_guarantee=guarantee)
        .source(connectors.LogTopic(Topic("shop.orders", partitions=2)))
        .key_by("by-customer", lambda order: order["customer"])
        .count("count")
        .sink(connectors.LogTopic(Topic("shop.counts", partitions=2)))
    )


def test_each_topic_gets_what_the_pipeline_does_with_it() -> None:
    acls = {
        (a.resource, a.name): a for a in pipeline_acls(compile_pipeline(pipeline("at_least_once")))
    }
    assert acls["Topic", "shop.orders"].operations == ("DESCRIBE", "DESCRIBE_CONFIGS", "READ")
    assert acls["Topic", "shop.counts"].operations == (
        "CREATE",
        "DESCRIBE",
        "DESCRIBE_CONFIGS",
        "WRITE",
    )
    owned = ("CREATE", "DESCRIBE", "DESCRIBE_CONFIGS", "READ", "WRITE")
    for name in ("orders.count.changelog", "orders.source-positions"):
        assert acls["Topic", name].operations == owned
    # a key_by topic is purged below the group's committed offsets (deleteRecords)
    assert acls["Topic", "orders.by-customer"].operations == (*owned, "DELETE")
    assert acls["Group", "orders"].operations == ("DESCRIBE", "READ")
    assert not any(resource == "TransactionalId" for resource, _ in acls)


def test_exactly_once_adds_the_transactional_ids_of_its_group_as_a_prefix() -> None:
    topology = compile_pipeline(pipeline("exactly_once"), group="orders-prod")
    (ids,) = [a for a in pipeline_acls(topology) if a.resource == "TransactionalId"]
    assert (ids.name, ids.prefixed, ids.operations) == ("orders-prod.", True, ("DESCRIBE", "WRITE"))
    (line,) = kafka_acls_commands([ids], "User:CN=svc", "kafka:9093")
    assert line == (
        "kafka-acls.sh --bootstrap-server kafka:9093 --add --allow-principal User:CN=svc "
        "--operation Describe --operation Write --transactional-id orders-prod. "
        "--resource-pattern-type prefixed"
    )
