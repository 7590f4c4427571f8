"""Failure injection for the fake hypervisor: make any driver step fail (or be slow) on purpose.

Two ways in, same rules:

* test hook: ``driver.failures.inject("spawn", count=1, uuid=None, exc=None)``,
  ``driver.failures.inject("live_migration_copy", after_rounds=3)``,
  ``driver.failures.delay("pre_live_migration", 2.0)``;
* the agent's ``[compute] failures`` option (``FLEET_COMPUTE__FAILURES``) for agents running
  as subprocesses, a comma-separated list of ``step[:count][:option...]`` items, see
  ``parse_failure_spec``;
* a watched file (``[compute] failures_file``) holding a spec in the same syntax, so a test can
  change the failures of an agent that is already running: every rewrite of the file replaces
  the rules that came from it (an empty or deleted file clears them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from compute_agent.virt.exceptions import InjectedFailure

LOG = structlog.get_logger(__name__)

#: Every step a failure can be injected at (a typo in a step name is an error, not a no-op).
STEPS: frozenset[str] = frozenset(
    {
        "init_host",
        "spawn",
        "destroy",
        "power_off",
        "power_on",
        "attach_volume",
        "detach_volume",
        "refresh_instance_security_rules",
        "unfilter_instance",
        "check_can_live_migrate_destination",
        "check_can_live_migrate_source",
        "pre_live_migration",
        "live_migration",
        "live_migration_copy",
        "post_live_migration",
        "post_live_migration_at_destination",
        "rollback_live_migration_at_destination",
        "rollback_live_migration_at_source",
    }
)

ExcFactory = Callable[[str, str | None], BaseException]


@dataclass
class FailureRule:
    """One injected failure (or slowdown): where it applies and how many times it is left."""

    step: str
    #: How many more times it fires; None means every time.
    remaining: int | None = 1
    #: Only for this instance (None: any instance).
    uuid: str | None = None
    #: What to raise; None raises InjectedFailure(step=..., uuid=...).
    exc: BaseException | type[BaseException] | ExcFactory | None = None
    #: live_migration_copy only: fire in the copy round with this index or later (0 = first).
    after_rounds: int = 0
    #: Seconds to sleep when it fires. A rule with delay_s > 0 and fail=False only slows the step.
    delay_s: float = 0.0
    fail: bool = True
    fired: int = field(default=0)
    #: True for rules loaded from the watched failures file (replaced when it changes).
    from_file: bool = False

    def matches(self, step: str, uuid: str | None, round_index: int | None) -> bool:
        """True if this rule applies to this call."""
        if self.step != step or self.remaining == 0:
            return False
        if self.uuid is not None and self.uuid != uuid:
            return False
        return not (round_index is not None and round_index < self.after_rounds)

    def build_exception(self, uuid: str | None) -> BaseException:
        """The exception to raise for this firing."""
        exc = self.exc
        if exc is None:
            return InjectedFailure(step=self.step, uuid=uuid)
        if isinstance(exc, BaseException):
            return exc
        if isinstance(exc, type):
            return exc()
        return exc(self.step, uuid)


class FailureInjector:
    """Holds the active failure rules of one driver and fires them at the driver's steps."""

    def __init__(self) -> None:
        self._rules: list[FailureRule] = []
        #: (step, uuid) of every firing, oldest first: lets a test prove a failure was hit.
        self.history: list[tuple[str, str | None]] = []
        self._file: Path | None = None
        self._file_signature: tuple[int, int, int] | None = None

    def watch_file(self, path: Path | None) -> None:
        """Take rules from ``path`` too, re-read whenever it changes (checked at every step).

        Write the file atomically (temporary file + rename) so a step never reads half of it.
        """
        self._file = path
        self._file_signature = None

    def inject(
        self,
        step: str,
        count: int | None = 1,
        *,
        uuid: str | None = None,
        exc: BaseException | type[BaseException] | ExcFactory | None = None,
        after_rounds: int = 0,
    ) -> FailureRule:
        """Make ``step`` fail ``count`` times (None: always), optionally for one instance only.

        ``after_rounds`` (``live_migration_copy`` only) lets the copy run that many rounds first,
        so the failure happens mid-way.
        """
        return self._add(
            FailureRule(step, _check_count(count), uuid, exc, after_rounds=after_rounds)
        )

    def delay(
        self, step: str, seconds: float, count: int | None = None, *, uuid: str | None = None
    ) -> FailureRule:
        """Make ``step`` take ``seconds`` longer (``count`` times; None: always) without failing."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        return self._add(
            FailureRule(step, _check_count(count), uuid, delay_s=float(seconds), fail=False)
        )

    def load_spec(self, spec: str) -> list[FailureRule]:
        """Add the rules of a spec string (``[compute] failures`` syntax)."""
        return [self._add(rule) for rule in parse_failure_spec(spec)]

    def clear(self, step: str | None = None) -> None:
        """Remove all rules (or those of one step)."""
        self._rules = [r for r in self._rules if step is not None and r.step != step]

    def pending(self, step: str | None = None) -> list[FailureRule]:
        """Rules that can still fire."""
        return [r for r in self._rules if r.remaining != 0 and (step is None or r.step == step)]

    async def check(self, step: str, uuid: str | None, round_index: int | None = None) -> None:
        """Called by the driver at ``step``: sleeps and/or raises if a rule matches.

        At most one failing rule fires per call; every matching delay rule adds its delay.
        """
        if self._file is not None:
            await self._refresh_from_file(self._file)
        if not self._rules:
            return
        delay = 0.0
        failing: FailureRule | None = None
        for rule in self._rules:
            if not rule.matches(step, uuid, round_index):
                continue
            if rule.fail and failing is not None:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
            rule.fired += 1
            delay += rule.delay_s
            if rule.fail:
                failing = rule
        if delay > 0:
            await asyncio.sleep(delay)
        if failing is not None:
            self.history.append((step, uuid))
            raise failing.build_exception(uuid)

    async def _refresh_from_file(self, path: Path) -> None:
        signature, text = await asyncio.to_thread(_read_if_changed, path, self._file_signature)
        if signature == self._file_signature:
            return
        self._file_signature = signature
        try:
            rules = parse_failure_spec(text or "")
            for rule in rules:
                _validate(rule)
        except ValueError as exc:
            # A typo in a test's file must not crash the agent: keep the previous rules.
            LOG.error("fake_failures_file_invalid", path=str(path), error=str(exc))
            return
        self._rules = [r for r in self._rules if not r.from_file]
        for rule in rules:
            rule.from_file = True
            self._rules.append(rule)
        LOG.info("fake_failures_file_loaded", path=str(path), rules=len(rules))

    def _add(self, rule: FailureRule) -> FailureRule:
        _validate(rule)
        self._rules.append(rule)
        return rule


def _validate(rule: FailureRule) -> None:
    if rule.step not in STEPS:
        raise ValueError(f"unknown failure injection step {rule.step!r}")
    if rule.after_rounds and rule.step != "live_migration_copy":
        raise ValueError("after_rounds only applies to live_migration_copy")
    if rule.after_rounds < 0:
        raise ValueError("after_rounds must be >= 0")


def _read_if_changed(
    path: Path, known: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int] | None, str | None]:
    """(signature, text) of the file; text is None when unchanged or absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None
    signature = (st.st_ino, st.st_mtime_ns, st.st_size)
    if signature == known:
        return signature, None
    try:
        return signature, path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None


