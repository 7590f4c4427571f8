"""Writes the Grafana dashboard:
    python deploy/monitoring/make_dashboard.py > deploy/monitoring/fleet-dashboard.json

Edit this file, not the JSON (tests/unit/deploy/test_monitoring.py checks they agree and that
every metric named exists in the code)."""

from __future__ import annotations

import json
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
panels: list[dict[str, Any]] = []
y = 0


def row(title: str) -> None:
    global y
    panels.append(
        {
            "type": "row",
            "title": title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "id": len(panels) + 1,
            "panels": [],
        }
    )
    y += 1


def panel(
    kind: str,
    title: str,
    targets: list[tuple[str, str]],
    w: int = 12,
    h: int = 8,
    x: int = 0,
    unit: str | None = None,
    description: str = "",
    extra: dict[str, Any] | None = None,
    newline: bool = True,
) -> None:
    global y
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "id": len(panels) + 1,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    if extra:
        p.update(extra)
    panels.append(p)
    if newline:
        y += h


row("Fleet census")
panel(
    "stat",
    "Agents up",
    [('max(fleet_services{binary="fleet-compute", state="up"})', "up")],
    w=6,
    h=4,
    newline=False,
)
panel(
    "stat",
    "Agents down",
    [('max(fleet_services{binary="fleet-compute", state="down"})', "down")],
    w=6,
    h=4,
    x=6,
    newline=False,
    description=(
        "Not reporting for service_down_time, stopped (marked down at once) or forced down."
    ),
)
panel(
    "stat",
    "Conductors up",
    [('max(fleet_services{binary="fleet-conductor", state="up"})', "up")],
    w=6,
    h=4,
    x=12,
    newline=False,
)
panel(
    "stat",
    "Versions running",
    [("count by (service, version) (fleet_service_info)", "{{service}} {{version}}")],
    w=6,
    h=4,
    x=18,
)
panel(
    "timeseries",
    "Instances by vm_state",
    [("max by (vm_state) (fleet_instances)", "{{vm_state}}")],
    extra={"options": {"legend": {"displayMode": "table", "placement": "right"}}},
    newline=False,
)
panel(
    "timeseries",
    "Oldest instance per task_state",
    [("max by (task_state) (fleet_instance_task_oldest_seconds)", "{{task_state}}")],
    x=12,
    unit="s",
    description="Work stuck in a transitional state grows here (alert FleetTaskStuck at 30 min).",
)

row("RPC")
panel(
    "timeseries",
    "Calls handled per method",
    [
        (
            'sum by (method) (rate(fleet_rpc_calls_total{role="server"}[$__rate_interval]))',
            "{{method}}",
        )
    ],
    unit="reqps",
    newline=False,
)
panel(
    "timeseries",
    "Latency p95 per method (server)",
    [
        (
            "histogram_quantile(0.95, sum by (le, method) "
            '(rate(fleet_rpc_latency_seconds_bucket{role="server"}[$__rate_interval])))',
            "{{method}}",
        )
    ],
    x=12,
    unit="s",
)
panel(
    "timeseries",
    "Failed calls per method and outcome",
    [
        (
            "sum by (method, outcome, role) "
            '(rate(fleet_rpc_calls_total{outcome!="ok"}[$__rate_interval]))',
            "{{role}} {{method}} {{outcome}}",
        )
    ],
    unit="reqps",
    newline=False,
    description=(
        "error/timeout are faults; client_error (not found, invalid), forbidden and "
        "unavailable are answers."
    ),
)
panel(
    "timeseries",
    "In flight and dropped",
    [
        ("sum by (role) (fleet_rpc_in_flight)", "in flight {{role}}"),
        ("sum by (reason) (rate(fleet_rpc_dropped_total[$__rate_interval]))", "dropped {{reason}}"),
    ],
    x=12,
)

row("Broker and upgrades")
panel(
    "timeseries",
    "Broker reconnects and publish failures",
    [
        (
            "sum by (instance) (increase(fleet_amqp_reconnects_total[$__rate_interval]))",
            "reconnects {{instance}}",
        ),
        (
            "sum by (instance) (increase(fleet_amqp_publish_failures_total[$__rate_interval]))",
            "publish failures {{instance}}",
        ),
    ],
    w=8,
    newline=False,
)
panel(
    "timeseries",
    "Object backports",
    [("sum by (object) (increase(fleet_object_backports_total[$__rate_interval]))", "{{object}}")],
    w=8,
    x=8,
    newline=False,
    description="Non-zero only while releases are mixed (rolling upgrade).",
)
panel(
    "timeseries",
    "Reconciler actions",
    [("sum by (rule) (increase(fleet_reconciler_actions_total[$__rate_interval]))", "{{rule}}")],
    w=8,
    x=16,
)

row("Live migrations")
panel(
    "timeseries",
    "Migrations in flight by status",
    [("max by (status) (fleet_migrations_in_progress)", "{{status}}")],
    w=8,
    newline=False,
)
panel(
    "bargauge",
    "Progress of each migration in flight (memory copied)",
    [
        (
            "max by (migration, instance, source, dest) (fleet_migration_progress_ratio)",
            "{{instance}} {{source}} → {{dest}}",
        )
    ],
    w=16,
    x=8,
    unit="percentunit",
    extra={
        "options": {"displayMode": "gradient", "orientation": "horizontal"},
        "fieldConfig": {"defaults": {"unit": "percentunit", "min": 0, "max": 1}, "overrides": []},
    },
)

row("Processes")
panel(
    "timeseries",
    "CPU per process",
    [
        (
            'rate(process_cpu_seconds_total{job=~"fleet-.*"}[$__rate_interval])',
            "{{job}} {{instance}}",
        )
    ],
    unit="percentunit",
    newline=False,
)
panel(
    "timeseries",
    "Resident memory per process",
    [('process_resident_memory_bytes{job=~"fleet-.*"}', "{{job}} {{instance}}")],
    x=12,
    unit="bytes",
)

dashboard = {
    "title": "Fleet",
    "uid": "fleet-overview",
    "description": "Fleet census, RPC, broker, upgrades and live migrations (docs/operations.md).",
    "tags": ["fleet"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            }
        ]
    },
    "annotations": {"list": []},
    "panels": panels,
}
if __name__ == "__main__":
    print(json.dumps(dashboard, indent=2, ensure_ascii=False))
