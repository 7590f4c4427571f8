"""A compromised host, with its own real broker login, tries every attack we know of.

Fleet of three agent processes (compute-1 is the attacker, compute-2 and compute-3 its victims),
a conductor process on PostgreSQL, the real RabbitMQ with one login per process. The attacker
is a connection of this test process logged in as compute-1's agent (``fleet-host-...-compute-1``):
to the broker and to every Fleet process it is indistinguishable from compute-1 itself.

Each attack must be refused (a ``Forbidden`` reply, the broker's ACCESS_REFUSED/RESOURCE_LOCKED,
or a reply dropped), the database and every hypervisor must be unchanged, a refused audit line
must be logged, and the fleet must keep working afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from conductor.db.session import Database
from conductor.testing import snapshot
from shared_objects import exception, releases
from shared_objects.base import obj_tree_get_versions
from shared_objects.context import RequestContext
from shared_objects.objects.block_device_mapping import BlockDeviceMapping
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.authorizer import reply_checks
from shared_objects.runtime.config import SecurityConfig
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import MessagingError, Target, Transport, codec
from shared_objects.serializer import FleetObjectSerializer
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ATTACKER, VICTIM, BYSTANDER = "compute-1", "compute-2", "compute-3"
# Columns that change by themselves while the fleet idles (heartbeats, usage reports).
VOLATILE = {"services": {"last_seen_up", "report_count", "updated_at"}}


class Attacker:
    """compute-1's login, with every client a host has: objects, compute-task API, agents."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.objects = ConductorAPI(transport, timeout=10)
        self.tasks = ComputeTaskAPI(transport, timeout=10)
        self.compute = ComputeAPI(transport, FleetObjectSerializer(), timeout=10)
        # Claims in the body are ignored: who calls is the broker-validated login.
        self.ctxt = RequestContext(
            user_id="admin", project_id="admin", is_admin=True, roles=["admin"]
        )

    async def save(self, obj: Any, **changes: Any) -> Any:
        for name, value in changes.items():
            setattr(obj, name, value)
        return await self.objects.object_action(self.ctxt, obj, "save", (), {})

    async def call_class(
        self, objname: str, method: str, *args: Any, ctxt: Any = None, **kwargs: Any
    ) -> Any:
        versions = obj_tree_get_versions(objname)
        return await self.objects.object_class_action_versions(
            ctxt or self.ctxt, objname, method, versions, args, kwargs
        )


@contextlib.asynccontextmanager
async def attacker_of(cluster: Any) -> AsyncIterator[Attacker]:
    async with cluster.transport_as(cluster.login_of(ATTACKER)) as transport:
        yield Attacker(transport)


def _volatile_free(tables: dict[str, list[tuple[Any, ...]]], database: Any) -> dict[str, Any]:
    from conductor.db import models

    out: dict[str, Any] = {}
    for name, rows in tables.items():
        skip = VOLATILE.get(name, set())
        cols = [c.name for c in models.metadata.tables[name].columns]
        keep = [i for i, c in enumerate(cols) if c not in skip]
        out[name] = sorted((tuple(r[i] for i in keep) for r in rows), key=repr)
    return out


def _hypervisors(cluster: Any) -> dict[str, str]:
    root = Path(cluster.workdir) / "hypervisors"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.json"))}


def _audit_refusals(cluster: Any, name: str) -> list[dict[str, Any]]:
    path = Path(cluster.workdir) / f"{name}.log"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "audit" and event.get("outcome") == "refused":
            out.append(event)
    return out


async def _refused(attack: Awaitable[Any]) -> BaseException:
    try:
        await attack
    except (exception.Forbidden, MessagingError) as exc:
        return exc
    raise AssertionError("the attack was accepted")


async def _ignore(message: Any) -> None:
    """A consumer that does nothing (the broker refuses it before any message)."""


