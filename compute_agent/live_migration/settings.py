"""The agent's live-migration timeouts and limits, taken from the ``[live_migration]`` section.

The section (``shared_objects.runtime.config.LiveMigrationConfig``) is shared with the conductor's
live-migration task; an agent reads only the options below. The defaults here equal the
section's (a unit test keeps them equal), so code built without a configuration behaves like an
agent started without one.
"""

from __future__ import annotations

import dataclasses

from shared_objects.runtime.config import LiveMigrationConfig


@dataclasses.dataclass(slots=True)
class LiveMigrationSettings:
    """Timeouts and limits of the agent's live-migration flow (mutable: tests tune them)."""

    #: Call-monitor window of long calls to peers: a peer silent this long is taken as dead.
    #: Heartbeats come every half of it (whole seconds; at least 2 s to get any).
    call_monitor_timeout: float = 10.0
    #: Overall bound of a long call (a slow but alive peer may take this long).
    long_call_timeout: float = 6 * 3600.0
    #: Plain calls: abort, force-complete.
    rpc_timeout: float = 30.0
    #: Asking a peer for its guest's phase (recovery): short, so a start with a dead peer
    #: is not held up; an unanswered question is simply asked again later.
    phase_query_timeout: float = 5.0
    #: Minimum seconds between two progress saves (the final report is always saved).
    progress_interval: float = 0.5
    #: Copies running at once with this host as source; the rest wait in ``queued``.
    max_concurrent: int = 16
    #: Migrations from this host accepted at once (each holds an RPC handler slot for its
    #: whole duration: keep it well below the server's ``max_concurrency``). Beyond it the
    #: source precheck refuses.
    max_in_flight: int = 32
    #: Seconds between attempts to settle a migration whose peer did not answer.
    settle_retry_interval: float = 5.0
    #: How long to keep trying to reach the copy when an abort/force arrives at its very start.
    control_grace: float = 2.0
    #: A migration from this host still ``accepted``/``queued`` this many seconds after its
    #: last change, with no job here, lost its conductor: it is settled (ends ``error``).
    orphan_after: float = 900.0
    #: Seconds between two looks for such orphans.
    orphan_check_interval: float = 60.0

    @classmethod
    def from_config(cls, section: LiveMigrationConfig) -> LiveMigrationSettings:
        """The agent's options of a validated ``[live_migration]`` section."""
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})
