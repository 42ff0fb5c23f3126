"""Which member stands by which partitions (``standby_assignment``): every partition's standby
is on another member than its owner once there are two members, none with one, and every
member computes the same answer from the member list alone."""

from __future__ import annotations

import pytest

from pipelines.log._local import range_assignment, standby_assignment
from pipelines.log.base import TopicPartition

TOPICS = {"events": 6, "events.by-key": 6, "lookup": 3}


@pytest.mark.parametrize("members", [2, 3, 4, 7])
def test_every_partition_has_its_standby_on_another_member(members: int) -> None:
    ids = [f"m{i}" for i in range(members)]
    owners = range_assignment(ids, TOPICS)
    standbys = standby_assignment(ids, owners)
    owner_of = {tp: member for member, tps in owners.items() for tp in tps}
    stood_by = [(tp, member) for member, tps in standbys.items() for tp in tps]
    assert sorted(tp for tp, _ in stood_by) == sorted(owner_of)  # each exactly once
    assert all(owner_of[tp] != member for tp, member in stood_by)


def test_the_standby_of_a_member_is_the_next_one() -> None:
    owners = range_assignment(["a", "b", "c"], {"t": 3})
    assert standby_assignment(["c", "a", "b"], owners) == {
        "a": {TopicPartition("t", 2)},
        "b": {TopicPartition("t", 0)},
        "c": {TopicPartition("t", 1)},
    }


def test_one_member_stands_by_nothing() -> None:
    owners = range_assignment(["only"], TOPICS)
    assert standby_assignment(["only"], owners) == {"only": set()}
    assert standby_assignment([], {}) == {}


def test_a_co_partitioned_task_has_one_standby() -> None:
    """The partitions of one task (the same number of co-partitioned topics) stand by on one
    member, so that member can take the whole task over."""
    ids = ["a", "b", "c"]
    standbys = standby_assignment(ids, range_assignment(ids, TOPICS))
    for partition in range(6):
        holders = {
            member
            for member, tps in standbys.items()
            for tp in tps
            if tp.partition == partition and tp.topic != "lookup"
        }
        assert len(holders) == 1
