"""Security-group rule validation and the canonical form a driver stores and reports.

The agent compares what the driver applied with what the database holds; both sides should pass
their rules through ``normalize_rules`` so the comparison is about meaning, not spelling.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from compute_agent.virt.exceptions import InvalidFirewallRule

PROTOCOLS = frozenset({"tcp", "udp", "icmp"})
DIRECTIONS = frozenset({"ingress", "egress"})

FirewallRule = dict[str, Any]


def _port(rule: Mapping[str, Any], key: str) -> int | None:
    value = rule.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidFirewallRule(rule=dict(rule), reason=f"{key} must be an integer")
    try:
        port = int(value)
    except ValueError:
        raise InvalidFirewallRule(rule=dict(rule), reason=f"{key} must be an integer") from None
    return port


def normalize_rule(rule: Mapping[str, Any]) -> FirewallRule:
    """Validate one rule and return its canonical form.

    Input keys (the SecurityGroupRule fields): ``protocol`` (tcp/udp/icmp in any case, or None for
    every protocol), ``from_port``/``to_port`` (0-65535 with from <= to; ICMP type/code -1..255;
    None allowed for ICMP and "every protocol"), ``cidr`` (an IPv4/IPv6 network, host bits
    cleared; None when the source is a group), ``grantee_group_id`` (the source security group,
    or None), optional ``direction`` (ingress by default). Other keys are dropped. Missing values
    are never widened: a rule without a CIDR does not become 0.0.0.0/0.
    """
    raw_protocol = rule.get("protocol")
    protocol = None if raw_protocol in (None, "") else str(raw_protocol).lower()
    if protocol is not None and protocol not in PROTOCOLS:
        raise InvalidFirewallRule(rule=dict(rule), reason=f"unknown protocol {protocol!r}")
    direction = str(rule.get("direction") or "ingress").lower()
    if direction not in DIRECTIONS:
        raise InvalidFirewallRule(rule=dict(rule), reason=f"unknown direction {direction!r}")
    from_port = _port(rule, "from_port")
    to_port = _port(rule, "to_port")
    if protocol == "icmp":
        for value in (from_port, to_port):
            if value is not None and not -1 <= value <= 255:
                raise InvalidFirewallRule(rule=dict(rule), reason="icmp type/code out of range")
    elif protocol is not None and (from_port is None or to_port is None):
        raise InvalidFirewallRule(rule=dict(rule), reason="tcp/udp rules need both ports")
    elif (from_port is not None or to_port is not None) and (
        from_port is None or to_port is None or not (0 <= from_port <= to_port <= 65535)
    ):
        raise InvalidFirewallRule(rule=dict(rule), reason="port range invalid")
    cidr_text = rule.get("cidr")
    cidr: str | None = None
    if cidr_text not in (None, ""):
        try:
            cidr = str(ipaddress.ip_network(str(cidr_text), strict=False))
        except ValueError as exc:
            raise InvalidFirewallRule(rule=dict(rule), reason=str(exc)) from None
    group = rule.get("grantee_group_id")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
        raise InvalidFirewallRule(rule=dict(rule), reason="grantee_group_id must be an integer")
    return {
        "protocol": protocol,
        "from_port": from_port,
        "to_port": to_port,
        "cidr": cidr,
        "grantee_group_id": group,
        "direction": direction,
    }


def _number(value: int | None) -> int:
    return -2 if value is None else value


def _sort_key(rule: FirewallRule) -> tuple[str, str, int, int, str, int]:
    return (
        rule["direction"],
        rule["protocol"] or "",
        _number(rule["from_port"]),
        _number(rule["to_port"]),
        rule["cidr"] or "",
        _number(rule["grantee_group_id"]),
    )


def normalize_rules(rules: Iterable[Mapping[str, Any]]) -> list[FirewallRule]:
    """Canonical, de-duplicated, sorted list of rules: equal lists mean equal firewalls."""
    unique = {tuple(sorted(r.items())): r for r in (normalize_rule(x) for x in rules)}
    return sorted(unique.values(), key=_sort_key)
