"""Each reconciler rule on a real (SQLite) database: what a pass changes, and that a second
pass changes nothing more."""

from __future__ import annotations

from typing import Any

from conductor.reconcile import rules
from shared_objects.context import RequestContext
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_fault import InstanceFault


async def _fault(world: Any, uuid: str) -> InstanceFault:
    ctxt = RequestContext(is_admin=True)
    async with world.database.request(ctxt):
        return await InstanceFault.get_latest_for_instance(ctxt, uuid)


def _counted(reconciler: Any, rule: str) -> float:
    value = reconciler.actions.labels(rule=rule)._value.get()
    return float(value)


async def test_build_on_a_down_host_is_placed_on_another_and_counts_an_attempt(world: Any) -> None:
    await world.host("dead", up=False)
    await world.host("alive")
    uuid = await world.instance(host="dead", task_state="scheduling", age=2, attempts=("dead",))
    reconciler = world.reconciler()

    report = await reconciler.run_pass()

    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["host"], inst["task_state"], inst["vm_state"]) == (
        "alive",
        "scheduling",
        "building",
    )
    (cast,) = world.compute.casts
    assert (cast.host, cast.instance_uuid, cast.attempt) == ("alive", uuid, 2)
    (action,) = await world.rows("instance_actions", {"instance_uuid": uuid})
    assert cast.request_id == action["request_id"]  # the attempts stay under the create action
    (event,) = await world.rows("instance_action_events", {"action_id": action["id"]})
    assert (event["host"], event["result"]) == ("dead", "Error")
    assert report.acted == 1 and _counted(reconciler, rules.BUILD_HOST_DOWN) == 1
    # Level-triggered and idempotent: the build now waits on an up host, young.
    assert (await reconciler.run_pass()).acted == 0
    assert len(world.compute.casts) == 1


async def test_host_marked_down_by_a_graceful_stop_counts_as_down_at_once(world: Any) -> None:
    await world.host("stopping", marked_down=True)
    await world.host("alive")
    uuid = await world.instance(host="stopping", task_state="scheduling", age=2)

    await world.reconciler().run_pass()

    assert (await world.row("instances", {"uuid": uuid}))["host"] == "alive"


async def test_lost_cast_is_sent_again_once_then_placed_elsewhere(world: Any) -> None:
    await world.host("slow")
    await world.host("other")
    uuid = await world.instance(host="slow", task_state="scheduling", age=31, attempts=("slow",))
    reconciler = world.reconciler()

    await reconciler.run_pass()
    assert [(c.host, c.instance_uuid) for c in world.compute.casts] == [("slow", uuid)]
    assert (await world.row("instances", {"uuid": uuid}))["host"] == "slow"
    # Re-cast once only, even when older than the first bound again.
    await world.age("instances", {"uuid": uuid}, 45)
    await reconciler.run_pass()
    assert len(world.compute.casts) == 1
    # Past the second bound: another host.
    await world.age("instances", {"uuid": uuid}, 61)
    await reconciler.run_pass()
    assert [c.host for c in world.compute.casts] == ["slow", "other"]
    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["host"], inst["task_state"]) == ("other", "scheduling")
    assert _counted(reconciler, rules.BUILD_CAST_LOST) == 1
    assert _counted(reconciler, rules.BUILD_NOT_TAKEN) == 1


async def test_young_build_on_an_up_host_is_left_alone(world: Any) -> None:
    await world.host("alive")
    await world.instance(host="alive", task_state="scheduling", age=5)
    await world.instance(host="alive", task_state="spawning", age=500)
    assert (await world.reconciler().run_pass()).acted == 0
    assert world.compute.casts == []


async def test_unassigned_build_is_placed(world: Any) -> None:
    await world.host("alive")
    uuid = await world.instance(host=None, task_state="scheduling", age=31)
    await world.reconciler().run_pass()
    assert (await world.row("instances", {"uuid": uuid}))["host"] == "alive"
    assert [c.attempt for c in world.compute.casts] == [1]


