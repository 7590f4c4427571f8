"""API version strings ("major.minor[.patch]") and oslo's compatibility rule."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=256)
def parse_version(version: str) -> tuple[int, int, int]:
    """``"3.1"`` -> ``(3, 1, 0)``; raises ``ValueError`` for anything else."""
    if not isinstance(version, str):
        raise ValueError(f"version must be a string, not {type(version).__name__}")
    parts = version.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid version {version!r}")
    nums = [int(p) for p in parts] + [0] * (3 - len(parts))
    return nums[0], nums[1], nums[2]


def version_is_compatible(implemented: str, requested: str) -> bool:
    """True when a server implementing ``implemented`` can serve ``requested``.

    Same major; requested minor <= implemented minor; patch compared when minors are equal.
    """
    imp = parse_version(implemented)
    req = parse_version(requested)
    if imp[0] != req[0]:
        return False
    if req[1] != imp[1]:
        return req[1] < imp[1]
    return req[2] <= imp[2]
