"""`vespid broker setup`: users, permissions and topic permissions, least privilege.

Through RabbitMQ's management HTTP API, idempotently: running it again changes nothing
(passwords already written to an env file are kept). Each role gets its own user, with
the permissions of docs/security.md: the coordinator everything; the log server
(`vespid-logserver`) its own queue, `vespid.logs` and `vespid.dead`; a node `vespid`, its own
queue and `vespid.dead`, publishing only key `coordinator`; a client its own server-named
queues and `vespid.events`, publishing only key `coordinator`.

So a client cannot publish to `node.*` or consume a node's queue, and a node cannot read
another node's queue. Passwords are generated (or taken from VESPID_PASSWORD_<USER>) and
written to `<env-dir>/<user>.env` (mode 0600) as VESPID_AMQP_URL, never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vespid.shared.errors import BrokerError, ConfigError


@dataclass(frozen=True)
class Grant:
    user: str
    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str = ".*"


def coordinator_user(farm: str) -> str:
    return f"{farm}-coordinator"


def node_user(farm: str, node: str) -> str:
    return f"{farm}-node-{node}"


def grants(farm: str, nodes: list[str], clients: list[str]) -> list[Grant]:
    """Every user of a farm, named `<farm>-<role>`, so several farms share one broker."""
    found = [Grant(coordinator_user(farm), ".*", ".*", ".*", ".*"),
             # The log server: its own queue and vespid.logs, dead-letters to vespid.dead,
             # replies to log-get through the default exchange; nothing on `vespid`.
             Grant(f"{farm}-logserver",
                   "^(vespid\\.logs|vespid\\.logserver|vespid\\.dead)$",
                   "^(vespid\\.logserver|vespid\\.dead|amq\\.default)$",
                   "^(vespid\\.logs|vespid\\.logserver)$", "^$", "^$")]
    for node in nodes:
        queue = re.escape(f"vespid.node.{node}")
        found.append(Grant(node_user(farm, node), f"^(vespid|vespid\\.logs|{queue})$",
                           f"^(vespid|vespid\\.logs|{queue}|vespid\\.dead)$",
                           f"^(vespid|{queue})$",
                           # the request channel and the node channel (contract v1.1)
                           "^coordinator(\\.node)?$", f"^node\\.{re.escape(node)}$"))
    for client in clients:
        found.append(Grant(f"{farm}-{client}", "^amq\\.gen-.*$",
                           "^(vespid|vespid\\.logs|amq\\.gen-.*)$",
                           "^(vespid\\.events|vespid\\.logs|amq\\.gen-.*|"
                           "amq\\.rabbitmq\\.reply-to)$",
                           "^coordinator$", "^$"))
    return found


class Management:
    # urllib.request is imported by the two calls that use it: `vespid` builds every
    # subcommand's parser at start, the coordinator's too, and urllib.request (with the
    # http.client and email packages it imports) was a tenth of the CLI's own imports.
    def __init__(self, url: str, user: str, password: str, dry_run: bool) -> None:
        self.url, self.dry_run = url.rstrip("/"), dry_run
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def get(self, path: str) -> Any:
        """The JSON at `path`, or None when it does not exist."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url + path, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise BrokerError(f"the management API refused to read {path}: {exc.code}") \
                from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerError(f"no RabbitMQ management API at {self.url} ({exc}); enable it "
                              "with `rabbitmq-plugins enable rabbitmq_management`") from None

    def put(self, path: str, body: dict[str, Any], what: str) -> None:
        sys.stdout.write(f"{'would ' if self.dry_run else ''}{what}\n")
        if self.dry_run:
            return
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         self.headers, method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=30):
                pass
        except urllib.error.HTTPError as exc:
            raise BrokerError(f"the management API refused to {what}: {exc.code} "
                              f"{exc.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerError(f"no RabbitMQ management API at {self.url} ({exc}); enable it "
                              "with `rabbitmq-plugins enable rabbitmq_management`") from None


def password_for(user: str, env_file: Path) -> str:
    given = os.environ.get(f"VESPID_PASSWORD_{re.sub(r'[^A-Za-z0-9]', '_', user).upper()}")
    if given:
        return given
    if env_file.exists():
        match = re.search(r"://[^:]+:([^@]+)@", env_file.read_text())
        if match:
            return match.group(1)
    return secrets.token_urlsafe(24)


