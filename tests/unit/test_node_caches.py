"""A node keeps what it derives between scheduling passes (its standing offer, its free
resources); whatever changes what they derive from must drop them. These tests fail if a
cache outlives the change."""

from __future__ import annotations

from vespid.coordinator.state import Node


def node(capabilities: dict[str, object] | None = None) -> Node:
    return Node(name="n1", capabilities=capabilities or {"cores": 8, "memory": 1000,
                                                         "usage_gpu": True},
                repositories={"//n1/r": {"type": "git"}}, last_seen=0.0)


def test_free_resources_follow_every_reserve_and_release() -> None:
    made = node()
    assert made.free_resources() == {"cores": 8.0, "memory": 1000.0}  # now cached
    made.reserve({"cores": 3, "memory": 100})
    assert made.free_resources() == {"cores": 5.0, "memory": 900.0}
    made.reserve({"cores": 5})
    assert made.free_resources() == {"cores": 0.0, "memory": 900.0}
    made.release({"cores": 3, "memory": 100})
    assert made.free_resources() == {"cores": 3.0, "memory": 1000.0}


def test_a_caller_changing_its_copy_of_free_resources_changes_nothing() -> None:
    made = node()
    made.free_resources()["cores"] = 0.0
    assert made.free_resources()["cores"] == 8.0


def test_new_capabilities_give_a_new_standing_offer_and_free_resources() -> None:
    made = node()
    assert made.labels.carried == frozenset({"gpu"})
    made.free_resources()
    made.capabilities = {"cores": 16, "usage_linux": True}  # as a node-set replaces them
    assert made.free_resources() == {"cores": 16.0}
    assert made.labels.carried == frozenset({"linux"})
    assert made.resources() == {"cores": 16.0}


def test_new_repositories_give_a_new_standing_offer() -> None:
    made = node()
    assert made.standing().repos == {"//n1/r": "git"}
    made.repositories = {"//n1/s": {"type": "svn"}}
    assert made.standing().repos == {"//n1/s": "svn"}
