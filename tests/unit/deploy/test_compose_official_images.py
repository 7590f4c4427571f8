"""Opt-in (``pytest -m docker``): docker-compose.yml as shipped, with the official images.

For a machine with a docker engine, the compose plugin and registry access; ``make
test-deploy`` runs the same file for real here with locally built images instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from compose_model import COMPOSE


def _docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    for argv in (["docker", "info"], ["docker", "compose", "version"]):
        result = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        if result.returncode != 0:
            return False
    return True


@pytest.mark.docker
def test_cluster_comes_up_on_a_local_docker_engine() -> None:
    """Opt-in (``pytest -m docker``): build, start, wait for health, tear down."""
    if not _docker_engine_available():
        pytest.skip("no docker engine with the compose plugin on this machine")
    project = ["docker", "compose", "-f", str(COMPOSE), "-p", "fleet-test"]
    try:
        subprocess.run([*project, "up", "--build", "-d", "--wait"], check=True, timeout=900)
        ps = subprocess.run(
            [*project, "ps", "-a", "--format", "json"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Older compose versions print one JSON array, newer ones one object per line.
        text = ps.stdout.strip()
        rows = (
            json.loads(text)
            if text.startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        by_service: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_service.setdefault(row["Service"], []).append(row)
        assert by_service["migrate"][0]["ExitCode"] == 0
        assert len(by_service["conductor"]) == 2
        for name in ("conductor", "compute-1", "compute-2"):
            assert all(r["Health"] == "healthy" for r in by_service[name]), name
    finally:
        subprocess.run([*project, "down", "-v"], check=False, timeout=300)
