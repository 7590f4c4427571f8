"""``conductor`` console script: run one conductor until SIGTERM/SIGINT.

Exit status: 0 stopped, 2 configuration error or a refusal to start as configured (schema not
at this release's head: run ``fleetctl db upgrade``; a broker login that is not a conductor's),
3 database or broker not reachable within ``[service] start_retry_timeout`` (one line on
stderr naming what to check; ``--debug`` adds the traceback). See docs/operations.md.
"""

from __future__ import annotations

import argparse
import sys

from conductor.service import ConductorService
from shared_objects.rpc_clients.conductor import TOPIC as CONDUCTOR_TOPIC
from shared_objects.runtime.config import config_from_args
from shared_objects.runtime.log import configure_service_logging
from shared_objects.runtime.service_runner import add_service_arguments, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conductor", description=__doc__)
    add_service_arguments(parser)
    parser.add_argument(
        "--topic",
        default=CONDUCTOR_TOPIC,
        help="RPC topic to serve (default: conductor); queues are named by topic, so separate "
        "deployments or tests sharing a RabbitMQ vhost need distinct topics",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, prog="conductor")
    configure_service_logging(cfg, "conductor")
    return serve(
        "conductor", lambda: ConductorService(cfg, topic=args.topic), cfg, debug=args.debug
    )


if __name__ == "__main__":
    sys.exit(main())
