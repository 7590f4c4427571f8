"""``QemuDriver``: real guests, one QEMU process each, driven over QMP.

Each guest lives in ``<state_dir>/qemu-<host>/<uuid>/``: ``guest.json`` (the record),
``serial.log`` (its console), ``qmp.sock``, ``qemu.pid``, ``qemu.log``. QEMU daemonizes, so
guests outlive the agent; ``init_host`` re-attaches to their QMP sockets. A guest is RUNNING
(ACTIVE for the agent) only once its init printed its first heartbeat on the serial console.

Volumes are raw files ``<volume_dir>/<volume_id>.img``, hot-plugged as virtio-blk on a free
PCIe root port (``blockdev-add`` + ``device_add``) and unplugged with ``device_del``, waiting
for ``DEVICE_DELETED``, then ``blockdev-del``. Guests have no network (``-nic none``): the
security-group rules are recorded and reported, not enforced. Live migration: the destination
starts QEMU with the same device set and ``-incoming defer``, the source migrates to it over
``tcp:127.0.0.1:<port>`` (``migration.py``). docs/virt.md §9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compute_agent.virt.capacity import host_resources
from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.models import GuestPhase, HasUUID, HostResources
from compute_agent.virt.qemu.lifecycle import QemuLifecycle
from compute_agent.virt.qemu.live_migration import QemuLiveMigration
from compute_agent.virt.qemu.recovery import QemuRecovery
from compute_agent.virt.qemu.volumes import QemuVolumes

#: Phases counted as running VMs (the fake also counts MIGRATING_OUT).
_RUNNING_PHASES = frozenset({GuestPhase.RUNNING})


class QemuDriver(QemuRecovery, QemuLifecycle, QemuVolumes, QemuLiveMigration):
    """Real guests under QEMU for one host. See the module docstring and docs/virt.md."""

    async def get_available_resource(self) -> HostResources:
        host = self._require_host()
        return host_resources(host, self.config, self._guests.values(), _RUNNING_PHASES, "qemu")

    async def refresh_instance_security_rules(
        self, instance: HasUUID, rules: Sequence[Mapping[str, Any]]
    ) -> None:
        normalized = normalize_rules(rules)
        guest = self._get(instance.uuid)
        if normalized != guest.rules:
            guest.rules = normalized
            await self._save(guest)

    async def get_firewall_rules(self, uuid: str) -> list[FirewallRule]:
        return [dict(r) for r in self._get(uuid).rules]

    async def unfilter_instance(self, instance: HasUUID) -> None:
        guest = self._guests.get(instance.uuid)
        if guest is not None and guest.rules:
            guest.rules = []
            await self._save(guest)
