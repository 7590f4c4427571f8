"""The Grafana dashboard and the Prometheus rules in deploy/monitoring/ stay valid and use only
metric names Fleet really exports (plus Prometheus's own ``up``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from compute_agent.service import ComputeAgentService
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from conductor.service import ConductorService
from shared_objects.runtime.config import FleetConfig

MONITORING = Path(__file__).resolve().parents[3] / "deploy" / "monitoring"
RULES = MONITORING / "fleet-alerts.yml"
DASHBOARD = MONITORING / "fleet-dashboard.json"
PROMETHEUS = MONITORING / "prometheus.yml"
# Series Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up"}
# What the issue asks the alert rules to cover, by the metric each one watches.
REQUIRED_ALERTS = {
    "FleetAgentDown",
    "FleetConductorDown",
    "FleetNoConductor",
    "FleetTaskStuck",
    "FleetRPCErrorRate",
    "FleetObjectBackports",
}
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "gauge": ("",),
    "info": ("_info",),
}
NAME = re.compile(r"\b((?:fleet|process|python)_[a-z0-9_]+|up)\b(?!\s*\()")


def series_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series the two services' registries can export, built from the real services."""
    cfg = FleetConfig(host="c1")
    cfg.messaging.transport_url = f"memory://fleet-conductor-1@{uuid.uuid4().hex}"
    cfg.database.url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db')}/f.db"
    conductor = ConductorService(cfg)
    agent_cfg = FleetConfig(host="c1")
    agent_cfg.messaging.transport_url = f"memory://fleet-host-c1@{uuid.uuid4().hex}"
    driver = FakeDriver(FakeDriverConfig(state_dir=tmp_path_factory.mktemp("virt")))
    agent = ComputeAgentService(agent_cfg, driver=driver)
    return series_names(conductor.metrics.registry) | series_names(agent.metrics.registry)


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def used_names(expr: str) -> set[str]:
    # Label values and matchers are quoted: only bare identifiers can be metric names.
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "{}", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return set(NAME.findall(bare))


def test_rules_have_the_prometheus_shape_and_cover_what_operators_need() -> None:
    found = rules()
    names = [r["alert"] for r in found]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names)
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_rules_and_dashboard_use_only_exported_metrics(exported: set[str]) -> None:
    known = exported | PROMETHEUS_OWN
    for rule in rules():
        unknown = used_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} not exported"
    for expr in dashboard_exprs():
        unknown = used_names(expr) - known
        assert not unknown, f"dashboard {expr!r}: {sorted(unknown)} not exported"


def test_the_name_check_would_catch_a_typo(exported: set[str]) -> None:
    assert used_names('max(fleet_servics{state="down"}) > 0') - exported == {"fleet_servics"}
    assert used_names('sum by (method) (rate(fleet_rpc_calls_total{role="server"}[5m]))') <= (
        exported
    )


def test_dashboard_is_grafana_json_with_the_panels_asked_for() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        for target in p.get("targets", []):
            assert target["refId"] and target["expr"], p["title"]
    text = " ".join(dashboard_exprs())
    for metric in (
        "fleet_services",
        "fleet_instances",
        "fleet_rpc_calls_total",
        "fleet_rpc_latency_seconds_bucket",
        "fleet_object_backports_total",
        "fleet_amqp_reconnects_total",
        "fleet_migrations_in_progress",
        "fleet_migration_progress_ratio",
    ):
        assert metric in text, metric


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (make test installs it: deploy/dev/ensure-promtool.sh)",
)
def test_promtool_accepts_the_rules_and_the_example_configuration() -> None:
    for argv in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS)]):
        done = subprocess.run(
            ["promtool", *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_would_catch_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(fleet_rpc_calls_total[5m\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        ["promtool", "check", "rules", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0


def test_dashboard_file_is_what_its_generator_writes() -> None:
    script = MONITORING / "make_dashboard.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
