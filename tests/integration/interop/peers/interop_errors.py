"""An exception module both interop peers can import, to test 'allowed module' remote errors.

The oslo peer puts this directory first on ``sys.path`` (it is the script's directory); the test
process adds it in ``conftest.py``. Both sides then name the module ``interop_errors``.
"""

from __future__ import annotations

from typing import Any


class InteropError(Exception):
    """A domain error raised on one side and re-created on the other."""

    def __init__(self, message: str = "interop error", **kwargs: Any) -> None:
        super().__init__(message)
        self.kwargs = kwargs
