"""The tests in this folder run their farm on the local broker cluster (tests/ha/cluster.py)
instead of the machine's broker: these fixtures replace the shared ones of the same names
(test_standby, one folder up, keeps the machine's broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ha.cluster import LocalCluster
from tests.raw import RawPeer


@pytest.fixture
def amqp_url(cluster: LocalCluster, vhost: str) -> str:
    """Every node, in the cluster's order: what the CLI and the shared fixtures use."""
    return cluster.url(vhost)


@pytest.fixture
def first_node_url(cluster: LocalCluster, vhost: str) -> str:
    """hare1 alone: the test's own raw peer, never on a node a test stops or cuts off."""
    return cluster.node_url(cluster.nodes[0], vhost)


@pytest.fixture
def raw(first_node_url: str) -> Iterator[RawPeer]:
    peer = RawPeer(first_node_url)
    yield peer
    peer.close()
