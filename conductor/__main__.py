"""``conductor`` console script: run one conductor until SIGTERM/SIGINT.

Exits with status 2 and a one-line reason when the configuration is invalid or the database
schema is not at this release's head (run ``fleetctl db upgrade``).
"""

from __future__ import annotations

import argparse
import sys

from conductor.service import ConductorService
from shared_objects import exception
from shared_objects.config import add_config_arguments, config_from_args
from shared_objects.log import configure_service_logging
from shared_objects.rpc_clients.conductor import TOPIC as CONDUCTOR_TOPIC
from shared_objects.service_runner import run, run_service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conductor", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument(
        "--topic",
        default=CONDUCTOR_TOPIC,
        help="RPC topic to serve (default: conductor); queues are named by topic, so separate "
        "deployments or tests sharing a RabbitMQ vhost need distinct topics",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, prog="conductor")
    configure_service_logging(cfg, "conductor")
    try:
        run(run_service(ConductorService(cfg, topic=args.topic), cfg, "conductor"))
    except (exception.SchemaNotAtHead, exception.ServiceTooOld, exception.WrongIdentity) as exc:
        print(f"conductor: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
