"""The demos' broker logins (``conductor.tools.demo.demo_broker``, used by ``make demo`` and ``make
demo-upgrade``): named with a tag of each run's own, so two demos at once never share a login
nor delete each other's, and deleted when the demo ends, also when it fails."""

from __future__ import annotations

import shutil

import pytest

from conductor.tools.demo import demo_broker
from conductor.tools.demo_upgrade import shared_login
from shared_objects.testing.broker_logins import BrokerLogins, Rabbitmqctl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl"),
]

HOSTS = ("compute-1", "compute-2")


async def broker_users() -> set[str]:
    return {user["name"] for user in (await Rabbitmqctl().export_definitions())["users"]}


async def provision(logins: BrokerLogins) -> set[str]:
    """What a demo creates: a conductor, an operator, two agents and the shared legacy login."""
    shared = shared_login(logins.tag)
    await logins.ensure(
        conductors=["1"],
        operators=[""],
        hosts=list(HOSTS),
        legacy={shared: list(HOSTS)},
        exchanges=["fleet"],
    )
    return {
        logins.conductor_login("1"),
        logins.operator_login(),
        *(logins.host_login(h) for h in HOSTS),
        shared,
    }


async def test_two_demos_at_once_get_their_own_logins_and_delete_them_at_the_end() -> None:
    async with demo_broker() as (vhost_a, a), demo_broker() as (vhost_b, b):
        if a is None or b is None:
            pytest.skip("needs private vhosts (rabbitmqctl on the local broker)")
        assert vhost_a != vhost_b
        names_a = await provision(a)
        names_b = await provision(b)
        assert not names_a & names_b, (names_a, names_b)
        # None of the documented, untagged names: a cluster of those keeps its logins.
        documented = {"fleet-conductor-1", "fleet-operator", "fleet-host-compute-1", "fleet"}
        assert not (names_a | names_b) & documented
        assert names_a | names_b <= await broker_users()
        async with a:
            pass  # one demo ends first: its logins go, the other's stay
        users = await broker_users()
        assert not names_a & users and names_b <= users
    assert not (names_a | names_b) & await broker_users()


async def test_a_failing_demo_deletes_its_logins() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="demo step failed"):
        async with demo_broker() as (_, logins):
            if logins is None:
                pytest.skip("needs a private vhost (rabbitmqctl on the local broker)")
            names = await provision(logins)
            raise RuntimeError("demo step failed")
    assert names and not names & await broker_users()
