"""Alembic environment for the conductor's schema.

Configuration lives in code (``conductor.db.migration``), so migrations run from an installed
package without an ``alembic.ini``. The caller hands over an open connection in
``config.attributes["connection"]``; this script never creates engines itself.
"""

from __future__ import annotations

from alembic import context

from conductor.db.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through conductor.db.migration (fleetctl db upgrade), which supplies "
        "the database connection"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: batch mode recreates tables when a migration needs it.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
