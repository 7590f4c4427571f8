"""Live migration on the agent (docs/live-migration.md), one module per part:

* ``settings``: timeouts and limits, from the ``[live_migration]`` config section;
* ``source``: the source drives the migration (``progress``: its progress reports);
* ``destination``: the checks, the paused incoming guest, the switch-over at the destination;
* ``control``: abort and force-complete of a running migration;
* ``resolver``: settling a migration whose outcome is unknown, from both hypervisors' phases;
* ``recovery``: settling at start, and the sweep for migrations their conductor never handed over;
* ``jobs``, ``records``: the source-side job table; status, fault and action records;
* ``manager``: ``LiveMigrationManager``, all parts together, what the RPC endpoint calls.

Imports go one way: ``manager`` → the parts → ``resolver`` → ``settings``
(``tests/unit/test_layers.py`` checks there is no cycle).
"""

from compute_agent.live_migration.manager import LiveMigrationManager
from compute_agent.live_migration.resolver import MigrationResolver
from compute_agent.live_migration.settings import LiveMigrationSettings

__all__ = ["LiveMigrationManager", "LiveMigrationSettings", "MigrationResolver"]
