"""Carrying out a ``Plan``: batched compare-and-swaps, then one placement per stranded build.

Batched rules (builds failed on a down host, deletes finished, migrations settled, actions
finished) run as a handful of statements in one unit of work whatever the number of rows: the
``UPDATE`` that changes the rows returns which it changed, and the faults, action finishes and
event closes that go with them are ``INSERT ... SELECT`` / ``UPDATE ... WHERE id = ANY``
statements over exactly those. A build to place again (or re-cast) needs a scheduler decision
and a cast of its own: each goes through ``BuildTask`` with its own compare-and-swap.

Every row changed logs one line (``reconciled``) with the instance, rule, old and new state,
and counts in ``fleet_reconciler_actions_total{rule}``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import structlog

from conductor.reconcile import rules, statements
from conductor.reconcile.rules import Bounds, Move, Plan
from conductor.tasks import build_recovery as build_task
from conductor.tasks.build import BuildTask
from shared_objects.context import RequestContext
from shared_objects.fields import MigrationStatus, TaskState, VMState

log = structlog.get_logger(__name__)

#: ``count(rule)`` after each change (the metrics counter).
Counter = Callable[[str], None]

_REASONS = {
    rules.BUILD_HOST_DOWN: "its host {host} is down; the build was never taken",
    rules.BUILD_NOT_TAKEN: "{host} did not take the build after it was sent twice",
    rules.BUILD_UNASSIGNED: "the build was waiting with no host",
    rules.BUILD_TAKEN_HOST_DOWN: "{host} went down before it spawned anything",
}


def _log(level: str, uuid: str, rule: str, old: str, new: str, **extra: Any) -> None:
    getattr(log, level)("reconciled", instance_uuid=uuid, rule=rule, old=old, new=new, **extra)


async def apply_batches(
    ctxt: RequestContext, plan: Plan, bounds: Bounds, now: datetime.datetime, count: Counter
) -> None:
    """The batched rules, in one unit of work (the caller's)."""
    db = ctxt.db
    up_since = now - datetime.timedelta(seconds=bounds.service_down_time)
    spawning = plan.batches.get(rules.SPAWN_HOST_DOWN, {})
    if spawning:
        changed = await statements.fail_builds_on_down_hosts(
            db,
            list(spawning),
            states=[TaskState.SPAWNING],
            older_than=now - datetime.timedelta(seconds=bounds.build_host_down_after),
            up_since=up_since,
            now=now,
        )
        uuids = [r["uuid"] for r in changed]
        if uuids:
            await statements.record_faults(
                db,
                uuids,
                code=500,
                prefix="Host ",
                suffix=" went down during the build; the guest may exist there "
                "(its agent removes it when it returns)",
                details="settled by the conductor's reconciler (rule spawn_host_down)",
                now=now,
            )
            await _finish_and_close(db, uuids, "Error", "its host went down", now)
        for row in changed:
            uuid = row["uuid"]
            _log(
                "warning",
                uuid,
                rules.SPAWN_HOST_DOWN,
                spawning[uuid],
                "error/None",
                host=row["host"],
            )
            count(rules.SPAWN_HOST_DOWN)
    deleting = plan.batches.get(rules.DELETE_HOST_DOWN, {})
    if deleting:
        changed = await statements.finish_deletes_on_down_hosts(
            db,
            list(deleting),
            older_than=now - datetime.timedelta(seconds=bounds.delete_host_down_after),
            up_since=up_since,
            now=now,
        )
        uuids = [r["uuid"] for r in changed]
        if uuids:
            await statements.delete_bdms(db, uuids, now)
            await _finish_and_close(db, uuids, None, "its host went down", now)
        for row in changed:
            uuid = row["uuid"]
            _log(
                "warning",
                uuid,
                rules.DELETE_HOST_DOWN,
                deleting[uuid],
                "deleted/None",
                host=row["host"],
                note="guest, if any, left on the host",
            )
            count(rules.DELETE_HOST_DOWN)
    await _settle_migrations(ctxt, plan, bounds, now, up_since, count)
    await _finish_actions(ctxt, plan, now, count)


async def _finish_and_close(
    db: Any, uuids: list[str], message: str | None, why: str, now: datetime.datetime
) -> None:
    finished = await statements.finish_actions_of(db, uuids, message=message, now=now)
    ids = [r["id"] for r in finished]
    if ids:
        await statements.close_events(db, ids, details=f"abandoned: {why}", now=now)


async def _settle_migrations(
    ctxt: RequestContext,
    plan: Plan,
    bounds: Bounds,
    now: datetime.datetime,
    up_since: datetime.datetime,
    count: Counter,
) -> None:
    db = ctxt.db
    older_than = now - datetime.timedelta(seconds=bounds.migration_hosts_down_after)
    for candidates, statuses, new_status, vm_state in (
        (plan.migrations_failed, rules.MIGRATION_BEFORE_COPY, MigrationStatus.FAILED, None),
        (
            plan.migrations_lost,
            rules.MIGRATION_MAYBE_SWITCHED,
            MigrationStatus.ERROR,
            VMState.ERROR,
        ),
    ):
        if not candidates:
            continue
        changed = await statements.settle_migrations(
            db,
            list(candidates),
            statuses=statuses,
            new_status=new_status,
            older_than=older_than,
            up_since=up_since,
            now=now,
        )
        if not changed:
            continue
        by_instance = {r["instance_uuid"]: r for r in changed}
        released = await statements.release_migrated_instances(
            db, list(by_instance), vm_state=vm_state, now=now
        )
        uuids = [r["uuid"] for r in released]
        if uuids:
            if vm_state is None:
                prefix = "Live migration failed: source "
                suffix = " and its destination are both down; the instance stays on its source"
            else:
                prefix = "Live migration lost: source "
                suffix = (
                    " and its destination went down during the copy or switch-over; the guest "
                    "may run on either"
                )
            await statements.record_faults(
                db,
                uuids,
                code=500,
                prefix=prefix,
                suffix=suffix,
                details="settled by the conductor's reconciler (rule migration_hosts_down)",
                now=now,
            )
            await _finish_and_close(db, uuids, "Error", "both hosts went down", now)
        for row in changed:
            old = candidates[row["uuid"]][1]
            _log(
                "warning",
                row["instance_uuid"],
                rules.MIGRATION_HOSTS_DOWN,
                f"migration {old}",
                f"migration {new_status}",
                migration_uuid=row["uuid"],
                source=row["source_compute"],
                dest=row["dest_compute"],
                instance_released=row["instance_uuid"] in uuids,
            )
            count(rules.MIGRATION_HOSTS_DOWN)


async def _finish_actions(
    ctxt: RequestContext, plan: Plan, now: datetime.datetime, count: Counter
) -> None:
    db = ctxt.db
    for actions, message in ((plan.actions_error, "Error"), (plan.actions_ok, None)):
        if not actions:
            continue
        finished = await statements.finish_actions(db, list(actions), message=message, now=now)
        ids = [r["id"] for r in finished]
        if ids:
            await statements.close_events(
                db, ids, details="abandoned: its action was settled by the reconciler", now=now
            )
        for action_id in ids:
            uuid, name = actions[action_id]
            _log(
                "info",
                uuid,
                rules.ACTION_UNFINISHED,
                f"action {name} open",
                f"action {name} finished ({message or 'Success'})",
                action_id=action_id,
            )
            count(rules.ACTION_UNFINISHED)


async def apply_move(
    build: BuildTask,
    move: Move,
    attempts: list[str],
    bounds: Bounds,
    count: Counter,
) -> str:
    """Re-cast or place again one stranded build, or re-send a delete (its own units of work
    and cast)."""
    ctxt = RequestContext(
        user_id=move.user_id,
        project_id=move.project_id,
        is_admin=True,
        roles=["admin"],
    )
    if move.request_id is not None:
        # The build's attempts and its finish belong to its ``create`` action.
        ctxt.request_id = move.request_id
    expected = {"task_state": move.task_state, "host": move.host, "updated_at": move.updated_at}
    tried = [h for h in attempts if h]
    attempt = max(len(set(tried) | ({move.host} if move.host else set())), 1)
    if move.rule == rules.DELETE_NOT_FINISHED:
        outcome = await build.resend_delete(ctxt, instance_uuid=move.uuid, expected=expected)
        if outcome == build_task.RESENT:
            _log(
                "warning",
                move.uuid,
                move.rule,
                f"{move.task_state}",
                f"{move.task_state} (terminate sent again)",
                host=move.host,
            )
            count(move.rule)
        return outcome
    old = f"building/{move.task_state}"
    if move.rule == rules.BUILD_CAST_LOST:
        outcome = await build.recast(
            ctxt,
            instance_uuid=move.uuid,
            expected=expected,
            reason=f"not taken by {move.host} within {bounds.build_recast_after:g}s",
            tried=tried,
            attempt=attempt,
        )
        if outcome == build_task.RECAST:
            _log("warning", move.uuid, move.rule, old, f"{old} (sent again)", host=move.host)
            count(move.rule)
            return outcome
        if outcome != build_task.NO_ACTION:
            return outcome
        # Nothing to record the re-cast under: go straight to another host.
    reason = _REASONS.get(move.rule, "{host} did not take the build").format(host=move.host)
    outcome = await build.place_again(
        ctxt,
        instance_uuid=move.uuid,
        expected=expected,
        failed_host=move.host,
        reason=reason,
        tried=tried,
        attempt=attempt if move.host else max(len(set(tried)), 0),
    )
    if outcome != build_task.SKIPPED:
        new = (
            "building/scheduling (placed again)"
            if outcome == build_task.RESCHEDULED
            else "error/None"
        )
        _log("warning", move.uuid, move.rule, old, new, host=move.host, attempt=attempt)
        count(move.rule)
    return outcome
