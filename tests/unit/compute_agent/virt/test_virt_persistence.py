"""Persisted hypervisor state: survives a restart (and a real SIGKILL), recovery semantics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from virt_testlib import FAST, MakeDriver, crash_copy, spec, stored_phase

from compute_agent.virt import (
    FakeDriver,
    FakeDriverConfig,
    GuestPhase,
    MigrationModel,
    StateFileError,
    guest_homes,
    hypervisor_view,
    state_store,
)
from compute_agent.virt.state_store import StateStore
from shared_objects.testing.eventually import eventually
from shared_objects.testing.fleet import copy_rounds


async def restarted(state_dir: Path, host: str) -> FakeDriver:
    """A fresh driver for ``host`` on the same state directory: what a restarted agent gets."""
    driver = FakeDriver(FakeDriverConfig(state_dir=state_dir, spawn_delay_s=0, migration=FAST))
    await driver.init_host(host)
    return driver


def write_file(path: Path, text: str) -> None:
    """Test setup I/O (tiny, synchronous on purpose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_guests_survive_a_restart(make_driver: MakeDriver, state_dir: Path) -> None:
    driver = await make_driver("h1")
    await driver.spawn(
        spec("a", 2, 1024, 10), "img", [{"volume_id": "v", "mountpoint": "/dev/vdb"}]
    )
    await driver.spawn(spec("b"), "img", security_rules=[{"protocol": "icmp", "cidr": "0.0.0.0/0"}])
    await driver.spawn(spec("c"), "img")
    await driver.power_off(spec("c"))
    await driver.set_dirty_rate("a", 42.0)
    before = sorted(await driver.list_guests(), key=lambda i: i.uuid)

    again = await restarted(state_dir, "h1")
    assert sorted(await again.list_guests(), key=lambda i: i.uuid) == before
    assert await again.get_firewall_rules("b") == await driver.get_firewall_rules("b")
    assert await again.get_available_resource() == await driver.get_available_resource()


async def test_state_file_format(make_driver: MakeDriver, state_dir: Path) -> None:
    driver = await make_driver("h1")
    await driver.spawn(spec("a"), "img")
    document = json.loads((state_dir / "h1.json").read_text())
    assert document["format"] == 1
    assert document["host"] == "h1"
    assert document["guests"]["a"]["phase"] == "running"
    assert file_names(state_dir) == ["h1.json"]  # no temporary files left


async def test_each_host_has_its_own_file(make_driver: MakeDriver, state_dir: Path) -> None:
    a = await make_driver("a")
    b = await make_driver("b")
    await a.spawn(spec("x"), "img")
    await b.spawn(spec("y"), "img")
    assert await (await restarted(state_dir, "a")).list_instance_uuids() == ["x"]
    assert await (await restarted(state_dir, "b")).list_instance_uuids() == ["y"]


async def test_interrupted_spawn_comes_back_as_error(
    make_driver: MakeDriver, state_dir: Path, tmp_path: Path
) -> None:
    driver = await make_driver("h1", spawn_delay_s=5.0)
    task = asyncio.create_task(driver.spawn(spec("s"), "img"))
    await eventually(lambda: stored_phase(state_dir, "h1", "s") == "spawning")
    frozen = crash_copy(state_dir, "h1", tmp_path / "crash")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    info = await (await restarted(frozen, "h1")).get_info("s")
    assert info.phase is GuestPhase.ERROR
    assert info.interrupted == "spawn"
    assert info.owns_guest


async def test_interrupted_copy_comes_back_running_on_the_source(
    make_driver: MakeDriver, state_dir: Path, tmp_path: Path
) -> None:
    slow = MigrationModel(round_interval_s=0.01, stall_rounds=10_000)
    source = await make_driver("src", migration=slow)
    dest = await make_driver("dst", migration=slow)
    guest = spec("m")
    await source.spawn(guest, "img")
    await source.set_dirty_rate("m", 10_000.0)
    data = await source.check_can_live_migrate_source(guest, {"dest_host": "dst"})
    await dest.pre_live_migration(guest, data)
    task = asyncio.create_task(source.live_migration(guest, "dst", data))
    await copy_rounds(source)
    assert stored_phase(state_dir, "src", "m") == "migrating_out"
    frozen_src = crash_copy(state_dir, "src", tmp_path / "crash")
    frozen_dst = crash_copy(state_dir, "dst", tmp_path / "crash")
    await source.live_migration_abort("m")
    with pytest.raises(Exception, match="aborted"):
        await task

    src_info = await (await restarted(frozen_src, "src")).get_info("m")
    assert (src_info.phase, src_info.interrupted) == (GuestPhase.RUNNING, "live_migration_copy")
    dst_info = await (await restarted(frozen_dst, "dst")).get_info("m")
    assert (dst_info.phase, dst_info.migration_peer) == (GuestPhase.INCOMING, "src")


async def test_switched_over_guest_stays_migrated_out_after_restart(
    make_driver: MakeDriver, state_dir: Path
) -> None:
    source = await make_driver("src")
    guest = spec("m")
    await source.spawn(guest, "img")
    await source.live_migration(guest, "dst", {})
    info = await (await restarted(state_dir, "src")).get_info("m")
    assert (info.phase, info.migration_peer, info.interrupted) == (
        GuestPhase.MIGRATED_OUT,
        "dst",
        None,
    )


async def test_corrupt_state_file_refuses_to_start_until_repaired(state_dir: Path) -> None:
    write_file(state_dir / "h1.json", "{not json")
    driver = FakeDriver(FakeDriverConfig(state_dir=state_dir))
    with pytest.raises(StateFileError):
        await driver.init_host("h1")
    write_file(state_dir / "h1.json", '{"format": 1, "host": "h1", "guests": {"g": {"uuid": 7}}}')
    with pytest.raises(StateFileError):  # malformed guest record
        await driver.init_host("h1")
    write_file(state_dir / "h1.json", '{"format": 1, "host": "h1", "guests": {}}')
    await driver.init_host("h1")
    assert driver.host == "h1"


async def test_state_file_of_another_host_is_refused(
    make_driver: MakeDriver, state_dir: Path
) -> None:
    await make_driver("h1")
    shutil.copy(state_dir / "h1.json", state_dir / "h2.json")
    with pytest.raises(StateFileError, match="another host"):
        await restarted(state_dir, "h2")


async def test_leftover_temporary_files_are_removed_at_start(state_dir: Path) -> None:
    write_file(state_dir / ".h1.json.deadbeef.tmp", "half a wri")
    await restarted(state_dir, "h1")
    assert file_names(state_dir) == ["h1.json"]


async def test_concurrent_changes_are_coalesced_and_all_persisted(
    make_driver: MakeDriver, state_dir: Path
) -> None:
    driver = await make_driver("h1")
    writes_before = driver.state_file_writes
    await asyncio.gather(*(driver.spawn(spec(f"i{n}"), "img") for n in range(50)))
    # 50 spawns make 100 state changes; concurrent ones share a write
    assert driver.state_file_writes - writes_before < 100
    again = await restarted(state_dir, "h1")
    guests = await again.list_guests()
    assert len(guests) == 50
    assert {g.phase for g in guests} == {GuestPhase.RUNNING}


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from compute_agent.virt import FakeDriver, FakeDriverConfig, GuestSpec

    async def main() -> None:
        driver = FakeDriver(FakeDriverConfig(state_dir=Path(sys.argv[1]), spawn_delay_s=0))
        await driver.init_host("victim")
        for n in range(5):
            await driver.spawn(GuestSpec(f"done{n}"), "img")
        for n in range(5):
            driver.failures.delay("spawn", 60, uuid=f"slow{n}")
        tasks = [asyncio.create_task(driver.spawn(GuestSpec(f"slow{n}"), "img")) for n in range(5)]
        state = Path(sys.argv[1]) / "victim.json"

        def stored_spawning() -> int:
            try:
                guests = json.loads(state.read_text())["guests"]
            except FileNotFoundError:
                return 0
            return sum(1 for g in guests.values() if g["phase"] == "spawning")

        while stored_spawning() < 5:  # the SPAWNING records reached the file
            await asyncio.sleep(0.01)
        print("READY", flush=True)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    """
)


async def test_sigkilled_agent_finds_running_and_interrupted_guests(state_dir: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(state_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout

        async def wait_ready() -> None:
            # structlog's default logger also writes to stdout: skip its lines
            while (line := await stdout.readline()) and line.strip() != b"READY":
                pass
            assert line.strip() == b"READY"

        await asyncio.wait_for(wait_ready(), timeout=20)
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=10)
    assert proc.returncode == -signal.SIGKILL

    driver = await restarted(state_dir, "victim")
    phases = {g.uuid: (g.phase, g.interrupted) for g in await driver.list_guests()}
    assert phases == {
        **{f"done{n}": (GuestPhase.RUNNING, None) for n in range(5)},
        **{f"slow{n}": (GuestPhase.ERROR, "spawn") for n in range(5)},
    }


async def test_cancelled_flush_never_lets_an_older_snapshot_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = state_store._write_atomic
    slow_started, slow_done = threading.Event(), threading.Event()

    def slow_first_write(path: Path, text: str, fsync: bool) -> None:
        if '"value":1' not in text:
            real_write(path, text, fsync)
            return
        slow_started.set()
        time.sleep(0.1)  # a slow disk; runs in the worker thread, as the real write does
        real_write(path, text, fsync)
        slow_done.set()

    monkeypatch.setattr(state_store, "_write_atomic", slow_first_write)
    state = {"value": 1}
    store = StateStore(tmp_path / "h.json", lambda: {"host": "h", "value": state["value"]})
    store.mark_dirty()
    first = asyncio.create_task(store.flush())
    await eventually(slow_started.is_set, what="the slow write of value 1 in progress")
    first.cancel()  # its caller goes away; the write it started must still land first
    with contextlib.suppress(asyncio.CancelledError):
        await first
    state["value"] = 2
    store.mark_dirty()
    await store.flush()
    await eventually(slow_done.is_set, what="the stale write's end")
    document = await store.load()
    assert document is not None and document["value"] == 2


async def test_an_idle_driver_runs_no_background_tasks(make_driver: MakeDriver) -> None:
    baseline = len(asyncio.all_tasks())
    driver = await make_driver("idle")
    await driver.spawn(spec("a"), "img")
    await asyncio.sleep(0.05)  # an absence check: a background task would have started by now
    assert len(asyncio.all_tasks()) == baseline


async def test_hypervisor_view_reads_every_host_from_outside(
    make_driver: MakeDriver, state_dir: Path
) -> None:
    source = await make_driver("src")
    dest = await make_driver("dst")
    await source.spawn(spec("stays"), "img")
    await source.spawn(spec("moves"), "img")
    data = await source.check_can_live_migrate_source(spec("moves"), {"dest_host": "dst"})
    await dest.pre_live_migration(spec("moves"), data)

    view = await hypervisor_view(state_dir)
    assert set(view) == {"src", "dst"}
    assert view["dst"]["moves"].phase is GuestPhase.INCOMING
    assert guest_homes(view) == {"stays": ["src"], "moves": ["src"]}

    await source.live_migration(spec("moves"), "dst", data)
    # switched over: the source's paused copy and the incoming one are both not owners
    assert guest_homes(await hypervisor_view(state_dir))["moves"] == []
    await dest.post_live_migration_at_destination(spec("moves"))
    await source.post_live_migration(spec("moves"))
    assert guest_homes(await hypervisor_view(state_dir)) == {
        "stays": ["src"],
        "moves": ["dst"],
    }
    assert await hypervisor_view(state_dir / "nowhere") == {}
