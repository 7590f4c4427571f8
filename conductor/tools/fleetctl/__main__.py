"""``python -m conductor.tools.fleetctl`` is ``fleetctl``."""

import sys

from conductor.tools.fleetctl import main

sys.exit(main())