async def test_exhausted_attempts_end_in_error_with_a_fault(world: Any) -> None:
    await world.host("dead", up=False)
    await world.host("alive")
    uuid = await world.instance(
        host="dead", task_state="scheduling", age=2, attempts=("a", "b", "dead")
    )
    await world.reconciler().run_pass()
    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["vm_state"], inst["task_state"], inst["host"]) == ("error", None, None)
    assert "maximum number of build attempts" in (await _fault(world, uuid)).message
    (action,) = await world.rows("instance_actions", {"instance_uuid": uuid})
    assert action["finish_time"] is not None and action["message"] == "Error"
    assert world.compute.casts == []


async def test_no_host_left_ends_in_error_with_a_fault(world: Any) -> None:
    await world.host("dead", up=False)
    uuid = await world.instance(host="dead", task_state="scheduling", age=2)
    await world.reconciler().run_pass()
    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["vm_state"], inst["task_state"]) == ("error", None)
    fault = await _fault(world, uuid)
    assert fault.code == 503 and "dead is down" in fault.message


async def test_taken_build_on_a_down_host_is_rescheduled_before_spawn(world: Any) -> None:
    await world.host("dead", up=False)
    await world.host("alive")
    uuid = await world.instance(host="dead", task_state="block_device_mapping", age=31)
    await world.reconciler().run_pass()
    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["host"], inst["task_state"]) == ("alive", "scheduling")
    # No event was started for the attempt on the dead host: one is recorded, as failed.
    (action,) = await world.rows("instance_actions", {"instance_uuid": uuid})
    (event,) = await world.rows("instance_action_events", {"action_id": action["id"]})
    assert (event["host"], event["result"], event["event"]) == (
        "dead",
        "Error",
        "compute_run_instance",
    )


async def test_spawn_on_a_down_host_goes_to_error_with_a_fault_and_keeps_its_host(
    world: Any,
) -> None:
    await world.host("dead", up=False)
    await world.host("alive")
    uuid = await world.instance(host="dead", task_state="spawning", age=31, attempts=("dead",))
    young = await world.instance(host="dead", task_state="spawning", age=5)
    reconciler = world.reconciler()
    await reconciler.run_pass()
    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["vm_state"], inst["task_state"], inst["host"]) == ("error", None, "dead")
    fault = await _fault(world, uuid)
    assert fault.message.startswith("Host dead went down during the build")
    assert fault.host == "dead"
    (action,) = await world.rows("instance_actions", {"instance_uuid": uuid})
    assert action["message"] == "Error" and action["finish_time"] is not None
    (event,) = await world.rows("instance_action_events", {"action_id": action["id"]})
    assert event["result"] == "Error" and event["finish_time"] is not None
    assert (await world.row("instances", {"uuid": young}))["task_state"] == "spawning"
    assert _counted(reconciler, rules.SPAWN_HOST_DOWN) == 1
    assert world.compute.casts == []


async def test_host_back_up_before_the_write_is_left_alone(world: Any) -> None:
    """The batched write repeats the rule's condition: a host that reported between the read
    and the write keeps its build."""
    await world.host("flaky", up=False)
    await world.host("alive")
    uuid = await world.instance(host="flaky", task_state="spawning", age=31)
    reconciler = world.reconciler()
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    snapshot, _ = await reconciler.read(now)
    plan = rules.plan(snapshot, reconciler.bounds)
    assert uuid in plan.batches[rules.SPAWN_HOST_DOWN]
    await world.set_service("flaky", last_seen_up=now)
    await reconciler._act(plan, now)
    assert (await world.row("instances", {"uuid": uuid}))["task_state"] == "spawning"


