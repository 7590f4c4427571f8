"""Live migration on the conductor (docs/live-migration.md), the counterpart of the agent's
``compute_agent.live_migration``:

* ``settings``: timeouts and limits, from the ``[live_migration]`` config section;
* ``checks``: the request's checks, before anything is written;
* ``task``: ``LiveMigrationTask``, the request, the prechecks, the hand-off to the source and
  what follows it, abort and force-complete;
* ``views``: migrations as operators see them.
"""

from conductor.tasks.live_migration.settings import LiveMigrationTaskSettings
from conductor.tasks.live_migration.task import LiveMigrationTask
from conductor.tasks.live_migration.views import migration_to_dict

__all__ = ["LiveMigrationTask", "LiveMigrationTaskSettings", "migration_to_dict"]
