"""Deciding how an interrupted live migration ends, from what both hypervisors report.

The switch-over rule (see docs/virt.md): the guest belongs to the source until the source's
driver has persisted MIGRATED_OUT; from then on it belongs to the destination, whose INCOMING
guest holds the complete memory. Cleanup is ordered so that a crash between any two steps leaves
a pair of phases this table still resolves:

* forward: destination ``post_live_migration_at_destination`` (INCOMING -> RUNNING) first, then
  source ``post_live_migration`` (MIGRATED_OUT -> gone);
* backward: destination ``rollback_live_migration_at_destination`` (INCOMING -> gone) first, then
  source ``rollback_live_migration_at_source`` (MIGRATED_OUT -> RUNNING).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from compute_agent.virt.models import OWNER_PHASES, GuestPhase

#: (side, driver method name): which host's driver to call, and what.
Step = tuple[Literal["source", "dest"], str]


class Outcome(enum.StrEnum):
    """How the migration ends."""

    SOURCE = "source"  # guest stays (or is put back) on the source; migration failed
    DEST = "dest"  # guest is on the destination; migration completed
    IN_PROGRESS = "in_progress"  # the source is still copying: abort it first, then decide again
    LOST = "lost"  # neither hypervisor has a usable guest
    CONFLICT = "conflict"  # both claim the guest: the protocol was violated; needs an operator


@dataclass(frozen=True)
class Resolution:
    """The outcome and the driver calls, in order, that get both hosts there."""

    outcome: Outcome
    #: ("source" | "dest", driver method name) pairs to call in this order; each is idempotent.
    steps: tuple[Step, ...] = ()

    @property
    def switched_over(self) -> bool:
        """True if the guest moved (the Migration should end ``completed``, else ``error``)."""
        return self.outcome is Outcome.DEST


_ROLLBACK_DEST: Step = ("dest", "rollback_live_migration_at_destination")
_POST_DEST: Step = ("dest", "post_live_migration_at_destination")
_POST_SOURCE: Step = ("source", "post_live_migration")
_RESUME_SOURCE: Step = ("source", "rollback_live_migration_at_source")


def resolve_migration(source: GuestPhase | None, dest: GuestPhase | None) -> Resolution:
    """Decide an interrupted migration from the guest's phase on each host (None: absent)."""
    if source is GuestPhase.MIGRATING_OUT:
        # Only a live copy loop is in this phase (a restart turns it back into RUNNING).
        return Resolution(Outcome.IN_PROGRESS)
    source_owns = source in OWNER_PHASES
    dest_owns = dest in OWNER_PHASES
    if source_owns and dest_owns:
        return Resolution(Outcome.CONFLICT)
    if source_owns:
        if dest is GuestPhase.INCOMING:
            return Resolution(Outcome.SOURCE, (_ROLLBACK_DEST,))
        if dest is None:
            return Resolution(Outcome.SOURCE)
        return Resolution(Outcome.CONFLICT)
    if source is GuestPhase.MIGRATED_OUT:
        if dest is GuestPhase.INCOMING:
            return Resolution(Outcome.DEST, (_POST_DEST, _POST_SOURCE))
        if dest_owns:
            return Resolution(Outcome.DEST, (_POST_SOURCE,))
        if dest is None:
            # The destination already rolled back: the paused source copy is the only one left.
            return Resolution(Outcome.SOURCE, (_RESUME_SOURCE,))
        return Resolution(Outcome.CONFLICT)
    if source is None:
        if dest_owns:
            return Resolution(Outcome.DEST)
        if dest is GuestPhase.INCOMING:
            # The source never switched over (its guest was deleted): the incoming memory is
            # incomplete, so nothing can run the guest any more.
            return Resolution(Outcome.LOST, (_ROLLBACK_DEST,))
        if dest is None:
            return Resolution(Outcome.LOST)
    return Resolution(Outcome.CONFLICT)
