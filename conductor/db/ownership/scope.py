"""Who is asking (``OwnerScope``: the caller's hosts) and the SQL pieces every ownership
condition is built from (``Sql``: the caller's hosts as a bound parameter, membership tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import ARRAY, ColumnElement, FromClause, String, any_, bindparam

from conductor.db import models
from shared_objects import releases
from shared_objects.fields import MigrationStatus

#: Statuses of a migration still in progress (it holds resources on both hosts): the set
#: ``MigrationList.get_in_progress_by_host`` uses. Agents must not import ``conductor.db``; their
#: "is this migration still going on?" should use the same definition (``MigrationStatus.ALL``
#: minus ``MigrationStatus.FINISHED``).
ACTIVE_MIGRATION_STATUSES: tuple[str, ...] = tuple(
    s for s in MigrationStatus.ALL if s not in MigrationStatus.FINISHED
)

#: Statuses under which an instance may still switch hosts through its migration: active ones,
#: and ``error`` (the outcome is unknown; the recovery of either host settles it from the
#: hypervisors). ``completed``, ``failed`` and ``cancelled`` are settled.
MOVABLE_MIGRATION_STATUSES: tuple[str, ...] = (*ACTIVE_MIGRATION_STATUSES, MigrationStatus.ERROR)

#: The only binary whose ``services`` rows an agent may write.
AGENT_BINARY = releases.BINARY_COMPUTE

#: The bound parameter that carries the caller's hosts.
HOSTS_PARAM = "o_hosts"

_TABLES = models.metadata.tables
_INSTANCES = _TABLES["instances"]
_MIGRATIONS = _TABLES["migrations"]
_ACTIONS = _TABLES["instance_actions"]
_SG_LINKS = _TABLES["security_group_instance_association"]


@dataclasses.dataclass(frozen=True, slots=True)
class OwnerScope:
    """What a scoped unit of work may touch: the rows of ``hosts`` (see the module docstring).
    ``login`` is the broker login, named in ``Forbidden`` errors."""

    hosts: frozenset[str]
    login: str

    def params(self) -> dict[str, Any]:
        """The bound parameters every scoped statement takes."""
        return {HOSTS_PARAM: sorted(self.hosts)}


class Sql:
    """Condition building blocks for one statement form (``arrays`` as in
    ``conductor.db.where.where_clause_for``: ``= ANY(:array)`` instead of an expanding ``IN``)."""

    def __init__(self, arrays: bool) -> None:
        self.arrays = arrays

    def mine(self, col: Any) -> ColumnElement[bool]:
        """``col`` names one of the caller's hosts."""
        if self.arrays:
            return col == any_(bindparam(HOSTS_PARAM, type_=ARRAY(String())))
        return col.in_(bindparam(HOSTS_PARAM, expanding=True, type_=String()))

    def one_of(self, col: Any, name: str, values: Iterable[str]) -> ColumnElement[bool]:
        """``col`` is one of the constant ``values`` (a bound parameter with its value)."""
        listed = list(values)
        if self.arrays:
            return col == any_(bindparam(name, value=listed, type_=ARRAY(col.type)))
        return col.in_(bindparam(name, value=listed, expanding=True, type_=col.type))

    @staticmethod
    def is_(col: Any, name: str, value: Any) -> ColumnElement[bool]:
        """``col`` equals the constant ``value``."""
        return col == bindparam(name, value=value, type_=col.type)


# A condition on the rows of one table (the statement's own table, or an alias of it).
Condition = Callable[[FromClause, Sql], ColumnElement[bool]]
