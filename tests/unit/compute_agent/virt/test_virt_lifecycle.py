"""FakeDriver guest lifecycle: spawn, destroy, power, capacity, inventory."""

from __future__ import annotations

import asyncio
import time

import pytest
from virt_testlib import MakeDriver, spawning, spec

from compute_agent.virt import (
    ComputeDriver,
    FakeDriver,
    FakeDriverConfig,
    GuestPhase,
    GuestRef,
    GuestSpec,
    InstanceExists,
    InstanceLike,
    InstanceNotFound,
    InsufficientResources,
    InvalidGuestState,
    PowerState,
)
from shared_objects.testing.eventually import eventually


def test_fake_driver_implements_the_interface_and_guest_spec_is_instance_like() -> None:
    assert issubclass(FakeDriver, ComputeDriver)
    assert isinstance(spec("x"), InstanceLike)


async def test_spawn_makes_a_running_guest_that_destroy_removes(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1", vcpus=2, memory_mb=1024, root_gb=5), "cirros")

    info = await driver.get_info("i1")
    assert (info.phase, info.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
    assert (info.vcpus, info.memory_mb, info.root_gb) == (2, 1024, 5)
    assert info.owns_guest
    assert await driver.list_instance_uuids() == ["i1"]
    assert await driver.instance_exists("i1")

    await driver.destroy(spec("i1"))
    assert not await driver.instance_exists("i1")
    with pytest.raises(InstanceNotFound):
        await driver.get_info("i1")
    # destroy is idempotent: a redelivered terminate does not fail
    await driver.destroy(GuestRef("i1"))


async def test_spawn_of_an_existing_uuid_is_refused(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1"), "img")
    with pytest.raises(InstanceExists):
        await driver.spawn(spec("i1"), "img")


async def test_spawn_takes_the_configured_latency(make_driver: MakeDriver) -> None:
    driver = await make_driver(spawn_delay_s=0.2)
    started = time.monotonic()
    task = asyncio.create_task(driver.spawn(spec("i1"), "img"))
    await eventually(lambda: spawning(driver, "i1"))
    assert (await driver.get_info("i1")).power_state is PowerState.NOSTATE
    await task
    assert time.monotonic() - started >= 0.2
    assert (await driver.get_info("i1")).phase is GuestPhase.RUNNING


async def test_concurrent_spawns_never_exceed_physical_memory(make_driver: MakeDriver) -> None:
    driver = await make_driver(memory_mb=4096, spawn_delay_s=0.01)
    results = await asyncio.gather(
        *(driver.spawn(spec(f"i{n}", memory_mb=1024), "img") for n in range(7)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, InsufficientResources)]
    assert len(refused) == 3
    assert all(r is None or isinstance(r, InsufficientResources) for r in results)
    resources = await driver.get_available_resource()
    assert resources.memory_mb_used == 4096
    assert resources.running_vms == 4
    assert refused[0].kwargs["resource"] == "memory_mb"


@pytest.mark.parametrize(
    ("guest", "resource"),
    [
        (spec("big", vcpus=1, memory_mb=1, root_gb=101), "local_gb"),
        (spec("big", vcpus=33, memory_mb=1, root_gb=1), "vcpus"),
        (spec("big", vcpus=1, memory_mb=2049, root_gb=1), "memory_mb"),
    ],
)
async def test_spawn_beyond_a_hard_limit_raises_insufficient_resources(
    make_driver: MakeDriver, guest: GuestSpec, resource: str
) -> None:
    # vCPUs overcommit by cpu_allocation_ratio (2 x 16 = 32); RAM and disk do not.
    driver = await make_driver(vcpus=2, memory_mb=2048, local_gb=100)
    with pytest.raises(InsufficientResources) as err:
        await driver.spawn(guest, "img")
    assert err.value.kwargs["resource"] == resource
    assert await driver.list_instance_uuids() == []


async def test_available_resource_counts_every_guest(make_driver: MakeDriver) -> None:
    driver = await make_driver(
        vcpus=8, memory_mb=8192, local_gb=80, hypervisor_hostname="hv-a.example"
    )
    await driver.spawn(spec("i1", 2, 1024, 10), "img")
    await driver.spawn(spec("i2", 1, 512, 5), "img")
    await driver.power_off(spec("i2"))
    res = await driver.get_available_resource()
    assert res.hypervisor_hostname == "hv-a.example"
    assert (res.vcpus, res.memory_mb, res.local_gb) == (8, 8192, 80)
    assert (res.vcpus_used, res.memory_mb_used, res.local_gb_used) == (3, 1536, 15)
    assert res.running_vms == 1
    assert res.memory_mb_free == 8192 - 1536
    assert res.to_dict()["local_gb_used"] == 15


async def test_power_off_and_on_change_the_power_state(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    await driver.spawn(spec("i1"), "img")
    await driver.power_off(spec("i1"))
    assert (await driver.get_info("i1")).power_state is PowerState.SHUTDOWN
    await driver.power_off(spec("i1"))  # idempotent
    await driver.power_on(spec("i1"))
    assert (await driver.get_info("i1")).power_state is PowerState.RUNNING


async def test_power_off_of_a_spawning_guest_is_refused(make_driver: MakeDriver) -> None:
    driver = await make_driver(spawn_delay_s=0.2)
    task = asyncio.create_task(driver.spawn(spec("i1"), "img"))
    await eventually(lambda: spawning(driver, "i1"))
    with pytest.raises(InvalidGuestState):
        await driver.power_off(spec("i1"))
    await task


async def test_destroy_during_spawn_fails_the_spawn_and_leaves_nothing(
    make_driver: MakeDriver,
) -> None:
    driver = await make_driver(spawn_delay_s=0.2)
    task = asyncio.create_task(driver.spawn(spec("i1"), "img"))
    await eventually(lambda: spawning(driver, "i1"))
    await driver.destroy(spec("i1"))
    with pytest.raises(InstanceNotFound):
        await task
    assert await driver.list_instance_uuids() == []


async def test_cancelled_spawn_leaves_no_guest(make_driver: MakeDriver) -> None:
    driver = await make_driver(spawn_delay_s=0.5)
    task = asyncio.create_task(driver.spawn(spec("i1"), "img"))
    await eventually(lambda: spawning(driver, "i1"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await driver.list_instance_uuids() == []


async def test_operations_before_init_host_are_refused() -> None:
    driver = FakeDriver(FakeDriverConfig(spawn_delay_s=0))
    with pytest.raises(RuntimeError, match="init_host"):
        await driver.spawn(spec("i1"), "img")


async def test_driver_without_state_dir_works_in_memory() -> None:
    driver = FakeDriver(FakeDriverConfig(spawn_delay_s=0))
    await driver.init_host("mem")
    await driver.spawn(spec("i1"), "img")
    assert await driver.list_instance_uuids() == ["i1"]
    assert driver.state_file_writes == 0


async def test_list_guests_reports_every_guest(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    for n in range(3):
        await driver.spawn(spec(f"i{n}"), "img")
    infos = await driver.list_guests()
    assert sorted(i.uuid for i in infos) == ["i0", "i1", "i2"]
    assert {i.state for i in infos} == {"running"}
