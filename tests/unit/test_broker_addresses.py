"""Several broker addresses (the nodes of one RabbitMQ cluster) in one URL setting."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from vespid.client.broker_setup import _write_env
from vespid.shared.settings import ClientSettings
from vespid.shared.transport import broker_urls, redact, rotation, user_of

CLUSTER = ("amqp://farm:s3cret@rabbit1:5672/farm, amqp://farm:s3cret@rabbit2:5672/farm,"
           "amqp://farm:s3cret@rabbit3:5672/farm")


def test_a_comma_separated_url_names_every_node_in_order() -> None:
    assert broker_urls(CLUSTER) == [f"amqp://farm:s3cret@rabbit{i}:5672/farm" for i in (1, 2, 3)]
    assert broker_urls("amqp://guest:guest@localhost/%2F") == ["amqp://guest:guest@localhost/%2F"]


def test_every_password_is_hidden_and_the_user_is_the_first_addresses() -> None:
    shown = redact(CLUSTER)

    assert "s3cret" not in shown and shown.count(":***@") == 3
    assert user_of(CLUSTER) == "farm"


def test_settings_give_one_set_of_parameters_per_node_and_connect_tries_them_in_turn() -> None:
    params = ClientSettings(amqp_url=CLUSTER).broker_parameters("test")

    assert [p.host for p in params] == ["rabbit1", "rabbit2", "rabbit3"]
    assert [p.host for p in islice(rotation(params), 5)] == [
        "rabbit1", "rabbit2", "rabbit3", "rabbit1", "rabbit2"]


def test_broker_setup_writes_one_url_per_cluster_node(tmp_path: Path) -> None:
    env = tmp_path / "vespid-node-n1.env"

    _write_env(env, "vespid-node-n1", "p@ss", "rabbit1:5672, rabbit2:5672", "farm", {})

    url = env.read_text().splitlines()[0].removeprefix("VESPID_AMQP_URL=")
    assert broker_urls(url) == ["amqp://vespid-node-n1:p%40ss@rabbit1:5672/farm",
                                "amqp://vespid-node-n1:p%40ss@rabbit2:5672/farm"]
