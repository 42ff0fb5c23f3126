"""``headwater acls``: the Kafka ACLs a pipeline's run needs, derived from its topology.

On a cluster with an authorizer, the principal a pipeline runs as needs, and needs no more
than:

- on every topic the pipeline owns (the topics its sources write, its ``key_by`` repartition
  topics, state and event-time changelogs, source positions, dead letters and late data):
  ``CREATE`` (a run creates the missing ones), ``DESCRIBE``, ``DESCRIBE_CONFIGS`` (a run reads
  whether a topic is compacted, and its retention), ``READ`` and ``WRITE``;
- on a topic it reads with ``LogTopic`` and does not own: ``DESCRIBE``, ``DESCRIBE_CONFIGS``
  and ``READ``; on one a ``LogTopic`` sink writes: ``DESCRIBE``, ``DESCRIBE_CONFIGS`` and
  ``WRITE`` (and ``CREATE`` if it is to be created);
- on its consumer group: ``READ`` and ``DESCRIBE``;
- under exactly-once, on the transactional ids of its tasks' producers (``<group>.`` and the
  sub-topology and partition): ``WRITE`` and ``DESCRIBE``, as one prefixed ACL.

Each ACL is literal (the exact name) but the transactional ids'. :func:`kafka_acls_commands`
gives them as the lines of Kafka's own ``kafka-acls.sh`` tool.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipelines.runtime.topology import Topology
from pipelines.steps import KeyByStep, ReadStep, WriteStep

__all__ = ["Acl", "kafka_acls_commands", "pipeline_acls"]

Resource = Literal["Topic", "Group", "TransactionalId"]

_OWNED = ("CREATE", "DESCRIBE", "DESCRIBE_CONFIGS", "READ", "WRITE")
_TOOL_NAMES = {"DESCRIBE_CONFIGS": "DescribeConfigs"}  # kafka-acls.sh --operation names


@dataclass(frozen=True, slots=True)
class Acl:
    """One ACL to grant: ``operations`` on the resource ``name`` (a prefix if ``prefixed``)."""

    resource: Resource
    name: str
    operations: tuple[str, ...]
    why: str
    prefixed: bool = False

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "operations": list(self.operations)}


def pipeline_acls(topology: Topology) -> list[Acl]:
    """The ACLs a run of ``topology`` needs (see the module docstring)."""
    steps = topology.pipeline.steps
    read = {s.topic.name for s in steps if isinstance(s, ReadStep)}
    written = {s.topic.name for s in steps if isinstance(s, WriteStep)}
    repartitioned = {s.topic.name for s in steps if isinstance(s, KeyByStep)}
    acls: list[Acl] = []
    for topic in [*topology.topics, topology.positions_topic]:
        name = topic.name
        if name in read and name not in written:
            operations = ("DESCRIBE", "DESCRIBE_CONFIGS", "READ")
            acls.append(Acl("Topic", name, operations, "read with LogTopic"))
        elif name in written and name not in read:
            why = "written by a LogTopic sink (CREATE only if the run is to create it)"
            acls.append(
                Acl("Topic", name, ("CREATE", "DESCRIBE", "DESCRIBE_CONFIGS", "WRITE"), why)
            )
        elif name in repartitioned:
            why = "the pipeline's own, purged below its committed offsets (DELETE)"
            acls.append(Acl("Topic", name, (*_OWNED, "DELETE"), why))
        else:
            acls.append(Acl("Topic", name, _OWNED, "the pipeline's own"))
    acls.append(Acl("Group", topology.group, ("DESCRIBE", "READ"), "its workers' consumer group"))
    if topology.pipeline.processing_guarantee == "exactly_once":
        why = "its tasks' transactional producers (exactly-once)"
        acls.append(Acl("TransactionalId", f"{topology.group}.", ("DESCRIBE", "WRITE"), why, True))
    return acls


_FLAGS: dict[Resource, str] = {
    "Topic": "--topic",
    "Group": "--group",
    "TransactionalId": "--transactional-id",
}


def kafka_acls_commands(acls: list[Acl], principal: str, bootstrap: str) -> list[str]:
    """``kafka-acls.sh`` command lines that grant ``acls`` to ``principal``."""
    lines = []
    for acl in acls:
        operations = " ".join(
            f"--operation {_TOOL_NAMES.get(op, op.title())}" for op in acl.operations
        )
        pattern = " --resource-pattern-type prefixed" if acl.prefixed else ""
        lines.append(
            f"kafka-acls.sh --bootstrap-server {bootstrap} --add --allow-principal {principal} "
            f"{operations} {_FLAGS[acl.resource]} {acl.name}{pattern}"
        )
    return lines