async def test_delete_on_a_down_host_is_finished_in_the_database(world: Any) -> None:
    await world.host("dead", up=False)
    await world.host("alive")
    uuid = await world.instance(host="dead", task_state="deleting", vm_state="active", age=31)
    await world.reconciler().run_pass()
    inst = await world.row("instances", {"uuid": uuid})
    assert inst["deleted"] and inst["vm_state"] == "deleted" and inst["task_state"] is None
    assert inst["host"] == "dead"
    (action,) = await world.rows("instance_actions", {"instance_uuid": uuid})
    assert action["finish_time"] is not None


async def test_a_delete_an_up_host_never_finished_is_sent_to_it_again(world: Any) -> None:
    """The terminate cast was lost (e.g. the broker died as it was sent) or the agent gave up
    during an outage: the host is up, so the delete is sent again, under the delete's own
    action, by one conductor (the stamp restarts the bound), then again after the bound."""
    await world.host("alive")
    uuid = await world.instance(host="alive", task_state="deleting", vm_state="active", age=31)
    ctxt = RequestContext(user_id="admin", project_id="p1", is_admin=True)
    ctxt.request_id = "req-delete-1"
    async with world.database.request(ctxt):
        await InstanceAction.action_start(ctxt, uuid, "delete")
    first, second = world.reconciler(), world.reconciler()
    await first.run_pass()
    await second.run_pass()
    assert world.compute.terminates == [("alive", uuid, "req-delete-1")]
    inst = await world.row("instances", {"uuid": uuid})
    assert inst["task_state"] == "deleting" and not inst["deleted"]
    await world.age("instances", {"uuid": uuid}, 31)
    await first.run_pass()
    assert len(world.compute.terminates) == 2


async def _migration(world: Any, uuid: str, status: str, age: float) -> str:
    import uuid as uuidlib

    from shared_objects.context import RequestContext

    mig = str(uuidlib.uuid4())
    ctxt = RequestContext(is_admin=True)
    async with world.database.request(ctxt):
        await ctxt.db.insert(
            "migrations",
            {
                "uuid": mig,
                "instance_uuid": uuid,
                "source_compute": "src",
                "dest_compute": "dst",
                "status": status,
                "migration_type": "live-migration",
                "deleted": False,
            },
        )
    await world.age("migrations", {"uuid": mig}, age)
    return mig


async def test_migration_with_both_hosts_down_fails_and_releases_the_instance(world: Any) -> None:
    await world.host("src", up=False)
    await world.host("dst", up=False)
    await world.host("alive")
    early = await world.instance(host="src", task_state="migrating", vm_state="active")
    late = await world.instance(host="src", task_state="migrating", vm_state="active")
    m_early = await _migration(world, early, "queued", 31)
    m_late = await _migration(world, late, "running", 31)
    reconciler = world.reconciler()
    await reconciler.run_pass()
    assert (await world.row("migrations", {"uuid": m_early}))["status"] == "failed"
    inst = await world.row("instances", {"uuid": early})
    assert (inst["vm_state"], inst["task_state"], inst["host"]) == ("active", None, "src")
    assert "stays on its source" in (await _fault(world, early)).message
    assert (await world.row("migrations", {"uuid": m_late}))["status"] == "error"
    inst = await world.row("instances", {"uuid": late})
    assert (inst["vm_state"], inst["task_state"]) == ("error", None)
    assert "may run on either" in (await _fault(world, late)).message
    assert _counted(reconciler, rules.MIGRATION_HOSTS_DOWN) == 2


async def test_migration_with_one_host_up_is_left_to_the_agents(world: Any) -> None:
    await world.host("src", up=False)
    await world.host("dst")
    uuid = await world.instance(host="src", task_state="migrating", vm_state="active")
    mig = await _migration(world, uuid, "running", 300)
    await world.reconciler().run_pass()
    assert (await world.row("migrations", {"uuid": mig}))["status"] == "running"


