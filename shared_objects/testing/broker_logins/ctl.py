"""How ``BrokerLogins`` reaches a broker's administration: ``rabbitmqctl`` on the shared broker
(``Rabbitmqctl``) or on a private node or cluster of the test kit (``NodeCtl``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from shared_objects.testing.broker_logins.rules import _LOGIN_RE

if TYPE_CHECKING:
    from shared_objects.testing.rabbit_cluster import RabbitCluster
    from shared_objects.testing.rabbit_node import RabbitNode


log = structlog.get_logger(__name__)


class CtlError(RuntimeError):
    """rabbitmqctl failed (not installed, no access to the node, or the command failed)."""


class Ctl(Protocol):
    """How BrokerLogins reaches the broker's administration (rabbitmqctl of some node)."""

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None: ...

    async def delete_users(self, logins: Sequence[str]) -> None: ...


class SetupCtl(Ctl, Protocol):
    """What ``fleetctl broker setup`` needs besides: the broker's current definitions."""

    async def export_definitions(self) -> dict[str, Any]: ...


class Rabbitmqctl:
    """``rabbitmqctl`` run as asyncio subprocesses (never blocking the loop).

    The default is the machine's shared broker through the distribution's wrapper (which
    switches to the ``rabbitmq`` user and its cookie; definitions therefore go in on stdin, not
    through a file that user might not read). ``node`` adds ``-n <node>``; ``env`` replaces the
    environment (a private node's cookie and config).
    """

    def __init__(
        self,
        executable: str | None = None,
        *,
        node: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.executable = executable
        self.node = node
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.timeout = timeout

    def _argv(self, args: Sequence[str]) -> list[str]:
        exe = self.executable or shutil.which("rabbitmqctl")
        if exe is None:
            raise CtlError("rabbitmqctl not found: install rabbitmq-server (make services does)")
        return [exe, *(["-n", self.node] if self.node else []), "-q", *args]

    async def run(self, *args: str, stdin: bytes | None = None) -> str:
        """Run one command; its output, or CtlError with it."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(args),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        except OSError as exc:
            raise CtlError(f"cannot run rabbitmqctl: {exc}") from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CtlError(f"rabbitmqctl {args[0]} timed out after {self.timeout}s") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise CtlError(f"rabbitmqctl {args[0]} failed ({proc.returncode}): {text.strip()}")
        return text

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        # No file argument: rabbitmqctl reads the definitions from stdin.
        await self.run("import_definitions", stdin=json.dumps(definitions).encode())

    async def export_definitions(self) -> dict[str, Any]:
        """Everything the broker holds (users with their password hashes and limits, vhosts,
        permissions, topic permissions, policies, exchanges, ...), as one JSON document."""
        text = await self.run("export_definitions", "-", "--format", "json")
        try:
            found = json.loads(text[text.index("{") :])
        except ValueError as exc:
            raise CtlError(f"rabbitmqctl export_definitions: not JSON: {text[:200]!r}") from exc
        if not isinstance(found, dict):
            raise CtlError("rabbitmqctl export_definitions: not a JSON object")
        return found

    async def delete_users(self, logins: Sequence[str]) -> None:
        if not logins:
            return
        try:
            await self.run("eval", _delete_users_expression(logins))
        except CtlError as exc:
            # rabbit_auth_backend_internal is not a public API: fall back to the CLI, one by one.
            log.info("broker_logins_eval_failed", error=str(exc)[:200])
            for login in logins:
                try:
                    await self.run("delete_user", login)
                except CtlError as one:
                    if "does not exist" not in str(one):
                        raise


def _delete_users_expression(logins: Sequence[str]) -> str:
    for login in logins:
        if not _LOGIN_RE.match(login):
            raise ValueError(f"unsafe broker login {login!r}")
    users = ", ".join(f'<<"{login}">>' for login in logins)
    # One Erlang expression deleting every user (a missing one is skipped, not an error);
    # prints how many were deleted.
    return (
        f"length([ok || U <- [{users}], "
        'ok =:= (catch rabbit_auth_backend_internal:delete_user(U, <<"fleet-broker-logins">>))]).'
    )


class NodeCtl(Rabbitmqctl):
    """rabbitmqctl of a private :class:`~shared_objects.testing.rabbit_node.RabbitNode` (or of
    a :class:`~shared_objects.testing.rabbit_cluster.RabbitCluster`: whichever node is up).

    Runs through the node's own ``ctl`` (its node name, cookie and environment); definitions go
    through a file in the node's private directory, since that ``ctl`` has no stdin.
    """

    def __init__(self, node: RabbitNode | RabbitCluster) -> None:
        super().__init__()
        self.node_handle = node

    async def run(self, *args: str, stdin: bytes | None = None) -> str:
        if stdin is not None:
            raise CtlError("a private node's rabbitmqctl takes no stdin")
        try:
            return await self.node_handle.ctl(*args)
        except Exception as exc:  # RabbitNodeError, TimeoutError
            raise CtlError(str(exc)) from exc

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        path = self.node_handle.base_dir / f"definitions-{uuid.uuid4().hex}.json"
        await asyncio.to_thread(_write_private, path, json.dumps(definitions))
        try:
            await self.run("import_definitions", str(path))
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