def farm_of(vhost: str) -> str:
    """The default farm name: the vhost's, as far as it makes a user name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", vhost) or "vespid"


def setup(args: argparse.Namespace) -> int:
    admin_password = os.environ.get("VESPID_BROKER_ADMIN_PASSWORD", "guest")
    api = Management(args.management_url, args.admin_user, admin_password, args.dry_run)
    vhost = quote(args.vhost, safe="")
    farm = args.farm or farm_of(args.vhost)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", farm):
        raise ConfigError(f"farm name {farm!r}: use letters, digits, '_', '.', '-' (1-60)")
    env_dir = Path(args.env_dir)
    users = grants(farm, _names(args.nodes), _names(args.clients))
    for grant in users:  # before changing anything: never take over another farm's user
        _must_be_ours(api, grant.user, args.vhost)
    api.put(f"/api/vhosts/{vhost}", {}, f"create vhost {args.vhost}")
    settings = {coordinator_user(farm): {"VESPID_REQUIRE_USER_ID": "true"}}
    settings.update({node_user(farm, n): {"VESPID_COORDINATOR_USER": coordinator_user(farm)}
                     for n in _names(args.nodes)})
    for grant in users:
        env_file = env_dir / f"{grant.user}.env"
        password = password_for(grant.user, env_file)
        api.put(f"/api/users/{quote(grant.user)}", {"password": password, "tags": ""},
                f"create user {grant.user}")
        api.put(f"/api/permissions/{vhost}/{quote(grant.user)}",
                {"configure": grant.configure, "write": grant.write, "read": grant.read},
                f"grant {grant.user} configure {grant.configure!r} write {grant.write!r} "
                f"read {grant.read!r}")
        api.put(f"/api/topic-permissions/{vhost}/{quote(grant.user)}",
                {"exchange": "vespid", "write": grant.topic_write, "read": grant.topic_read},
                f"let {grant.user} publish to exchange vespid with keys {grant.topic_write!r}")
        if not args.dry_run:
            _write_env(env_file, grant.user, password, args.amqp_host, vhost,
                       settings.get(grant.user, {}))
            sys.stdout.write(f"wrote {env_file} (mode 0600)\n")
    return 0


def _must_be_ours(api: Management, user: str, vhost: str) -> None:
    """A user with permissions on another vhost belongs to another farm: re-passwording it
    would lock that farm out."""
    if api.get(f"/api/users/{quote(user)}") is None:
        return
    elsewhere = sorted({p["vhost"] for p in api.get(f"/api/users/{quote(user)}/permissions")
                        or [] if p["vhost"] != vhost})
    if elsewhere:
        raise ConfigError(f"user {user} already belongs to another farm (vhost "
                          f"{', '.join(elsewhere)}); changing its password would lock that "
                          "farm out: give this farm another name with --farm")


def _names(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", n)]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not a valid node or user name")
    return names


def _write_env(path: Path, user: str, password: str, host: str, vhost: str,
               settings: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        # One URL per broker node (a cluster's), all with the same login.
        urls = [f"amqp://{quote(user)}:{quote(password, safe='')}@{one.strip()}/{vhost}"
                for one in host.split(",") if one.strip()]
        handle.write(f"VESPID_AMQP_URL={','.join(urls)}\n")
        handle.writelines(f"{key}={value}\n" for key, value in settings.items())
    os.chmod(path, 0o600)


def add_commands(sub: Any) -> None:
    broker = sub.add_parser("broker", help="set up RabbitMQ for a secured farm")
    commands = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    p = commands.add_parser("setup", help="create the vhost, users and permissions",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--management-url", default="http://localhost:15672",
                   help="RabbitMQ management API (default http://localhost:15672)")
    p.add_argument("--admin-user", default="guest",
                   help="an administrator (password from VESPID_BROKER_ADMIN_PASSWORD)")
    p.add_argument("--vhost", default="vespid", help="the farm's vhost (default vespid)")
    p.add_argument("--farm", help="prefix of every user it makes, `<farm>-coordinator`, "
                                  "`<farm>-node-<n>`, `<farm>-<client>`, so several farms "
                                  "share one broker (default: the vhost's name)")
    p.add_argument("--nodes", help="node names, comma-separated: one user each")
    p.add_argument("--clients", help="client user names, comma-separated")
    p.add_argument("--amqp-host", default="localhost:5672",
                   help="host:port written into the env files (default localhost:5672); "
                        "a cluster's nodes comma-separated (rabbit1:5672,rabbit2:5672)")
    p.add_argument("--env-dir", default="vespid-credentials",
                   help="where the per-user env files go (default ./vespid-credentials)")
    p.add_argument("--dry-run", action="store_true", help="print what it would do, do nothing")
    p.set_defaults(handler=setup)
