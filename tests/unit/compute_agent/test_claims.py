from __future__ import annotations

import asyncio

import pytest

from compute_agent.claims import Capacity, ClaimTracker, Resources
from shared_objects.exception import InsufficientResources

ONE = Resources(vcpus=1, memory_mb=1024, disk_gb=10)


async def test_concurrent_claims_never_overcommit() -> None:
    tracker = ClaimTracker(Capacity(vcpus=4, memory_mb=4096, disk_gb=1000))  # RAM limit 6144
    results = await asyncio.gather(
        *(tracker.claim(f"i{n}", ONE) for n in range(20)), return_exceptions=True
    )
    granted = [r for r in results if r is None]
    refused = [r for r in results if isinstance(r, InsufficientResources)]
    assert len(granted) == 6 and len(refused) == 14
    assert tracker.usage == Resources(6, 6144, 60)


async def test_usage_is_sum_of_claims_after_release() -> None:
    tracker = ClaimTracker(Capacity(vcpus=4, memory_mb=4096, disk_gb=100))
    await tracker.claim("a", ONE)
    await tracker.claim("b", ONE)
    assert tracker.release("a") is True
    assert tracker.release("a") is False
    assert tracker.usage == ONE
    assert tracker.claimed_uuids == {"b"}


async def test_claim_is_idempotent_per_instance() -> None:
    tracker = ClaimTracker(Capacity(vcpus=1, memory_mb=1024, disk_gb=10, ram_allocation_ratio=1.0))
    await tracker.claim("a", ONE)
    await tracker.claim("a", ONE)
    assert tracker.usage == ONE


async def test_refusal_names_the_short_resource() -> None:
    tracker = ClaimTracker(Capacity(vcpus=1, memory_mb=100000, disk_gb=5))
    with pytest.raises(InsufficientResources, match="disk 10 GB > 5 GB"):
        await tracker.claim("a", ONE)
