"""oslo's version compatibility rule."""

from __future__ import annotations

import pytest

from shared_objects.runtime.messaging.versions import parse_version, version_is_compatible


@pytest.mark.parametrize(
    ("implemented", "requested", "ok"),
    [
        ("1.0", "1.0", True),
        ("1.3", "1.0", True),
        ("1.3", "1.3", True),
        ("1.3", "1.4", False),
        ("2.0", "1.0", False),
        ("1.0", "2.0", False),
        ("1.3.1", "1.3", True),
        ("1.3", "1.3.1", False),
        ("1.4", "1.3.5", True),
        ("3", "3.0", True),
    ],
)
def test_same_major_and_requested_minor_not_above_served(
    implemented: str, requested: str, ok: bool
) -> None:
    assert version_is_compatible(implemented, requested) is ok


@pytest.mark.parametrize("bad", ["", "a.b", "1.2.3.4", "1..2", "-1.0", "1.0-rc"])
def test_invalid_version_strings_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_version(bad)
