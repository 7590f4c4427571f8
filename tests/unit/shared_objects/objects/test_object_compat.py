"""Compatibility routines: every object backports to every minor of its major version, and the
release table matches what is registered."""

from __future__ import annotations

import pytest
from oslo_utils import versionutils
from sample_values import populated

from conductor.testing import (
    CURRENT_INSTANCE_VERSION,
    NEWER_INSTANCE_FIELD,
    NEWER_INSTANCE_VERSION,
    isolated_registry,
    register_newer_instance,
)
from shared_objects import releases
from shared_objects.base import FleetObject, FleetObjectRegistry, obj_tree_get_versions

OBJECT_NAMES = sorted(FleetObjectRegistry.fleet_classes())


def _minors(version: str) -> list[str]:
    major, minor = versionutils.convert_version_to_tuple(version)[:2]
    return [f"{major}.{m}" for m in range(minor + 1)]


@pytest.mark.parametrize("objname", OBJECT_NAMES)
def test_every_object_serialises_at_every_minor_and_reads_back(objname: str) -> None:
    obj = populated(objname)
    manifest = obj_tree_get_versions(objname)
    for version in _minors(obj.VERSION):
        primitive = obj.obj_to_primitive(target_version=version, version_manifest=manifest)
        assert primitive["versioned_object.version"] == version
        back = FleetObject.obj_from_primitive(primitive)
        assert back.obj_name() == objname
        # Every field the target version knows survives the trip.
        for name in primitive["versioned_object.data"]:
            assert back.obj_attr_is_set(name)


def test_newer_minor_drops_its_field_when_made_compatible_with_the_older() -> None:
    with isolated_registry():
        newer = register_newer_instance()
        obj = newer(uuid="3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11", host="h")
        setattr(obj, NEWER_INSTANCE_FIELD, "x")
        current = obj.obj_to_primitive()
        assert current["versioned_object.version"] == NEWER_INSTANCE_VERSION
        assert NEWER_INSTANCE_FIELD in current["versioned_object.data"]
        older = obj.obj_to_primitive(target_version=CURRENT_INSTANCE_VERSION)
        assert older["versioned_object.version"] == CURRENT_INSTANCE_VERSION
        assert NEWER_INSTANCE_FIELD not in older["versioned_object.data"]
        assert older["versioned_object.data"]["host"] == "h"
    # The registry is back to the release's versions.
    assert FleetObjectRegistry.fleet_classes()["Instance"][0].VERSION == CURRENT_INSTANCE_VERSION


def test_current_release_manifest_equals_the_registered_classes() -> None:
    registered = {
        name: classes[0].VERSION for name, classes in FleetObjectRegistry.fleet_classes().items()
    }
    assert dict(releases.CURRENT.objects) == registered


def test_release_table_is_ordered_and_current_is_last() -> None:
    versions = [r.service_version for r in releases.RELEASES]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert releases.SERVICE_VERSION == releases.RELEASES[-1].service_version
    assert releases.for_service_version(releases.SERVICE_VERSION) is releases.CURRENT
    assert releases.for_service_version(0) is releases.RELEASES[0]
    assert releases.by_name("1.0").conductor_rpc_api == "1.0"


def test_a_service_version_is_shown_by_its_release_name() -> None:
    assert [releases.name_of_service_version(r.service_version) for r in releases.RELEASES] == [
        r.name for r in releases.RELEASES
    ]
    newer = releases.SERVICE_VERSION + 1
    assert releases.name_of_service_version(newer) == f"newer than {releases.CURRENT.name}"
    assert releases.name_of_service_version(0) == "unknown"
