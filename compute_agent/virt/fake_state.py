"""The fake hypervisor's state: its host, its guests and their running copies, loaded from and
saved to a per-host JSON file (``state_store``) so a SIGKILLed agent finds its guests again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from compute_agent.virt._guest import GuestRecord
from compute_agent.virt.capacity import check_capacity, check_volumes_free, host_resources
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import InstanceNotFound, StateFileError
from compute_agent.virt.failures import FailureInjector
from compute_agent.virt.fake_config import FakeDriverConfig
from compute_agent.virt.models import GuestPhase, HostResources, InstanceLike
from compute_agent.virt.state_store import StateStore

LOG = structlog.get_logger(__name__)


#: Phases counted as running VMs.
_RUNNING_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.MIGRATING_OUT})


@dataclass
class _CopyJob:
    """Control block of one running memory copy (source side)."""

    dest: str
    abort_requested: bool = False
    abort_reason: str = "aborted"
    force_requested: bool = False
    switching: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class FakeDriverState(ComputeDriver):
    """The fake hypervisor's host and guests, kept in its state file (``state_store``)."""

    def __init__(self, config: FakeDriverConfig | None = None) -> None:
        self.config = config or FakeDriverConfig()
        self.failures = FailureInjector()
        if self.config.failures:
            self.failures.load_spec(self.config.failures)
        self.failures.watch_file(self.config.failures_file)
        self.host: str | None = None
        self._guests: dict[str, GuestRecord] = {}
        self._jobs: dict[str, _CopyJob] = {}
        self._store: StateStore | None = None

    async def init_host(self, host: str) -> None:
        if self.host is not None:
            raise RuntimeError(f"FakeDriver already initialised for host {self.host}")
        await self.failures.check("init_host", None)
        self.host = host
        if self.config.state_dir is None:
            return
        self._store = StateStore(
            self.config.state_dir / f"{host}.json", self._snapshot, fsync=self.config.fsync
        )
        try:
            await self._load(self._store)
        except BaseException:
            # Leave the driver as it was, so init_host can be retried once the cause is fixed.
            self.host, self._store, self._guests = None, None, {}
            raise
        LOG.info("fake_hypervisor_loaded", host=host, guests=len(self._guests))

    async def _load(self, store: StateStore) -> None:
        document = await store.load()
        if document is not None:
            if document.get("host") != self.host:
                raise StateFileError(path=str(store.path), reason="state of another host")
            try:
                guests = [
                    GuestRecord.from_json(g) for g in dict(document.get("guests") or {}).values()
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise StateFileError(path=str(store.path), reason=repr(exc)) from exc
            for guest in guests:
                self._recover(guest)
                self._guests[guest.uuid] = guest
        await self._save()

    @staticmethod
    def _recover(guest: GuestRecord) -> None:
        """What the agent's death did to a guest (the process that ran it died with it)."""
        if guest.phase is GuestPhase.SPAWNING:
            # The build never finished: the guest never ran and must be destroyed.
            guest.set_phase(GuestPhase.ERROR)
            guest.interrupted = "spawn"
        elif guest.phase is GuestPhase.MIGRATING_OUT:
            # The copy loop died before the switch-over: the guest never stopped running here.
            peer = guest.migration_peer
            guest.set_phase(GuestPhase.RUNNING)
            guest.interrupted = "live_migration_copy"
            LOG.info("fake_migration_interrupted", uuid=guest.uuid, dest=peer)

    async def cleanup_host(self) -> None:
        for job in list(self._jobs.values()):
            if not job.switching:
                job.abort_requested = True
                job.abort_reason = "host shutdown"
        for job in list(self._jobs.values()):
            await job.finished.wait()
        if self._store is not None:
            await self._store.flush()

    async def get_available_resource(self) -> HostResources:
        host = self._require_host()
        return host_resources(host, self.config, self._guests.values(), _RUNNING_PHASES, "fake")

    def _require_host(self) -> str:
        if self.host is None:
            raise RuntimeError("FakeDriver.init_host() has not been called")
        return self.host

    def _get(self, uuid: str) -> GuestRecord:
        guest = self._guests.get(uuid)
        if guest is None:
            raise InstanceNotFound(uuid=uuid)
        return guest

    def _check_capacity(self, instance: InstanceLike) -> None:
        check_capacity(self._require_host(), self.config, self._guests.values(), instance)

    def _check_volumes_free(self, uuid: str, volumes: Mapping[str, str]) -> None:
        check_volumes_free(self._guests.values(), uuid, volumes)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "hypervisor_hostname": self.config.hypervisor_hostname or self.host,
            "guests": {uuid: g.to_json() for uuid, g in self._guests.items()},
        }

    async def _save(self) -> None:
        if self._store is None:
            return
        self._store.mark_dirty()
        await self._store.flush()
