"""The conductor's reconciler: nothing stays stranded in a transitional state (issue 13).

Work can be left with nobody responsible for it: a build cast to an agent that died (or whose
queue lost the message in a broker restart), a build or delete on a host that went down, a live
migration whose two hosts are both gone, an action nobody finished. Every conductor runs a
``Reconciler``; each pass reads the current state in a few batched statements, decides with
``rules.plan`` and drives each stranded row one step towards a final state (ACTIVE on another
host, or ERROR with an InstanceFault that says why) with compare-and-swap statements, so that
several conductors need no leader (``statements``, ``actions``).

Modules: ``rules`` (the decisions, pure), ``statements`` (the SQL), ``actions`` (carrying out
a plan), ``reconciler`` (the loop, its lifecycle and metrics).
"""

from conductor.reconcile.reconciler import PassReport, Reconciler, bounds_from_config
from conductor.reconcile.rules import RULES, Bounds

__all__ = ["RULES", "Bounds", "PassReport", "Reconciler", "bounds_from_config"]
