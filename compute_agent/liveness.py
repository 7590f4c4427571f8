"""How an agent beats: ``report_alive`` where every live conductor has it, else the
``Service.heartbeat`` remotable of earlier releases.

``report_alive`` (conductor API 1.1, release 1.2) sends nothing and costs the conductor a share
of one batched UPDATE (``conductor/liveness.py``); ``Service.heartbeat`` is a whole object round
trip and a statement of its own. During a rolling upgrade a conductor of release 1.1 may still
take this agent's calls: until the oldest live conductor's release has conductor API 1.1 (read
from the services table at the first beat, then every ``recheck`` seconds while it is not so)
the agent beats the old way. A conductor that turns the new call down anyway (a race with that
check) makes this agent fall back for the beat and look again later.

A ``report_alive`` answer also says whether a live migration from this host waits to start
(``live_migrations_waiting``): the orphan sweep reads this host's migrations only then
(``sweep_wanted``), instead of one object call per minute that almost never finds anything.

Only every ``answer_every``-th beat (default 6: once a minute at the default interval) is a call
that waits for that answer; the beats between are casts. A call's reply is a third of what a
beat costs the conductor (encode, publish with a publisher confirm, a socket write), and the
answer changes rarely: the row's flags are shown to the operator, the migration flag is read by
a sweep that runs once a minute for migrations stuck 15 minutes. What the answer also proves,
that beats are written (a database outage fails the call), is seen at the next call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from shared_objects import exception, releases
from shared_objects.objects.service import Service, heartbeat_beat
from shared_objects.rpc_clients.conductor import REPORT_ALIVE_VERSION, ConductorAPI
from shared_objects.runtime.messaging import NoSuchMethod, RemoteError, UnsupportedVersion
from shared_objects.runtime.messaging.versions import version_is_compatible

log = structlog.get_logger(__name__)

# What a conductor without report_alive answers (as RemoteError where the class is not
# re-created).
_OLD_CONDUCTOR_ERRORS = frozenset({"UnsupportedVersion", "NoSuchMethod"})
# The row's flags an operator sets, logged when they change.
_SHOWN = ("disabled", "forced_down")


class AgentBeat:
    """The agent's ``ServiceReporter`` beat (see the module docstring)."""

    def __init__(
        self,
        conductor: ConductorAPI,
        *,
        service_down_time: float,
        recheck: float = 60.0,
        answer_every: int = 6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if answer_every < 1:
            raise ValueError("answer_every must be at least 1")
        self.conductor = conductor
        self.answer_every = answer_every
        # Casts sent since the last answered beat (None: no answer yet, the next beat calls).
        self._casts: int | None = None
        self.service_down_time = service_down_time
        self.recheck = recheck
        self._clock = clock
        # None: not checked yet; True: report_alive; False: heartbeat until the next check.
        self.cheap: bool | None = None
        self._check_at = 0.0
        self._state: dict[str, Any] | None = None
        # From the last report_alive answer; None: not known (no answer yet, or an old
        # conductor's answer without it).
        self.live_migrations_waiting: bool | None = None

    async def __call__(self, ctxt: Any, service: Service) -> None:
        if self.cheap is not True and self._clock() >= self._check_at:
            await self._check(ctxt)
        if self.cheap:
            if self._casts is not None and self._casts < self.answer_every - 1:
                await self.conductor.report_alive_cast(ctxt)
                self._casts += 1
                return
            try:
                state = await self.conductor.report_alive(ctxt)
            except (UnsupportedVersion, NoSuchMethod) as exc:
                self._fall_back(type(exc).__name__)
            except RemoteError as exc:
                if exc.exc_type not in _OLD_CONDUCTOR_ERRORS:
                    raise
                self._fall_back(exc.exc_type or "")
            except exception.Forbidden as exc:
                # A conductor whose policy has no report_alive (or a login it will not take
                # a beat from): the old way still works, with its own authorisation.
                self._fall_back(f"Forbidden: {exc}")
            else:
                self._casts = 0
                waiting = state.get("live_migrations_waiting") if isinstance(state, dict) else None
                self.live_migrations_waiting = waiting if isinstance(waiting, bool) else None
                self._show(state, service.host)
                return
        await heartbeat_beat(ctxt, service)

    async def _check(self, ctxt: Any) -> None:
        oldest = await Service.get_minimum_version(
            ctxt, releases.BINARY_CONDUCTOR, self.service_down_time
        )
        api = releases.for_service_version(oldest).conductor_rpc_api
        cheap = version_is_compatible(api, REPORT_ALIVE_VERSION)
        if cheap != self.cheap:
            log.info(
                "liveness_mode",
                report_alive=cheap,
                oldest_conductor_version=oldest,
                conductor_rpc_api=api,
            )
        self.cheap = cheap
        self._check_at = self._clock() + self.recheck

    def sweep_wanted(self) -> bool:
        """Whether the live-migration orphan sweep should read this host's migrations now:
        unless the last ``report_alive`` answer said none waits to start."""
        return not (self.cheap and self.live_migrations_waiting is False)

    def _fall_back(self, reason: str) -> None:
        log.warning("liveness_report_alive_refused", reason=reason[:200], fallback="heartbeat")
        self.live_migrations_waiting = None
        self._casts = None
        self.cheap = False
        self._check_at = self._clock() + self.recheck

    def _show(self, state: Any, host: str) -> None:
        """One line when the row's disabled/forced_down changes (or is set at the start)."""
        if not isinstance(state, dict):
            return
        state = {k: v for k, v in state.items() if k in _SHOWN}
        if state != self._state and (self._state is not None or any(state.values())):
            log.info("service_state", host=host, **{k: bool(v) for k, v in state.items()})
        self._state = state
