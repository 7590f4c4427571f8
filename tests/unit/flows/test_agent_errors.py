"""A driver error raised in a real agent's RPC handler reaches its caller as the shared error.

The conductor asking a destination (``check_can_live_migrate_destination``) and a source agent
asking its destination (``pre_live_migration``) both get ``shared_objects.exception``'s class
of the driver error's name, and the migration's fault reads as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from live_migration_helpers import boot, latest_fault, settle_task, user, wait_migration

from compute_agent.virt.migration_model import MigrationModel
from shared_objects import exception

FAST = MigrationModel(bandwidth_mb_s=2000, round_interval_s=0.02)


def _spy(monkeypatch: pytest.MonkeyPatch, client: Any, method: str) -> list[BaseException]:
    """The errors ``client.method`` raises to its caller, in order."""
    seen: list[BaseException] = []
    original: Callable[..., Any] = getattr(client, method)

    async def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            return await original(*args, **kwargs)
        except Exception as exc:
            seen.append(exc)
            raise

    monkeypatch.setattr(client, method, spy)
    return seen


@pytest.mark.parametrize(
    ("step", "caller"),
    [("check_can_live_migrate_destination", "conductor"), ("pre_live_migration", "host-a")],
)
async def test_a_driver_failure_on_the_destination_reaches_the_caller_as_the_shared_error(
    lm_fleet_factory: Any, monkeypatch: pytest.MonkeyPatch, step: str, caller: str
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        client = (
            fleet.endpoint.live_migration.compute
            if caller == "conductor"
            else fleet.agents[caller].live_migration.compute
        )
        seen = _spy(monkeypatch, client, step)
        fleet.driver("host-b").failures.inject(step, count=None)
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] in {"failed", "error"}
        assert [type(e) for e in seen] == [exception.InjectedFailure]
        assert f"injected failure at step {step} for instance {uuid}" in str(seen[0])
        # Sent as the shared class (the agent's boundary), not rebuilt from the driver's.
        sent = seen[0].remote_traceback[-1]  # type: ignore[attr-defined]
        assert sent.startswith("shared_objects.exception.InjectedFailure: "), sent
        assert f"injected failure at step {step}" in await latest_fault(fleet, uuid)
