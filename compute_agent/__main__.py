"""``compute-agent`` console script: run the agent of one host until SIGTERM/SIGINT.

The host name comes from ``--host``, ``FLEET_HOST`` or the config file. Agents never get a
database URL: everything they read or write goes through the conductor.

Exit status: 0 stopped, 2 configuration error (or a login or release the fleet refuses),
3 broker or conductor not reachable within ``[service] start_retry_timeout`` (one line on
stderr naming what to check; ``--debug`` adds the traceback). See docs/operations.md.
"""

from __future__ import annotations

import argparse
import sys

from compute_agent.service import ComputeAgentService
from shared_objects.runtime.config import config_from_args
from shared_objects.runtime.log import configure_service_logging
from shared_objects.runtime.service_runner import add_service_arguments, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compute-agent", description=__doc__)
    add_service_arguments(parser)
    parser.add_argument("--host", help="this host's name (default: $FLEET_HOST or hostname)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, prog="compute-agent")
    configure_service_logging(cfg, "compute-agent")
    return serve("compute-agent", lambda: ComputeAgentService(cfg), cfg, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
