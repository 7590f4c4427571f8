"""The release table: what each Fleet release speaks.

For every release: the service version number (stored in the ``services`` table and compared by
``Service.get_minimum_version``), the compute and conductor RPC API versions, and the object
version manifest (``{object name: version}``). Senders use an older release's entry to talk to
older peers: RPC API caps, and object arguments serialised at that release's versions
(``FleetObjectSerializer(version_manifest=release.objects)``).

Adding a release: append an entry; bump ``SERVICE_VERSION``; the test
``tests/unit/shared_objects/test_releases.py`` checks the current entry against the registered
object classes, so a version bump that forgets this table fails.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

BINARY_CONDUCTOR = "fleet-conductor"
BINARY_COMPUTE = "fleet-compute"


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """What one release speaks."""

    name: str
    service_version: int
    compute_rpc_api: str
    conductor_rpc_api: str
    objects: Mapping[str, str]
    # The git commit the release was cut at (upgrade tests run that commit's real code);
    # None for the release being developed.
    commit: str | None = None


_OBJECTS_1_0 = types.MappingProxyType(
    {
        "BlockDeviceMapping": "1.0",
        "BlockDeviceMappingList": "1.0",
        "ComputeNode": "1.0",
        "ComputeNodeList": "1.0",
        "Flavor": "1.0",
        "FlavorList": "1.0",
        "Instance": "1.0",
        "InstanceAction": "1.0",
        "InstanceActionEvent": "1.0",
        "InstanceFault": "1.0",
        "InstanceList": "1.0",
        "LiveMigrateData": "1.0",
        "Migration": "1.0",
        "MigrationList": "1.0",
        "SecurityGroup": "1.0",
        "SecurityGroupList": "1.0",
        "SecurityGroupRule": "1.0",
        "SecurityGroupRuleList": "1.0",
        "Service": "1.0",
        "ServiceList": "1.0",
    }
)

_OBJECTS_1_1 = types.MappingProxyType(
    {**_OBJECTS_1_0, "Instance": "1.1", "LiveMigrateData": "1.1", "Migration": "1.1"}
)

# 1.2 adds objects only operators read (fleetctl action list/show); nothing else changes shape.
_OBJECTS_1_2 = types.MappingProxyType(
    {
        **_OBJECTS_1_1,
        "InstanceActionEventList": "1.0",
        "InstanceActionList": "1.0",
        "InstanceFaultList": "1.0",
    }
)

RELEASES: tuple[Release, ...] = (
    Release(
        name="1.0",
        service_version=1,
        compute_rpc_api="1.0",
        conductor_rpc_api="1.0",
        objects=_OBJECTS_1_0,
        commit="e5f7502dcafab62e84ca9da18927cd9f8e5cc4ae",
    ),
    # 1.1: Instance locks, Migration disk progress, LiveMigrateData bandwidth limit, and
    #      compute RPC 1.1 (live_migration_abort takes a reason) and 1.2 (run_instance takes
    #      the BDMs, the security group rules and event_started from the conductor).
    #      Compute RPC 1.2 came while 1.1 was still in development: no agent speaking only 1.1
    #      was ever released, so service version 2 keeps meaning "1.1 code" and needs no bump.
    Release(
        name="1.1",
        service_version=2,
        compute_rpc_api="1.2",
        conductor_rpc_api="1.0",
        objects=_OBJECTS_1_1,
        commit="7dede75a5cd028dc5c7b9197c74482254041502b",
    ),
    # 1.2: per-host identity and authorisation (docs/security.md). No message or object changes
    #      shape, so the RPC APIs and objects stay as in 1.1; what changes is who may send what:
    #      one broker login per host, the conductor's policy table and ownership scopes, agents
    #      serving compute RPC to conductors (and live-migration peers) only, replies accepted
    #      from the login called, builds assigned to their host when placed (agents take only
    #      their own), and reschedules that prove the failed build was the caller's. Agents of
    #      1.0 and 1.1 keep working on the legacy shared login while a conductor lists them.
    # 1.2 also: conductor RPC 1.1 (report_alive, the cheap heartbeat; agents beat with
    #      Service.heartbeat while a conductor of 1.1 or older is alive).
    # 1.2 also: InstanceActionList, InstanceActionEventList and InstanceFaultList (new objects,
    #      read by operators only: `fleetctl action list|show`); existing objects unchanged.
    Release(
        name="1.2",
        service_version=3,
        compute_rpc_api="1.2",
        conductor_rpc_api="1.1",
        objects=_OBJECTS_1_2,
    ),
)

CURRENT: Release = RELEASES[-1]
SERVICE_VERSION: int = CURRENT.service_version


def by_name(name: str) -> Release:
    """The release called ``name`` (KeyError if unknown)."""
    for release in RELEASES:
        if release.name == name:
            return release
    raise KeyError(name)


def name_of_service_version(version: int) -> str:
    """What to show beside a service version (``fleetctl services``): the name of the release
    that stores it, ``newer than <current>`` for a version this code does not know yet, and
    ``unknown`` for one no release ever stored."""
    for release in RELEASES:
        if release.service_version == version:
            return release.name
    if version > SERVICE_VERSION:
        return f"newer than {CURRENT.name}"
    return "unknown"


def for_service_version(version: int) -> Release:
    """The newest release whose service version is at most ``version`` (a peer's release).

    A version older than every known release maps to the oldest one.
    """
    chosen = RELEASES[0]
    for release in RELEASES:
        if release.service_version <= version:
            chosen = release
    return chosen


def for_compute_rpc_api(version: str) -> Release:
    """The newest release whose compute RPC API is ``version`` or older (a caller asking for
    ``version`` understands at least that release's objects)."""
    wanted = tuple(int(p) for p in version.split("."))
    chosen = RELEASES[0]
    for release in RELEASES:
        if tuple(int(p) for p in release.compute_rpc_api.split(".")) <= wanted:
            chosen = release
    return chosen
