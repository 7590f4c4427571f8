"""What both halves of live migration on one host are built from, wired once.

``Source`` and ``Destination`` use the same collaborators (the manager builds them once and
shares them, so a settings change reaches both); ``Half`` holds them as attributes.
"""

from __future__ import annotations

import dataclasses

from compute_agent.live_migration.resolver import MigrationResolver
from compute_agent.live_migration.settings import LiveMigrationSettings
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.transient import Retrier
from compute_agent.virt.driver import ComputeDriver
from shared_objects.notifications import InstanceNotifier
from shared_objects.rpc_clients.compute import ComputeAPI


@dataclasses.dataclass(frozen=True)
class Wiring:
    """The collaborators of one host's live migration (built by ``LiveMigrationManager``)."""

    host: str
    driver: ComputeDriver
    tracker: ResourceTracker
    compute: ComputeAPI
    notifier: InstanceNotifier
    settings: LiveMigrationSettings
    calls: Retrier
    resolver: MigrationResolver


class Half:
    """One half of live migration (source or destination) on this host."""

    def __init__(self, wiring: Wiring) -> None:
        self.host = wiring.host
        self.driver = wiring.driver
        self.tracker = wiring.tracker
        self.compute = wiring.compute
        self.notifier = wiring.notifier
        self.settings = wiring.settings
        self.calls = wiring.calls
        self.resolver = wiring.resolver
