"""Every wire-visible change to an object (fields, remotable signatures) needs a version bump.

If this fails you changed an object: bump its VERSION, add a history comment and an
``obj_make_compatible`` step, add the new version to ``releases.py``, then update the hash here.
"""

from __future__ import annotations

from oslo_versionedobjects import fixture

from shared_objects.base import FleetObjectRegistry

EXPECTED_HASHES = {
    "BlockDeviceMapping": "1.0-8d942395a86f8d835d82b61e222ee67d",
    "BlockDeviceMappingList": "1.0-afb991ba021c73f1770e96f99eb23c81",
    "ComputeNode": "1.0-585a7b06be6015549d3192ba326904e4",
    "ComputeNodeList": "1.0-e3901fcd0dce20e04448f4d60360b2bd",
    "Flavor": "1.0-53380539ed76c2d36ff84036c549be32",
    "FlavorList": "1.0-c58bfa22c9841f8c875e3ffd76903eca",
    "Instance": "1.1-ad1d5a163a7f49182253e29edf2d604f",
    "InstanceAction": "1.0-b59c3b2c029bbc9edf1cfdb7a9e63d46",
    "InstanceActionEvent": "1.0-ebe0e25d285dd662a2ec36342e139453",
    "InstanceActionEventList": "1.0-b3fc3522be30dce150b0d894e4641142",
    "InstanceActionList": "1.0-eb147ccef7f3bba10349aee2f374a07b",
    "InstanceFault": "1.0-f2882d5cafba9689976e441cb15fd2ee",
    "InstanceFaultList": "1.0-2639264b05ba3ba1aa9612c7578bebe4",
    "InstanceList": "1.0-daafe92b184928f7c3bd1227b7e6ae72",
    "LiveMigrateData": "1.1-f2c74d7536f96b67dcb6d2206d6612ec",
    "Migration": "1.1-d9d7827f35ace7f0d530cea4e77f349a",
    "MigrationList": "1.0-5ecf0fb171c3ff4a77a484038dcc0b24",
    "SecurityGroup": "1.0-23903dfd3fdbcf9e13b224e2c7458cbc",
    "SecurityGroupList": "1.0-32d605072ea12d771c678d23eb174aee",
    "SecurityGroupRule": "1.0-587407147d494473d278b5423b454ba9",
    "SecurityGroupRuleList": "1.0-31c7e4d81c6ae55e147a6e0a81b2803b",
    "Service": "1.0-45d4ebae81f073be98dce4caf45e44a7",
    "ServiceList": "1.0-2709fe759a091f6d65f9432b69183035",
}


def test_object_fingerprints_match_the_checked_in_hashes() -> None:
    checker = fixture.ObjectVersionChecker(FleetObjectRegistry.fleet_classes())  # type: ignore[arg-type]
    expected, actual = checker.test_hashes(EXPECTED_HASHES)
    assert expected == actual, (
        "objects changed without a version bump (or a new object has no hash): "
        f"expected {expected}, computed {actual}"
    )


def test_fingerprints_cover_remotable_method_signatures() -> None:
    checker = fixture.ObjectVersionChecker(FleetObjectRegistry.fleet_classes())  # type: ignore[arg-type]
    from shared_objects.objects import Instance

    original = Instance.save.original_fn  # type: ignore[attr-defined]
    before = checker.get_hashes()["Instance"]

    async def save(self, expected_task_state=None, expected_vm_state=None, extra=None):  # type: ignore[no-untyped-def]
        return None

    save.__name__ = "save"
    wrapper = Instance.__dict__["save"]
    wrapper.original_fn = save
    try:
        assert checker.get_hashes()["Instance"] != before
    finally:
        wrapper.original_fn = original