async def test_open_action_of_a_settled_instance_is_finished(world: Any) -> None:
    await world.host("alive")
    ok = await world.instance(host="alive", task_state=None, vm_state="active", age=31)
    bad = await world.instance(host="alive", task_state=None, vm_state="error", age=31)
    young = await world.instance(host="alive", task_state=None, vm_state="active", age=5)
    reconciler = world.reconciler()
    await reconciler.run_pass()
    assert (await world.row("instance_actions", {"instance_uuid": ok}))["message"] is None
    assert (await world.row("instance_actions", {"instance_uuid": ok}))["finish_time"]
    assert (await world.row("instance_actions", {"instance_uuid": bad}))["message"] == "Error"
    assert (await world.row("instance_actions", {"instance_uuid": young}))["finish_time"] is None
    assert _counted(reconciler, rules.ACTION_UNFINISHED) == 2


async def test_a_pass_costs_the_same_statements_for_few_or_many_stranded_builds(
    world: Any,
) -> None:
    await world.host("dead", up=False)
    await world.host("alive")

    async def statements_for(count: int) -> int:
        for _ in range(count):
            await world.instance(host="dead", task_state="spawning", age=31)
        report = await world.reconciler().run_pass()
        assert report.acted == count
        return report.statements

    assert await statements_for(2) == await statements_for(20)


async def test_undeliverable_build_cast_is_placed_on_another_host(world: Any) -> None:
    await world.host("gone")
    await world.host("alive")
    world.compute.unroutable.add("gone")
    uuid = await world.instance(host="gone", task_state="scheduling")
    action = await world.row("instance_actions", {"instance_uuid": uuid})
    ctxt = RequestContext(is_admin=True, request_id=action["request_id"])
    instance = await _instance(world, uuid)

    await world.build._cast_build(ctxt, instance, ["gone"], attempt=1, tried=[], extras=None)

    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["host"], inst["task_state"]) == ("alive", "scheduling")
    assert [(c.host, c.attempt) for c in world.compute.casts] == [("alive", 2)]


async def test_undeliverable_everywhere_ends_in_error(world: Any) -> None:
    await world.host("gone")
    await world.host("gone-too")
    world.compute.unroutable.update({"gone", "gone-too"})
    uuid = await world.instance(host="gone", task_state="scheduling")
    ctxt = RequestContext(is_admin=True)
    instance = await _instance(world, uuid)
    await world.build._cast_build(ctxt, instance, ["gone"], attempt=1, tried=[], extras=None)
    inst = await world.row("instances", {"uuid": uuid})
    assert (inst["vm_state"], inst["task_state"]) == ("error", None)
    assert "could not be delivered" in (await _fault(world, uuid)).message


async def _instance(world: Any, uuid: str) -> Any:
    from shared_objects.objects.instance import Instance

    ctxt = RequestContext(is_admin=True)
    async with world.database.request(ctxt):
        return await Instance.get_by_uuid(ctxt, uuid)


async def test_when_every_host_looks_down_taken_work_is_left_alone(world: Any) -> None:
    """A broker or conductor outage stops every agent's reports: that is no reason to fail
    their builds and deletes. Builds nobody took still end (no host: ERROR)."""
    await world.host("a", up=False)
    await world.host("b", up=False)
    spawning = await world.instance(host="a", task_state="spawning", age=31)
    deleting = await world.instance(host="b", task_state="deleting", vm_state="active", age=31)
    waiting = await world.instance(host="a", task_state="scheduling", age=2)
    await world.reconciler().run_pass()
    assert (await world.row("instances", {"uuid": spawning}))["task_state"] == "spawning"
    assert (await world.row("instances", {"uuid": deleting}))["task_state"] == "deleting"
    assert (await world.row("instances", {"uuid": waiting}))["vm_state"] == "error"


async def test_no_host_is_judged_down_before_agents_had_the_time_to_report(world: Any) -> None:
    await world.host("dead", up=False)
    await world.host("alive")
    uuid = await world.instance(host="dead", task_state="spawning", age=31)
    fresh = world.reconciler()
    fresh.trust_after = 3600.0  # as a conductor that has just started
    assert (await fresh.run_pass()).acted == 0
    assert (await world.row("instances", {"uuid": uuid}))["task_state"] == "spawning"
