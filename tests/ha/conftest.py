from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ha.cluster import ClusterError, LocalCluster, local_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A three-node RabbitMQ cluster on this machine (hare1..hare3@localhost), made once
    for the tests that ask for it and stopped and deleted after them."""
    try:
        with local_cluster(3) as made:
            yield made
    except ClusterError as exc:
        pytest.fail(f"could not make the local RabbitMQ cluster: {exc}")
