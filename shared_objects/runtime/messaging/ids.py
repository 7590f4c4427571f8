"""Message ids and the random parts of queue names: 32 hex digits from ``secrets``.

These values are capabilities, not just labels. ``_msg_id`` is what a reply must carry to reach
a waiting call, and the random part of a reply or fanout queue name is what a peer must know to
publish into (or try to declare) that queue. A Mersenne Twister's output can be reconstructed
from the ids it already produced (every request carries two), so a host that sees our traffic
could predict the next ones; ``secrets`` (the OS CSPRNG) cannot be predicted that way.

Secrecy is one layer, not the whole defence: reply queues are exclusive and named after the
caller's login, and callers accept a reply only from the login they expected (``docs/rpc.md``).
``secrets.token_hex(16)`` costs one ``getrandom`` call (about a microsecond): cheap enough for two
ids per call.
"""

from __future__ import annotations

import secrets


def new_id() -> str:
    """A fresh, unpredictable 128-bit id as 32 lowercase hex digits (like ``uuid4().hex``)."""
    return secrets.token_hex(16)
