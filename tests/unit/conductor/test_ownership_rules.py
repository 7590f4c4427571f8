"""The ownership rules (``conductor/db/ownership/``) without a database: coverage of the
schema, the columns no agent may write, and the statements they compile to."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import and_, insert, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg

from conductor.db import asyncpg_exec, models, ownership
from conductor.db.ownership import RULES, OwnerScope, Sql
from shared_objects import exception, releases

SCOPE = OwnerScope(frozenset({"h1"}), "fleet-host-h1")
PG = pg_asyncpg.dialect(paramstyle="numeric_dollar")

# Columns that grant rights or ownership: no agent writes them, ever.
NEVER_WRITABLE = {
    "instances": {"id", "uuid", "user_id", "project_id", "locked", "locked_reason", "flavor"}
    | {"vcpus", "memory_mb", "root_gb", "ephemeral_gb", "created_at"},
    "compute_nodes": {"id", "uuid", "host", "hypervisor_hostname", "deleted"},
    "services": {"id", "host", "binary", "disabled", "disabled_reason", "forced_down", "deleted"},
    "migrations": {"id", "uuid", "instance_uuid", "source_compute", "dest_compute"}
    | {"source_node", "dest_node", "migration_type", "deleted"},
    "block_device_mappings": {"id", "uuid", "instance_uuid", "volume_id"},
    "instance_actions": {"id", "instance_uuid", "request_id", "user_id", "project_id"},
    "instance_action_events": {"id", "action_id", "host"},
    "security_group_instance_association": {"id", "instance_uuid", "security_group_id"},
}


def test_every_table_has_a_decided_rule() -> None:
    """A new table must be given a rule here before agents can touch it (else: nothing)."""
    assert set(RULES) == set(models.metadata.tables)
    assert ownership.rule_for("not_a_table") == ownership.Rule()


@pytest.mark.parametrize("table", sorted(RULES))
def test_writable_columns_exist_and_exclude_owner_and_rights_columns(table: str) -> None:
    rule = RULES[table]
    columns = set(models.metadata.tables[table].c.keys())
    assert rule.writable <= columns
    assert not rule.writable & NEVER_WRITABLE.get(table, set())
    if rule.update is None:
        assert not rule.writable


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("instances", {"locked": False}),
        ("instances", {"user_id": "u2"}),
        ("instances", {"deleted": False}),
        ("services", {"forced_down": False}),
        ("migrations", {"dest_compute": "h1"}),
        ("flavors", {"vcpus": 64}),
        ("instance_faults", {"message": "x"}),
    ],
)
def test_refused_writes_are_decided_before_any_statement(
    table: str, values: dict[str, Any]
) -> None:
    with pytest.raises(exception.Forbidden) as caught:
        ownership.plan_update(SCOPE, table, {"id": 1}, values)
    assert "fleet-host-h1" in str(caught.value) and table in str(caught.value)


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("instances", {"uuid": "u", "host": "h1"}),
        ("migrations", {"instance_uuid": "u", "source_compute": "h1"}),
        ("compute_nodes", {"host": "h2"}),
        ("services", {"host": "h1", "binary": releases.BINARY_CONDUCTOR}),
        ("services", {"host": "h2", "binary": releases.BINARY_COMPUTE}),
        ("instance_faults", {"instance_uuid": "u", "host": "h2"}),
        ("instance_action_events", {"action_id": 1, "host": "h2"}),
        ("security_groups", {"name": "x"}),
        ("flavors", {"name": "x"}),
    ],
)
def test_refused_inserts_are_decided_before_any_statement(
    table: str, values: dict[str, Any]
) -> None:
    with pytest.raises(exception.Forbidden):
        ownership.plan_insert(SCOPE, table, values)


def test_reads_of_unreadable_tables_are_refused_and_fleet_facts_are_not_scoped() -> None:
    assert ownership.read_condition(SCOPE, "flavors") is None
    assert ownership.read_condition(SCOPE, "services") is None
    assert ownership.read_condition(SCOPE, "instances") is not None
    with pytest.raises(exception.Forbidden):
        ownership.read_condition(SCOPE, "alembic_version")


def _scoped_statements(arrays: bool) -> list[Any]:
    q = Sql(arrays)
    out: list[Any] = []
    for name, rule in RULES.items():
        t = models.metadata.tables[name]
        if rule.read is not None:
            out.append(select(t).where(rule.read(t, q)))
        if rule.update is not None:
            column = sorted(rule.writable - {"deleted"})[0]
            plan = ownership.plan_update(SCOPE, name, {"id": 1}, {column: None})
            assert plan.condition is not None
            out.append(update(t).where(and_(plan.condition(t, q))).values({column: None}))
    t = models.metadata.tables["instances"]
    for host in (None, "h2"):
        plan = ownership.plan_update(SCOPE, "instances", {"id": 1}, {"host": host})
        assert plan.condition is not None
        out.append(update(t).where(plan.condition(t, q)).values(host=host))
    for name in ("block_device_mappings", "instance_faults", "instance_action_events"):
        t = models.metadata.tables[name]
        guard = RULES[name].insert
        assert guard is not None and guard.guard is not None
        out.append(insert(t).from_select(["id"], select(t.c.id).where(guard.guard(t, q))))
    return out


def test_the_driver_path_uses_any_arrays_and_compiles_once_for_every_host_count() -> None:
    """Membership in the caller's hosts is ``= ANY(:o_hosts)``: one statement text whatever
    the number of hosts, and no expanding parameter the driver path could not bind."""
    for stmt in _scoped_statements(arrays=True):
        compiled = asyncpg_exec.compile_statement(stmt, PG)
        assert "POSTCOMPILE" not in compiled.sql
        assert ownership.HOSTS_PARAM in compiled.names
        params = SCOPE.params() | {n: None for n in compiled.names if n != "o_hosts"}
        params.update({k: v for k, v in compiled.literals.items()})
        compiled.args(params)


def test_the_sqlalchemy_path_compiles_every_rule() -> None:
    for stmt in _scoped_statements(arrays=False):
        text = str(stmt.compile(dialect=sqlite.dialect()))
        assert "o_hosts" in text


def test_the_scope_binds_its_hosts_as_one_parameter() -> None:
    scope = OwnerScope(frozenset({"b", "a"}), "legacy")
    assert scope.params() == {ownership.HOSTS_PARAM: ["a", "b"]}
    assert set(ownership.ACTIVE_MIGRATION_STATUSES).isdisjoint({"completed", "error"})
