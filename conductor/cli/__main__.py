"""``python -m conductor.cli`` is ``fleetctl``."""

import sys

from conductor.cli import main

sys.exit(main())
