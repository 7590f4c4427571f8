"""Checks of a live-migration request, before anything is written: each failure is an
``InvalidRequest`` that says what is wrong, and nothing changed."""

from __future__ import annotations

from conductor.scheduler import HostState, ResourceRequest, select_destinations
from shared_objects import exception
from shared_objects.exception import NoValidHost
from shared_objects.fields import VMState
from shared_objects.objects.instance import Instance


def invalid(reason: str) -> exception.InvalidRequest:
    return exception.InvalidRequest(reason=reason)


def check_instance(instance: Instance) -> str:
    """The instance can be migrated now; returns its (source) host."""
    if instance.vm_state != VMState.ACTIVE:
        raise invalid(f"instance {instance.uuid} is not ACTIVE (vm_state={instance.vm_state})")
    if instance.locked:
        raise invalid(f"instance {instance.uuid} is locked: {instance.locked_reason or '-'}")
    if instance.task_state is not None:
        raise invalid(
            f"instance {instance.uuid} is busy (task_state={instance.task_state}); "
            "a live migration needs an idle instance"
        )
    if not instance.host:
        raise invalid(f"instance {instance.uuid} is not on any host")
    return instance.host


def check_hosts(instance: Instance, source: str, dest: str | None, hosts: list[HostState]) -> None:
    """The source is up, and the destination (given or scheduled) can take the instance."""
    by_host = {h.host: h for h in hosts}
    src = by_host.get(source)
    if src is None or not src.service_up:
        raise invalid(f"the source host {source} is down; cannot live-migrate from it")
    req = ResourceRequest(instance.vcpus, instance.memory_mb, instance.root_gb)
    if dest is None:
        try:
            select_destinations(hosts, req, 1, alternates=0, ignore_hosts=[source])
        except NoValidHost as exc:
            raise invalid(f"no destination for {instance.uuid}: {exc}") from exc
        return
    if dest == source:
        raise invalid(f"instance {instance.uuid} is already on {dest}")
    target = by_host.get(dest)
    if target is None:
        raise invalid(f"destination {dest!r} is not a known compute host")
    if not target.service_up:
        raise invalid(f"destination {dest} is down")
    try:
        select_destinations(hosts, req, 1, alternates=0, force_host=dest)
    except NoValidHost as exc:
        raise invalid(f"destination {dest} cannot take {instance.uuid}: {exc}") from exc
