"""``compute-agent`` console script: run the agent of one host until SIGTERM/SIGINT.

The host name comes from ``--host``, ``FLEET_HOST`` or the config file. Agents never get a
database URL: everything they read or write goes through the conductor.
"""

from __future__ import annotations

import argparse
import sys

from compute_agent.service import ComputeAgentService
from shared_objects import exception
from shared_objects.config import add_config_arguments, config_from_args
from shared_objects.log import configure_service_logging
from shared_objects.service_runner import run, run_service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compute-agent", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--host", help="this host's name (default: $FLEET_HOST or hostname)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, prog="compute-agent")
    if args.host:
        cfg.host = args.host
    configure_service_logging(cfg, "compute-agent")
    try:
        service = ComputeAgentService(cfg)
    except ValueError as exc:
        print(f"compute-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        run(run_service(service, cfg, "compute-agent"))
    except (exception.ServiceTooNew, exception.WrongIdentity) as exc:
        print(f"compute-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
