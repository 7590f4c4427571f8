"""Volume attach and detach on the agent (detach_volume is one of the Juno work items).

The conductor waits for both calls, so their conductor calls ride out an outage only as long
as it waits (``CALLER_BOUND``). What is decided by the hypervisor's answer: a failed attach or
detach raises (the conductor then forgets the mapping it made for an attach); once the
hypervisor has attached a volume, the attach succeeds whatever happens to its records (an
event or action left unrecorded is logged), so the mapping is never dropped under a guest that
uses it.
"""

from __future__ import annotations

import structlog

from compute_agent.instance_events import instance_event
from compute_agent.transient import TRANSIENT_ERRORS, Retrier, is_not_found, short
from compute_agent.virt.driver import ComputeDriver
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.block_device_mapping import BlockDeviceMapping
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.runtime.messaging import MessagingError

log = structlog.get_logger(__name__)

# Seconds of retries within one volume call: under the conductor's call timeout (60 s by
# default), so the agent's answer reaches it while it still waits.
CALLER_BOUND = 30.0


class VolumeManager:
    def __init__(
        self,
        host: str,
        driver: ComputeDriver,
        notifier: InstanceNotifier,
        calls: Retrier | None = None,
    ) -> None:
        self.host = host
        self.driver = driver
        self.notifier = notifier
        base = calls if calls is not None else Retrier()
        self.calls = base.with_total(min(base.policy.total, CALLER_BOUND))

    async def attach_volume(
        self, ctxt: RequestContext, instance: Instance, bdm: BlockDeviceMapping
    ) -> None:
        volume_id = bdm.volume_id or ""
        mountpoint = bdm.device_name or "/dev/vdb"
        extra = {"volume_id": volume_id}
        await self._notify(ctxt, instance, "instance.volume_attach.start", extra)
        attached = False
        try:
            async with instance_event(
                ctxt, instance.uuid, "compute_attach_volume", self.host, calls=self.calls
            ):
                await self.driver.attach_volume(instance, volume_id, mountpoint)
                attached = True
        except TRANSIENT_ERRORS as exc:
            if not attached:
                raise
            log.warning(
                "volume_attach_event_not_recorded", instance_uuid=instance.uuid, error=short(exc)
            )
        await self._finish_action(ctxt, instance.uuid)
        await self._notify(ctxt, instance, "instance.volume_attach.end", extra)

    async def detach_volume(self, ctxt: RequestContext, instance: Instance, volume_id: str) -> None:
        """Disconnect in the hypervisor, then forget the mapping; notifications around both."""
        extra = {"volume_id": volume_id}
        calls = self.calls
        # Re-read before touching the hypervisor: the instance must still be here and idle
        # (the compare-and-swap on no task fails if a migration or delete has started).
        current = await calls.call(
            "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
        )
        if current.host != self.host:
            raise exception.InvalidRequest(
                reason=f"instance {instance.uuid} is on {current.host}, not {self.host}"
            )
        # Changes nothing: a retry after a lost reply asks the same question again.
        await calls.save(ctxt, "check idle", current, [None])
        await self._notify(ctxt, instance, "instance.volume_detach.start", extra)
        async with instance_event(
            ctxt, instance.uuid, "compute_detach_volume", self.host, calls=calls
        ):
            bdm = await calls.call(
                "read BDM",
                lambda: BlockDeviceMapping.get_by_volume_and_instance(
                    ctxt, volume_id, instance.uuid
                ),
            )
            await self.driver.detach_volume(instance, volume_id)
            try:
                await calls.write("forget BDM", bdm.destroy, done_if=is_not_found)
            except TRANSIENT_ERRORS as exc:
                # Detached in the hypervisor, still mapped in the database: say so plainly
                # (the caller gets the error; the operator sees which volume).
                log.error(
                    "volume_detached_mapping_left",
                    instance_uuid=instance.uuid,
                    volume_id=volume_id,
                    error=short(exc),
                )
                raise
        await self._finish_action(ctxt, instance.uuid)
        await self._notify(ctxt, instance, "instance.volume_detach.end", extra)
        log.info("volume_detached", instance_uuid=instance.uuid, volume_id=volume_id)

    async def _finish_action(self, ctxt: RequestContext, instance_uuid: str) -> None:
        try:
            await self.calls.call(
                "finish action", lambda: InstanceAction.action_finish(ctxt, instance_uuid)
            )
        except TRANSIENT_ERRORS as exc:
            log.warning("action_finish_not_recorded", instance_uuid=instance_uuid, error=short(exc))

    async def _notify(
        self, ctxt: RequestContext, instance: Instance, event_type: str, extra: dict[str, str]
    ) -> None:
        """Best effort: a broker outage must not fail the volume change."""
        try:
            await self.notifier.emit(ctxt, instance, event_type, extra=extra)
        except MessagingError as exc:
            log.warning("notification_not_sent", event_type=event_type, error=short(exc))
