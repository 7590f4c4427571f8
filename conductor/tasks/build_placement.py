"""Placing builds: the settings of the build flow and choosing a host for each instance (the
conductor's host view and placement ledger), with the extras agents of compute RPC 1.2 take
(``build_extras.py``).
"""

from __future__ import annotations

import dataclasses
import datetime

from conductor.db.session import Database
from conductor.host_view import FleetView, HostView, HostViewSettings
from conductor.scheduler import HostState, ResourceRequest, select_destinations
from conductor.tasks.build_extras import RUN_EVENT, BuildExtras, start_run_event
from conductor.tasks.hosts import PlacementLedger
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.exception import NoValidHost
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action_event import InstanceActionEvent
from shared_objects.rpc_clients.compute import ComputeAPI


@dataclasses.dataclass(frozen=True, slots=True)
class _Record:
    """What the request's unit of work created for one instance."""

    instance: Instance
    bdms: BlockDeviceMappingList
    action_id: int


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(slots=True)
class BuildSettings:
    max_attempts: int = 3
    alternates: int = 2
    service_down_time: float = 60.0


def _invalid(reason: str) -> exception.InvalidRequest:
    return exception.InvalidRequest(reason=reason)


class BuildPlacement:
    """Choosing hosts for builds (the conductor's host view and placement ledger)."""

    def __init__(
        self,
        database: Database,
        compute: ComputeAPI,
        settings: BuildSettings | None = None,
        host_view: HostView | None = None,
    ) -> None:
        self.database = database
        self.compute = compute
        self.settings = settings or BuildSettings()
        self.ledger = PlacementLedger()
        # This conductor's cached view of the hosts, shared with live migration.
        self.host_view = host_view or HostView(
            HostViewSettings(service_down_time=self.settings.service_down_time)
        )

    async def _extras_for_request(
        self,
        ctxt: RequestContext,
        records: list[_Record],
        picks: list[list[HostState]],
    ) -> list[BuildExtras | None]:
        """For each instance whose host speaks compute RPC 1.2: its BDMs and its started event;
        None for the others (they get the 1.0 message)."""
        extras: list[BuildExtras | None] = []
        for record, pick in zip(records, picks, strict=True):
            host = pick[0].host
            if not self.compute.can_send_build_extras(host):
                extras.append(None)
                continue
            # The action was created in this unit of work: start the event under it directly.
            await InstanceActionEvent.start_under(ctxt, record.action_id, RUN_EVENT, host)
            extras.append(BuildExtras(block_device_mappings=record.bdms, event_started=True))
        return extras

    async def _schedule(
        self,
        ctxt: RequestContext,
        req: ResourceRequest,
        count: int,
        *,
        force_host: str | None = None,
        ignore_hosts: list[str] | None = None,
    ) -> list[list[HostState]]:
        """Pick hosts from the cached view; a refusal (no valid host, unknown forced host) is
        checked again on a view refreshed now, since the cache may lag by a refresh interval
        (a host that just came up, capacity just freed)."""
        view = await self.host_view.fleet(ctxt)
        if force_host is None or any(h.host == force_host for h in view.states):
            try:
                return self._place(
                    view, req, count, force_host=force_host, ignore_hosts=ignore_hosts
                )
            except NoValidHost:
                pass
        view = await self.host_view.fleet(ctxt, fresh=True)
        if force_host is not None and not any(h.host == force_host for h in view.states):
            raise _invalid(f"forced host {force_host!r} is not a known compute host")
        return self._place(view, req, count, force_host=force_host, ignore_hosts=ignore_hosts)

    def _place(
        self,
        view: FleetView,
        req: ResourceRequest,
        count: int,
        *,
        force_host: str | None = None,
        ignore_hosts: list[str] | None = None,
    ) -> list[list[HostState]]:
        # No await from here to the end: concurrent requests see each other's placements.
        states = self.ledger.apply(view.states, view.reported_at, view.positions)
        picks = select_destinations(
            states,
            req,
            count,
            alternates=self.settings.alternates,
            force_host=force_host,
            ignore_hosts=ignore_hosts or (),
            floors=view.floors,
        )
        for pick in picks:
            self.ledger.record(pick[0].host, req)
        return picks

    async def _extras_for_reschedule(
        self, ctxt: RequestContext, instance: Instance, host: str
    ) -> BuildExtras:
        # A reschedule is a request of its own: nothing of the first attempt's unit of work is
        # at hand, so read what the agent would have read (at most four queries, no RPC).
        return BuildExtras(
            block_device_mappings=await BlockDeviceMappingList.get_by_instance_uuid(
                ctxt, instance.uuid
            ),
            event_started=await start_run_event(ctxt, instance.uuid, host),
        )