async def _broker_refuses(url: str, queue: str) -> str:
    """Consume ``queue`` as the login of ``url``; returns the broker's refusal."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        try:
            q = await channel.get_queue(queue, ensure=False)
            await q.consume(_ignore)
        except (
            aiormq.exceptions.ChannelAccessRefused,
            aiormq.exceptions.ChannelLockedResource,
        ) as exc:
            return type(exc).__name__
        raise AssertionError(f"the broker let the attacker consume {queue!r}")
    finally:
        await connection.close()


async def _migration_end(cluster: Any, ctxt: Any, mig: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        got = await cluster.tasks.get_migration(ctxt, migration_uuid=mig)
        return got if got["status"] in ("completed", "failed", "error", "cancelled") else None

    return await eventually(ended, 30, interval=0.1, what=f"migration {mig}'s end")


async def test_a_hostile_host_is_refused_everything_and_the_fleet_keeps_working(
    cluster_factory: Any, pg_database_url: str
) -> None:
    async with cluster_factory(hosts=(ATTACKER, VICTIM, BYSTANDER)) as cluster:
        ops = cluster.ctxt
        await cluster.tasks.security_group_create(ops, name="web")
        (theirs,) = await cluster.boot(flavor="small", name="victim", forced_host=VICTIM)
        (locked,) = await cluster.boot(flavor="small", name="locked", forced_host=VICTIM)
        (mine,) = await cluster.boot(flavor="small", name="mine", forced_host=ATTACKER)
        (moving,) = await cluster.boot(
            flavor="small",
            name="moving",
            forced_host=VICTIM,
            block_device_mappings=[{"volume_id": "vol-1", "device_name": "/dev/vdb"}],
        )
        await cluster.wait_instances([theirs, locked, mine, moving])
        await cluster.tasks.lock_instance(ops, instance_uuid=locked, reason="precious")
        # A migration between the two victims (the attacker takes no part in it).
        mig = await cluster.tasks.live_migrate_instance(ops, instance_uuid=moving, host=BYSTANDER)
        got = await _migration_end(cluster, ops, mig)
        assert got["status"] == "completed"

        database = Database(pg_database_url)
        try:
            # The migration's trailing writes (source cleanup, usage) have landed once two reads
            # in a row agree: only then is "before" a state the attacks could be compared to.
            reads: list[Any] = []

            async def quiet() -> Any:
                now = (_volatile_free(await snapshot(database), database), _hypervisors(cluster))
                reads.append(now)
                return now if len(reads) > 1 and reads[-2] == now else None

            before_db, before_virt = await eventually(quiet, 20, interval=0.3, what="a quiet fleet")
            results: dict[str, str] = {}
            lookup = RequestContext()
            async with database.request(lookup):
                assert lookup.db is not None
                rows = await lookup.db.select("instance_actions", {"instance_uuid": theirs})
            action_request = rows[0]["request_id"]

            async with attacker_of(cluster) as evil:

                async def attack(name: str, make: Callable[[], Awaitable[Any]]) -> None:
                    exc = await _refused(make())
                    results[name] = f"{type(exc).__name__}: {exc}"[:160]

                # --- objects of other hosts, and rights on its own --------------------------
                for field, value in (("host", ATTACKER), ("locked", False), ("user_id", "evil")):
                    target = await Instance.get_by_uuid(ops, theirs)
                    await attack(
                        f"save {VICTIM}'s instance {field}",
                        lambda t=target, f=field, v=value: evil.save(t, **{f: v}),
                    )
                own = await Instance.get_by_uuid(ops, mine)
                await attack(
                    "change the owner of its own instance", lambda: evil.save(own, user_id="evil")
                )
                own = await Instance.get_by_uuid(ops, mine)
                await attack("lock its own instance", lambda: evil.save(own, locked=True))
                await attack(
                    "read another host's instance",
                    lambda: evil.call_class("Instance", "get_by_uuid", theirs),
                )
                node = next(n for n in await ComputeNodeList.get_all(ops) if n.host == VICTIM)
                await attack(
                    "inflate another host's ComputeNode", lambda: evil.save(node, vcpus=100000)
                )
                flavor = await Flavor.get_by_name(ops, "small")
                await attack(
                    "destroy a flavor",
                    lambda: evil.objects.object_action(evil.ctxt, flavor, "destroy", (), {}),
                )
                await attack(
                    "register as another host",
                    lambda: evil.call_class(
                        "Service",
                        "register",
                        VICTIM,
                        releases.BINARY_COMPUTE,
                        "compute",
                        releases.SERVICE_VERSION,
                    ),
                )
                await attack(
                    "register at version 0",
                    lambda: evil.call_class(
                        "Service", "register", ATTACKER, releases.BINARY_COMPUTE, "compute", 0
                    ),
                )
                await attack(
                    "register as a conductor",
                    lambda: evil.call_class(
                        "Service",
                        "register",
                        ATTACKER,
                        releases.BINARY_CONDUCTOR,
                        "conductor",
                        releases.SERVICE_VERSION,
                    ),
                )
                migration = await Migration.get_by_uuid(ops, mig)
                await attack(
                    "read a migration it is no party to",
                    lambda: evil.call_class("Migration", "get_by_uuid", mig),
                )
                await attack(
                    "change a migration it is no party to",
                    lambda: evil.save(migration, status="error"),
                )
                assert list(await evil.call_class("MigrationList", "get_by_instance", moving)) == []
                bdm = await BlockDeviceMapping.get_by_volume_and_instance(ops, "vol-1", moving)
                await attack(
                    "read another host's BDM",
                    lambda: evil.call_class(
                        "BlockDeviceMapping", "get_by_volume_and_instance", "vol-1", moving
                    ),
                )
                await attack(
                    "destroy another host's BDM",
                    lambda: evil.objects.object_action(evil.ctxt, bdm, "destroy", (), {}),
                )
                await attack(
                    "read another host's action",
                    lambda: evil.call_class(
                        "InstanceAction", "get_by_request_id", theirs, action_request
                    ),
                )
                await attack(
                    "finish another host's action",
                    lambda: evil.call_class(
                        "InstanceAction",
                        "action_finish",
                        theirs,
                        ctxt=RequestContext(request_id=action_request),
                    ),
                )
                await attack(
                    "list every instance", lambda: evil.call_class("InstanceList", "get_all")
                )
                await attack(
                    "list another host's instances",
                    lambda: evil.call_class("InstanceList", "get_by_host", VICTIM),
                )

                # --- the operators' API --------------------------------------------------------
                await attack(
                    "unlock an instance",
                    lambda: evil.tasks.unlock_instance(evil.ctxt, instance_uuid=locked),
                )
                await attack(
                    "create a security group",
                    lambda: evil.tasks.security_group_create(evil.ctxt, name="evil"),
                )
                await attack(
                    "delete an instance",
                    lambda: evil.tasks.delete_instance(evil.ctxt, instance_uuid=theirs),
                )
                await attack(
                    "boot", lambda: evil.tasks.build_instances(evil.ctxt, flavor="small", name="x")
                )
                await attack(
                    "live-migrate",
                    lambda: evil.tasks.live_migrate_instance(
                        evil.ctxt, instance_uuid=theirs, host=ATTACKER
                    ),
                )
                await attack(
                    "reschedule another host's build",
                    lambda: evil.tasks.reschedule_instance(
                        evil.ctxt,
                        instance_uuid=theirs,
                        failed_host=VICTIM,
                        reason="x",
                        request_spec={},
                    ),
                )

                # --- other agents ------------------------------------------------------------
                await attack(
                    "ask another agent for its guests",
                    lambda: evil.compute.get_live_migration_guest(
                        evil.ctxt, VICTIM, instance_uuid=theirs, timeout=10
                    ),
                )
                victim_inst = await Instance.get_by_uuid(ops, theirs)
                await attack(
                    "roll back a migration at another agent",
                    lambda: evil.compute.rollback_live_migration_at_destination(
                        evil.ctxt,
                        BYSTANDER,
                        instance=victim_inst,
                        migration=migration,
                        call_monitor_timeout=5,
                        timeout=10,
                    ),
                )
                # A cast gets no reply: the agent refuses it (audit line) and changes nothing.
                for uuid in (theirs, locked):
                    inst = await Instance.get_by_uuid(ops, uuid)
                    await evil.compute.terminate_instance(evil.ctxt, VICTIM, instance=inst)
                results["terminate cast to another agent"] = "cast (checked below)"

                # --- the broker ----------------------------------------------------------------
                evil_url = cluster.spec.logins.url_for(cluster.login_of(ATTACKER))
                results["consume the conductor queue"] = await _broker_refuses(
                    evil_url, "conductor"
                )
                results["consume the operator's reply queue"] = await _broker_refuses(
                    evil_url, cluster.transport.replies.queue_name
                )
                results["consume another agent's queue"] = await _broker_refuses(
                    evil_url, f"compute.{VICTIM}"
                )

                # A forged reply to a waiting operator call is dropped; the genuine one is taken.
                identities = Identities(
                    SecurityConfig(
                        host_login_prefix=cluster.spec.logins.security_env()[
                            "FLEET_SECURITY__HOST_LOGIN_PREFIX"
                        ]
                    )
                )
                victim_replies = cluster.transport.replies
                accept = reply_checks(identities)(Target(topic="conductor"))
                waiting = victim_replies.register("forged-msg-id", None, accept)
                await victim_replies.ensure_listening()
                forged = codec.encode_message(
                    {
                        "result": "forged",
                        "failure": None,
                        "ending": True,
                        "_msg_id": "forged-msg-id",
                    }
                )
                from shared_objects.runtime.messaging import MessageDeliveryFailure
                from shared_objects.runtime.messaging.topology import (
                    DEFAULT_EXCHANGE,
                    REPLY_EXCHANGE,
                )

                # An operator's reply queue: neither exchange takes it from a host (no write on
                # amq.default; on the reply exchange, topic permissions name callers of agents).
                for exchange in (DEFAULT_EXCHANGE, REPLY_EXCHANGE):
                    with pytest.raises(MessageDeliveryFailure, match="ACCESS_REFUSED"):
                        await evil.transport.driver.publish(
                            exchange, victim_replies.queue_name, forged, retry_for=2
                        )
                await asyncio.sleep(0.5)  # an absence check: a forged reply would end the wait
                assert not waiting.done(), "a forged reply was accepted"
                victim_replies.unregister("forged-msg-id")
                results["forge a reply"] = "refused by the broker"

                # A request published without user_id (RabbitMQ only checks it when present).
                mine_replies = evil.transport.replies
                answer = mine_replies.register("no-user-id", None, accept)
                await mine_replies.ensure_listening()
                anonymous = {
                    "method": "ping",
                    "namespace": "baseapi",
                    "version": "1.0",
                    "args": {"arg": "hi"},
                    "_msg_id": "no-user-id",
                    "_reply_q": mine_replies.queue_name,
                }
                connection = await aio_pika.connect(evil_url)
                async with connection:
                    channel = await connection.channel()
                    exchange = await channel.get_exchange(cluster.spec.control_exchange)
                    await exchange.publish(
                        aio_pika.Message(codec.encode_message(anonymous)), routing_key="conductor"
                    )
                reply = await asyncio.wait_for(answer, 10)
                mine_replies.unregister("no-user-id")
                failure = codec.deserialize_remote_exception(reply["failure"], [])
                assert type(failure).__name__ == "Unauthenticated", failure
                results["a request without user_id"] = type(failure).__name__
                results["every call above claimed is_admin and roles=[admin]"] = "ignored"

            # An absence check, so a fixed wait: a cast that got through would have changed a
            # row or a hypervisor by now.
            await asyncio.sleep(1.0)
            after_db = _volatile_free(await snapshot(database), database)
            assert after_db == before_db, "an attack changed the database"
            assert _hypervisors(cluster) == before_virt, "an attack changed a hypervisor"
        finally:
            await database.dispose()

        refusals = _audit_refusals(cluster, "conductor-1")
        refused_actions = {e["action"] for e in refusals}
        assert {
            "Instance.save",
            "ComputeNode.save",
            "Flavor.destroy",
            "Service.register",
        } <= refused_actions
        assert {
            "compute_task.unlock_instance",
            "compute_task.security_group_create",
        } <= refused_actions
        assert all(e["caller"] == cluster.login_of(ATTACKER) for e in refusals)
        victim_refusals = {e["action"] for e in _audit_refusals(cluster, VICTIM)}
        assert {"terminate_instance", "get_live_migration_guest"} <= victim_refusals

        # The fleet keeps working: a build on the victim, a live migration victim -> attacker.
        (new,) = await cluster.boot(flavor="small", name="after", forced_host=VICTIM)
        (inst,) = await cluster.wait_instances([new])
        assert inst.vm_state == "active"
        mig2 = await cluster.tasks.live_migrate_instance(ops, instance_uuid=new, host=ATTACKER)
        assert (await _migration_end(cluster, ops, mig2))["status"] == "completed"
        print(json.dumps(results, indent=1))
