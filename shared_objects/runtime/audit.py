"""The audit trail: one log line per refused call and per accepted change.

Every line is the event ``audit`` on the ``fleet.audit`` logger with the same keys, so an operator
can follow one login's actions with a single filter (``jq 'select(.event == "audit")'``):
``outcome`` (``refused`` or ``accepted``), ``caller`` (the broker login), ``role``, ``action``
(``Instance.save``, ``compute_task.build_instances``, ``terminate_instance`` ...), ``target``
(what it would touch: an instance uuid, a host) and, for refusals, ``reason``. The request id
and the RPC method are bound by the RPC server already.
"""

from __future__ import annotations

from typing import Any

import structlog

from shared_objects.runtime.identity import Caller

_log = structlog.get_logger("fleet.audit")


def refused(caller: Caller | None, action: str, target: Any, reason: str) -> None:
    """A call that was refused: nothing changed (WARNING: someone tried something)."""
    _log.warning(
        "audit",
        outcome="refused",
        caller=caller.login if caller is not None else None,
        role=caller.role.value if caller is not None else None,
        action=action,
        target=_short(target),
        reason=reason,
    )


def accepted(caller: Caller | None, action: str, target: Any) -> None:
    """A change that was allowed and carried out."""
    _log.info(
        "audit",
        outcome="accepted",
        caller=caller.login if caller is not None else None,
        role=caller.role.value if caller is not None else None,
        action=action,
        target=_short(target),
    )


def _short(target: Any) -> Any:
    # Targets come from the wire: never let one blow up a log line.
    if isinstance(target, str):
        return target[:200]
    if target is None or isinstance(target, (int, float, bool)):
        return target
    return repr(target)[:200]
