from __future__ import annotations

import dataclasses
import random

import pytest

from conductor.scheduler import (
    HostState,
    ResourceRequest,
    select_destinations,
    weight_key,
)
from shared_objects.exception import NoValidHost


def host(name: str, **kw: object) -> HostState:
    base: dict[str, object] = {"vcpus": 4, "memory_mb": 4096, "local_gb": 100}
    base.update(kw)
    return HostState(host=name, node=name, **base)  # type: ignore[arg-type]


SMALL = ResourceRequest(vcpus=1, memory_mb=1024, disk_gb=10)


def test_most_free_ram_wins() -> None:
    picks = select_destinations([host("a"), host("b", memory_mb_used=1000)], SMALL, 1)
    assert picks[0][0].host == "a"
    assert [h.host for h in picks[0][1:]] == ["b"]


def test_multi_instance_request_spreads_over_hosts() -> None:
    picks = select_destinations([host("a"), host("b")], SMALL, 4)
    assert sorted(p[0].host for p in picks) == ["a", "a", "b", "b"]


def test_down_and_disabled_hosts_are_filtered_with_reasons() -> None:
    hosts = [host("a", service_up=False), host("b", service_disabled=True)]
    with pytest.raises(NoValidHost) as err:
        select_destinations(hosts, SMALL, 1)
    assert "a: compute service is down" in str(err.value)
    assert "b: compute service is disabled" in str(err.value)


def test_allocation_ratio_limits_ram() -> None:
    # 4096 MB * 1.5 = 6144 MB: six 1 GB instances fit, the seventh does not.
    picks = select_destinations([host("a")], SMALL, 6)
    assert len(picks) == 6
    with pytest.raises(NoValidHost) as err:
        select_destinations([host("a")], SMALL, 7)
    assert "placed 6 of 7" in str(err.value)
    assert "not enough RAM" in str(err.value)


def test_forced_host_unknown_is_no_valid_host() -> None:
    with pytest.raises(NoValidHost, match="forced host is not a known compute host"):
        select_destinations([host("a")], SMALL, 1, force_host="zz")


def test_ignored_hosts_are_skipped() -> None:
    picks = select_destinations([host("a"), host("b")], SMALL, 1, ignore_hosts=["a"])
    assert picks[0][0].host == "b"


def test_input_states_are_not_mutated() -> None:
    hosts = [host("a")]
    select_destinations(hosts, SMALL, 3)
    assert hosts[0].memory_mb_used == 0


def test_zero_count_is_rejected() -> None:
    with pytest.raises(ValueError):
        select_destinations([host("a")], SMALL, 0)


def test_a_search_in_weigher_order_picks_what_the_full_search_picks() -> None:
    """``floors`` (the host view's order) only saves work: same picks, same alternates, with
    hosts filtered out, hosts ignored, and usage grown since the order was taken."""
    rng = random.Random(14)
    for _ in range(200):
        hosts = [
            host(
                f"h{i:03d}",
                memory_mb_used=rng.randrange(0, 6000),
                vcpus_used=rng.choice([0, 0, 0, 64]),
                service_up=rng.random() > 0.2,
                service_disabled=rng.random() < 0.1,
            )
            for i in range(rng.randrange(1, 40))
        ]
        hosts.sort(key=weight_key)
        floors = [weight_key(h) for h in hosts]
        # Placements since (the ledger's copies): usage only grows.
        for i in rng.sample(range(len(hosts)), k=min(3, len(hosts))):
            hosts[i] = dataclasses.replace(hosts[i], memory_mb_used=hosts[i].memory_mb_used + 900)
        ignored = [h.host for h in rng.sample(hosts, k=min(2, len(hosts)))]
        count = rng.randrange(1, 4)
        outcomes = []
        for order in (None, floors):
            try:
                picks = select_destinations(hosts, SMALL, count, ignore_hosts=ignored, floors=order)
                outcomes.append([[(h.host, h.memory_mb_used) for h in p] for p in picks])
            except NoValidHost as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]
