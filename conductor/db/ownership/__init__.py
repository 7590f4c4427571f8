"""Ownership: which rows an agent's object calls may read and write (issue 11).

An agent speaks for the hosts its broker login names (``shared_objects.runtime.identity.Caller``).
The conductor runs each of its remotable calls in a unit of work that carries an
:class:`OwnerScope`; ``DbApi`` then adds this module's conditions to *every* statement of the
call, so the check rides inside the statement that reads or writes (extra ``WHERE`` terms,
``INSERT ... SELECT ... WHERE EXISTS``): there is no separate "may I?" query, nothing can change
between a check and the act, and the success path costs no extra statement. When a scoped
statement finds or changes nothing although the same statement without the scope would have,
``DbApi`` raises ``Forbidden`` (that second look happens only on the failure path). A write of
a column the table's rule does not list, or of a value the rule refuses, is ``Forbidden``
before any statement runs.

The rules. H is the caller's hosts. An instance is *readable* when its ``host`` is in H or
the caller is a host (source or destination) of the instance's latest migration, whatever that
migration's status (crash recovery and the action's finish come after it ended); it is
*writable* when its ``host`` is in H, or the caller is a host of its latest migration while
that migration is *in flight* (active, or the instance is still ``migrating``: not settled).

==================================== ==================== ==================== ==================
table                                read                 update               insert
==================================== ==================== ==================== ==================
instances                            readable             writable             never
compute_nodes                        host in H            host in H            host in H
services                             every row            host in H, compute   host in H, compute
migrations                           src or dest in H     src or dest in H     never
block_device_mappings                of a readable        of a writable        of a writable
instance_actions                     of a readable        of a readable        of a readable
instance_action_events               of such an action    of such an action    of such an action
instance_faults                      of a readable        never                of a readable
security_group_instance_association  of a readable        of one on H          never
security_groups                      linked to readable   never                never
security_group_rules                 of such a group      never                never
flavors                              every row            never                never
(any other table)                    never                never                never
==================================== ==================== ==================== ==================

"Of a readable"/"of a writable": rows whose ``instance_uuid`` is a readable/writable instance;
"of one on H": of an instance whose ``host`` is in H; "such an action": an ``instance_actions``
row of a readable instance; "compute": ``binary`` = ``fleet-compute`` (an agent cannot pose as a
conductor). Guarded inserts are ``INSERT ... SELECT ... WHERE EXISTS (...)``: the guard and the
insert are one statement.

Deletes (hard ``DELETE``) are never allowed: no agent flow deletes rows, soft deletes are
updates. The columns an update may set are listed per table (``Rule.writable`` in ``RULES``);
everything else is refused, in particular ``instances.user_id``, ``project_id``, ``locked``,
``locked_reason``, ``uuid``, ``flavor`` and the resource sizes, every foreign key or owner
column (``host`` of compute nodes and services, ``source_compute``/``dest_compute``,
``instance_uuid``, ``action_id``) and every service flag an operator sets (``disabled``,
``forced_down``).

Values a write may set:

* ``instances.host``: unchanged; or ``None`` on an instance whose ``host`` is in H (an agent
  hands a build back); or the destination of the instance's latest migration, while the
  instance is ``migrating`` and still on that migration's source, when the caller is its
  source or its destination and the migration is active or ``error`` (the switch-over, and its
  settlement by recovery after a crash or a silent peer). ``node`` follows no rule of its own:
  ownership goes by ``host``.
* ``deleted``: only ever set (never cleared); on ``instances`` only where ``host`` is in H (a
  migration peer may not destroy the instance).
* ``migrations.status``: an active status only on a migration that is still active (a finished
  migration cannot be reopened, which would make its hosts "in flight" again).
* ``host`` of inserted faults and action events: in H or ``None``.

Hosts travel as one bound parameter (``o_hosts``; ``= ANY(:array)`` on the driver path), so a
statement's text depends on the scope's *shape* only and compiles once for every agent.

The package: ``scope.py`` (the caller's hosts, the SQL pieces), ``conditions.py`` (instances and
the rows hanging off them), ``rules.py`` (the rule table), ``plans.py`` (what ``DbApi`` asks).
"""

from __future__ import annotations

from conductor.db.ownership.plans import (
    WritePlan,
    describe,
    forbidden,
    plan_insert,
    plan_update,
    read_condition,
)
from conductor.db.ownership.rules import RULES, InsertRule, Rule, rule_for
from conductor.db.ownership.scope import (
    ACTIVE_MIGRATION_STATUSES,
    HOSTS_PARAM,
    MOVABLE_MIGRATION_STATUSES,
    Condition,
    OwnerScope,
    Sql,
)

__all__ = [
    "ACTIVE_MIGRATION_STATUSES",
    "HOSTS_PARAM",
    "MOVABLE_MIGRATION_STATUSES",
    "RULES",
    "Condition",
    "InsertRule",
    "OwnerScope",
    "Rule",
    "Sql",
    "WritePlan",
    "describe",
    "forbidden",
    "plan_insert",
    "plan_update",
    "read_condition",
    "rule_for",
]
