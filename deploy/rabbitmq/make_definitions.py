"""Writes ``deploy/rabbitmq/definitions.json``: the RabbitMQ users of the docker compose cluster.

    .venv/bin/python deploy/rabbitmq/make_definitions.py > deploy/rabbitmq/definitions.json

RabbitMQ loads the file at boot (``load_definitions`` in ``20-fleet.conf``): the vhost ``fleet``,
one login per service with the permissions of its role (the same regexes the test kit grants,
``shared_objects/testing/broker_logins``; docs/operations.md), the queue policies and reply
exchange of ``fleetctl broker setup`` (default limits), and ``fleet-admin`` for the
management UI only. No service logs in as the administrator; no ``guest`` user is created (a node
that loads definitions at boot seeds no default user).

The passwords are the compose file's, for a cluster on this machine only: a real deployment
creates its own (docs/operations.md, "Broker logins"). ``tests/unit/deploy`` checks that this
script, the JSON file and docker-compose.yml agree.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from shared_objects.runtime.messaging.topology import REPLY_EXCHANGE
from shared_objects.testing.broker_logins import BrokerLimits, BrokerLogins, hash_password

VHOST = "fleet"
CONTROL_EXCHANGE = "fleet"
ADMIN = ("fleet-admin", "fleet-admin-local-only")
# Compose service -> (login, password). Both conductor replicas share one conductor login.
SERVICE_LOGINS: dict[str, tuple[str, str]] = {
    "conductor": ("fleet-conductor", "conductor-local-only"),
    "migrate": ("fleet-operator", "operator-local-only"),
    "compute-1": ("fleet-host-compute-1", "compute-1-local-only"),
    "compute-2": ("fleet-host-compute-2", "compute-2-local-only"),
}
AGENT_HOSTS = ("compute-1", "compute-2")


def definitions() -> dict[str, Any]:
    logins = BrokerLogins(
        f"rabbit://unused@rabbitmq:5672/{VHOST}",
        VHOST,
        passwords=dict(SERVICE_LOGINS.values()),
        # The image runs this release's code: its queue names only.
        legacy_queue_names=False,
        agent_topic_queue=False,
    )
    logins.add(conductors=[""], operators=[""], hosts=AGENT_HOSTS, exchanges=[CONTROL_EXCHANGE])
    found = logins.definitions()
    admin, password = ADMIN
    return {
        "vhosts": [{"name": VHOST}],
        "users": [
            {
                "name": admin,
                "password_hash": hash_password(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
            },
            *found["users"],
        ],
        "permissions": [
            {"user": admin, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"},
            *found["permissions"],
        ],
        "topic_permissions": found["topic_permissions"],
        # The queue policies and the reply exchange of ``fleetctl broker setup`` (defaults).
        "policies": logins.policies(BrokerLimits()),
        "exchanges": [
            {
                "name": REPLY_EXCHANGE.name,
                "vhost": VHOST,
                "type": REPLY_EXCHANGE.type,
                "durable": REPLY_EXCHANGE.durable,
                "auto_delete": REPLY_EXCHANGE.auto_delete,
                "internal": False,
                "arguments": {},
            }
        ],
    }


if __name__ == "__main__":
    json.dump(definitions(), sys.stdout, indent=2)
    sys.stdout.write("\n")
