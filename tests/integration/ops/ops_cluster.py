"""Helpers of the ops tests: a cluster whose processes serve metrics, log and HTTP readers.

Imported by the tests of this directory as ``ops_cluster`` (pytest puts the directory on
``sys.path``; the tests tree is not a package).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from conductor.tools.cluster import ClusterSpec, LocalCluster
from conductor.tools.cluster_environment import ProcessHandle

OpsClusterFactory = Callable[..., contextlib.AbstractAsyncContextManager["OpsCluster"]]


class OpsCluster(LocalCluster):
    """A ``LocalCluster`` whose conductors can get their own environment (metrics ports)."""

    def __init__(self, spec: ClusterSpec, conductor_env: Mapping[str, str]) -> None:
        super().__init__(spec)
        self.conductor_env = dict(conductor_env)
        # Process name -> metrics port, for the processes that serve /metrics.
        self.metrics_ports: dict[str, int] = {}

    def conductor_handle(self, index: int) -> ProcessHandle:
        handle = super().conductor_handle(index)
        handle.env.update(self.conductor_env)
        if "FLEET_METRICS_PORT" in handle.env:
            self.metrics_ports[handle.name] = int(handle.env["FLEET_METRICS_PORT"])
        return handle

    def agent_handle(self, host: str) -> ProcessHandle:
        handle = super().agent_handle(host)
        if "FLEET_METRICS_PORT" in handle.env:
            self.metrics_ports[handle.name] = int(handle.env["FLEET_METRICS_PORT"])
        return handle

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines process ``name`` wrote so far (non-JSON lines skipped)."""
        out: list[dict[str, Any]] = []
        text = self.processes[name].log_path.read_text(errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``http://127.0.0.1:<port><path>``: (status, body); error statuses are returned too."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def ahttp_get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)
