from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ha.cluster import ClusterError, LocalCluster, local_cluster
from tests.postgres import fresh_database


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A three-node RabbitMQ cluster on this machine (hare1..hare3@localhost), made once
    for the tests that ask for it and stopped and deleted after them (their logs are kept
    in the run's temporary folder, cluster-logs/)."""
    try:
        with local_cluster(3, keep_logs=tmp_path_factory.mktemp("cluster-logs")) as made:
            yield made
    except ClusterError as exc:
        pytest.fail(f"could not make the local RabbitMQ cluster: {exc}")


@pytest.fixture
def vhost(cluster: LocalCluster) -> Iterator[str]:
    """A vhost of this test's own on the cluster (guest may use it)."""
    with cluster.fresh_vhost() as name:
        yield name
        # A test that failed with a node down leaves the cluster whole for the next one.
        for node in cluster.nodes:
            if node.name not in cluster.running_nodes():
                cluster.start_app(node)


@pytest.fixture
def state_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own, the state its coordinators share."""
    with fresh_database("vespid_ha") as url:
        yield url
