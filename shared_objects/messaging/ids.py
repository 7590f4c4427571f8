"""Message ids: 32 hex digits like oslo's ``uuid4().hex``, cheaper to make.

``_msg_id`` and ``_unique_id`` only need to be unique, not secret: the reply queue name (a real
``uuid4``) is what a stranger would have to guess to inject a reply.
"""

from __future__ import annotations

import random

_random = random.Random()


def new_id() -> str:
    """A fresh 128-bit random id as 32 lowercase hex digits."""
    return f"{_random.getrandbits(128):032x}"