def _check_count(count: int | None) -> int | None:
    if count is not None and count < 1:
        raise ValueError("count must be >= 1 or None (always)")
    return count


def parse_failure_spec(spec: str) -> list[FailureRule]:
    """Parse a failure spec (``[compute] failures``): ``step[:count][:option...]`` items, by commas.

    ``count`` is a positive integer or ``*`` (every time); it defaults to 1. Options:
    ``uuid=<instance uuid>`` (only that instance), ``after=<N>`` (live_migration_copy: fail in
    round N, i.e. after N rounds were copied), ``delay=<seconds>`` (slow the step down instead of
    failing it). Example: ``spawn:1,pre_live_migration:*,live_migration_copy:1:after=3``.
    """
    rules: list[FailureRule] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = [p.strip() for p in item.split(":")]
        step = parts[0]
        count: int | None = 1
        options = parts[1:]
        if options and "=" not in options[0]:
            count_text = options.pop(0)
            if count_text == "*":
                count = None
            else:
                try:
                    count = _check_count(int(count_text))
                except ValueError:
                    raise ValueError(f"bad count {count_text!r} in failure spec {item!r}") from None
        rule = FailureRule(step, count)
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                raise ValueError(f"bad option {option!r} in failure spec {item!r}")
            try:
                if key == "uuid":
                    rule.uuid = value
                elif key == "after":
                    rule.after_rounds = int(value)
                elif key == "delay":
                    rule.delay_s = float(value)
                    rule.fail = False
                else:
                    raise ValueError(f"unknown option {key!r} in failure spec {item!r}")
            except ValueError as exc:
                raise ValueError(f"bad failure spec {item!r}: {exc}") from None
        if rule.step not in STEPS:
            raise ValueError(f"unknown failure injection step {rule.step!r} in {item!r}")
        rules.append(rule)
    return rules
