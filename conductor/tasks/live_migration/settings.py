"""The conductor's live-migration timeouts and limits, from the ``[live_migration]`` section.

The section (``shared_objects.runtime.config.LiveMigrationConfig``) is shared with the agents, which
read their own options from it (``compute_agent/live_migration/settings.py``). The defaults
here equal the section's (a unit test keeps them equal).
"""

from __future__ import annotations

import dataclasses

from shared_objects.runtime.config import LiveMigrationConfig


@dataclasses.dataclass(slots=True)
class LiveMigrationTaskSettings:
    """Limits and timeouts of the conductor's live-migration task."""

    #: Destinations tried (each refusing host excluded) before the request fails.
    max_attempts: int = 3
    #: ``[service] service_down_time``: when a host counts as down.
    service_down_time: float = 60.0
    #: Heartbeat window of the calls to agents: a silent agent is taken as dead after it.
    call_monitor_timeout: float = 10.0
    #: Overall bound of the prechecks call.
    precheck_timeout: float = 120.0
    #: Overall bound of the whole migration (the source's call returns when it ends).
    migration_timeout: float = 6 * 3600.0
    #: Abort and force-complete calls.
    rpc_timeout: float = 30.0

    @classmethod
    def from_config(
        cls, section: LiveMigrationConfig, service_down_time: float
    ) -> LiveMigrationTaskSettings:
        """The conductor's options of a validated ``[live_migration]`` section."""
        own = {f.name for f in dataclasses.fields(cls)} - {"service_down_time"}
        return cls(
            service_down_time=service_down_time, **{name: getattr(section, name) for name in own}
        )
