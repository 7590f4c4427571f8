"""Volumes attach/detach per guest, and per-guest firewall rules."""

from __future__ import annotations

from typing import Any

import pytest
from virt_testlib import MakeDriver, spec

from compute_agent.virt import (
    InstanceNotFound,
    InvalidFirewallRule,
    InvalidGuestState,
    VolumeAlreadyAttached,
    VolumeNotAttached,
    normalize_rule,
    normalize_rules,
)


def rule(
    protocol: str | None,
    from_port: int | None,
    to_port: int | None,
    cidr: str | None,
    group: int | None = None,
    direction: str = "ingress",
) -> dict[str, object]:
    """A rule in the canonical form the driver reports."""
    return {
        "protocol": protocol,
        "from_port": from_port,
        "to_port": to_port,
        "cidr": cidr,
        "grantee_group_id": group,
        "direction": direction,
    }


async def test_attach_and_detach_volumes(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1"), "img", [{"volume_id": "boot-data", "mountpoint": "/dev/vdb"}])
    await driver.attach_volume(spec("i1"), "v2", "/dev/vdc")
    assert await driver.get_volumes("i1") == {"boot-data": "/dev/vdb", "v2": "/dev/vdc"}
    await driver.detach_volume(spec("i1"), "boot-data")
    assert await driver.get_volumes("i1") == {"v2": "/dev/vdc"}
    with pytest.raises(VolumeNotAttached):
        await driver.detach_volume(spec("i1"), "boot-data")


async def test_attach_is_idempotent_but_conflicts_are_refused(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1"), "img")
    await driver.spawn(spec("i2"), "img")
    await driver.attach_volume(spec("i1"), "v1", "/dev/vdb")
    await driver.attach_volume(spec("i1"), "v1", "/dev/vdb")  # redelivered
    with pytest.raises(VolumeAlreadyAttached):
        await driver.attach_volume(spec("i1"), "v2", "/dev/vdb")  # mountpoint taken
    with pytest.raises(VolumeAlreadyAttached):
        await driver.attach_volume(spec("i2"), "v1", "/dev/vdb")  # volume on another guest
    assert await driver.get_volumes("i2") == {}


async def test_spawn_with_a_duplicate_volume_is_refused(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    bdms = [
        {"volume_id": "v1", "mountpoint": "/dev/vdb"},
        {"volume_id": "v2", "mountpoint": "/dev/vdb"},
    ]
    with pytest.raises(VolumeAlreadyAttached):
        await driver.spawn(spec("i1"), "img", bdms)
    assert await driver.list_instance_uuids() == []


async def test_volume_calls_on_a_missing_guest_raise_not_found(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    with pytest.raises(InstanceNotFound):
        await driver.attach_volume(spec("ghost"), "v1", "/dev/vdb")
    with pytest.raises(InstanceNotFound):
        await driver.get_volumes("ghost")


async def test_volumes_cannot_change_while_a_migration_holds_the_guest(
    make_driver: MakeDriver,
) -> None:
    dest = await make_driver("dst")
    await dest.pre_live_migration(spec("i1"), {"source_host": "src", "volumes": {"v1": "/dev/vdb"}})
    with pytest.raises(InvalidGuestState):
        await dest.attach_volume(spec("i1"), "v2", "/dev/vdc")
    with pytest.raises(InvalidGuestState):
        await dest.detach_volume(spec("i1"), "v1")
    await dest.post_live_migration_at_destination(spec("i1"))
    await dest.detach_volume(spec("i1"), "v1")  # after the migration it works
    assert await dest.get_volumes("i1") == {}


async def test_volumes_on_a_stopped_guest_can_be_managed(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1"), "img")
    await driver.power_off(spec("i1"))
    await driver.attach_volume(spec("i1"), "v1", "/dev/vdb")
    await driver.detach_volume(spec("i1"), "v1")
    assert await driver.get_volumes("i1") == {}


async def test_refresh_replaces_the_rules_of_one_guest_only(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(
        spec("i1"),
        "img",
        security_rules=[{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "0.0.0.0/0"}],
    )
    await driver.spawn(spec("i2"), "img")
    web = [
        {"protocol": "TCP", "from_port": 443, "to_port": 443, "cidr": "10.1.2.3/16"},
        {"protocol": "tcp", "from_port": "80", "to_port": 80, "cidr": "10.1.0.0/16"},
    ]
    await driver.refresh_instance_security_rules(spec("i1"), web)
    assert await driver.get_firewall_rules("i1") == [
        rule("tcp", 80, 80, "10.1.0.0/16"),
        rule("tcp", 443, 443, "10.1.0.0/16"),
    ]
    assert await driver.get_firewall_rules("i2") == []


async def test_invalid_rules_leave_the_previous_firewall_in_place(
    make_driver: MakeDriver,
) -> None:
    driver = await make_driver()
    good = [{"protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "0.0.0.0/0"}]
    await driver.spawn(spec("i1"), "img", security_rules=good)
    bad = [*good, {"protocol": "tcp", "from_port": 90, "to_port": 80, "cidr": "0.0.0.0/0"}]
    with pytest.raises(InvalidFirewallRule):
        await driver.refresh_instance_security_rules(spec("i1"), bad)
    assert await driver.get_firewall_rules("i1") == normalize_rules(good)


async def test_unfilter_removes_every_rule_and_is_idempotent(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1"), "img", security_rules=[{"protocol": "icmp", "cidr": "::/0"}])
    await driver.unfilter_instance(spec("i1"))
    assert await driver.get_firewall_rules("i1") == []
    await driver.unfilter_instance(spec("i1"))
    await driver.unfilter_instance(spec("ghost"))


@pytest.mark.parametrize(
    "rule",
    [
        {"protocol": "gre", "from_port": 1, "to_port": 1},
        {"protocol": "tcp", "from_port": 1},
        {"protocol": "tcp", "from_port": 0, "to_port": 70000},
        {"protocol": "tcp", "from_port": "x", "to_port": 1},
        {"protocol": "tcp", "from_port": True, "to_port": 1},
        {"protocol": "icmp", "from_port": 300},
        {"protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": "10.0.0.0/33"},
        {"protocol": "tcp", "from_port": 1, "to_port": 2, "direction": "sideways"},
        {"protocol": None, "from_port": 5},
        {"protocol": "tcp", "from_port": 1, "to_port": 2, "grantee_group_id": "five"},
    ],
)
def test_invalid_rules_are_rejected(rule: dict[str, object]) -> None:
    with pytest.raises(InvalidFirewallRule):
        normalize_rule(rule)


def test_normalized_rules_are_deduplicated_and_ordered() -> None:
    rules = [
        {"protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "0.0.0.0/0"},
        {"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "0.0.0.0/0", "id": 7},
        {"protocol": "TCP", "from_port": "22", "to_port": 22, "cidr": "0.0.0.0/0"},
        {"protocol": "tcp", "from_port": 1, "to_port": 1, "direction": "egress", "cidr": "::/0"},
    ]
    assert normalize_rules(rules) == [
        rule("tcp", 1, 1, "::/0", direction="egress"),
        rule("tcp", 22, 22, "0.0.0.0/0"),
        rule("udp", 53, 53, "0.0.0.0/0"),
    ]


def test_group_rules_and_any_protocol_are_kept_without_widening() -> None:
    rules: list[dict[str, Any]] = [
        {"protocol": None, "from_port": None, "to_port": None, "cidr": None, "grantee_group_id": 5},
        {"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": None, "grantee_group_id": 5},
        {"protocol": "icmp", "from_port": -1, "to_port": -1, "cidr": "192.0.2.0/24"},
    ]
    assert normalize_rules(rules) == [
        rule(None, None, None, None, group=5),
        rule("icmp", -1, -1, "192.0.2.0/24"),
        rule("tcp", 22, 22, None, group=5),
    ]
